"""Bad input and faults (issue #27): one clear error each, nothing runs that the user refused, no result lost.

Function-level checks are grouped; subprocess tests run the real command line only where the command line is
what is tested (one stderr line, exit status, Hydra's parsing of ``no``), on one short episode.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from policy_accel.checkpoint import load_policy
from policy_accel.errors import EXIT_USER_ERROR, PickleRefusedError

ROOT = Path(__file__).resolve().parents[1]
PUSHT = ROOT / "checkpoints" / "pusht"
FAST = ["threads=1", "solver=sequential", "policy=ddim2", "seeds=[100000]", "task.max_episode_steps=16"]


def run_script(script: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "eval" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_error_line(run: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one line on stderr, ``error: ...``, and no traceback anywhere."""
    assert run.returncode == EXIT_USER_ERROR, (run.returncode, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    return lines[0]


# -- pickles: only an explicit boolean true opens one -------------------------------------------------------------


class _SideEffect:
    """Unpickling this creates ``marker``: what a hostile .ckpt could do with any callable."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def hostile_ckpt(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.ckpt"
    torch.save({"cfg": {}, "state_dicts": {}, "x": _SideEffect(marker)}, path)
    return path, marker


@pytest.mark.parametrize("trust", ["no", "false", "False", "0", "", "true", "yes", 1, 0, None, [True]])
def test_load_policy_opens_a_pickle_only_for_the_boolean_true(trust, hostile_ckpt):
    path, marker = hostile_ckpt
    with pytest.raises(ValueError, match=r"trust_pickle=.* is not a boolean"):
        load_policy(path, trust_pickle=trust)
    assert not marker.exists()
    with pytest.raises(PickleRefusedError, match="run arbitrary code"):
        load_policy(path, trust_pickle=False)
    assert not marker.exists()
    with pytest.raises(Exception, match="state_dicts has no policy weights"):
        load_policy(path, trust_pickle=True)  # the test can see an unpickling: true does open it
    assert marker.exists()


@pytest.mark.parametrize("spelling", ["no", "'false'", "off", "0"])
def test_rollout_trust_pickle_spelled_as_no_never_unpickles(spelling, hostile_ckpt):
    path, marker = hostile_ckpt
    run = run_script("rollout.py", *FAST, f"policy.path={path}", f"policy.trust_pickle={spelling}", "out_dir=/tmp/x")
    line = one_error_line(run)
    assert "policy.trust_pickle=" in line and "true or false" in line
    assert not marker.exists()


def test_convert_refuses_a_pickle_without_the_flag_and_never_opens_it(hostile_ckpt, tmp_path):
    path, marker = hostile_ckpt
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "convert.py"), str(path), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "--trust-pickle" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()


def _copy_pusht(tmp_path: Path) -> Path:
    dst = tmp_path / "my_policy"
    shutil.copytree(PUSHT, dst)
    return dst


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
