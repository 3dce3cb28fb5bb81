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


# -- non-finite numbers: refused at load and on input, never reported as success -------------------------------------


@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    """A small random PushT-shaped policy in our format."""
    from policy_accel.checkpoint import save_policy
    from policy_accel.normalizer import LinearNormalizer
    from policy_accel.policy import DiffusionPolicy, PolicyConfig
    from policy_accel.unet import ConditionalUnet1D, UNetConfig

    torch.manual_seed(0)
    config = PolicyConfig(unet=UNetConfig(down_dims=[16, 32, 64], diffusion_step_embed_dim=32))
    obs = LinearNormalizer.fit(torch.rand(100, 18) * 512)
    act = LinearNormalizer.fit(torch.rand(100, 2) * 512)
    return save_policy(DiffusionPolicy(config, ConditionalUnet1D(config.unet), obs, act), tmp_path / "small")


def _poke(path: Path, key: str, value: float, index: int = 0) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    tensors[key].view(-1)[index] = value
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("model.final_conv.1.weight", float("nan"), "tensor final_conv.1.weight has 1 non-finite"),
        ("model.mid_modules.0.blocks.0.block.0.bias", float("inf"), "non-finite"),
        ("normalizer.obs.scale", float("nan"), "tensor normalizer.obs.scale has 1 non-finite"),
        ("normalizer.action.offset", float("-inf"), "tensor normalizer.action.offset"),
        ("normalizer.action.scale", 0.0, "normalizer.action.scale is zero at dims [0]"),
    ],
)
def test_non_finite_weights_and_normalizers_are_refused_at_load_naming_file_and_tensor(key, value, words, small_ckpt):
    from policy_accel.errors import CheckpointError

    _poke(small_ckpt, key, value)
    with pytest.raises(CheckpointError) as err:
        load_policy(small_ckpt)
    assert str(small_ckpt / "model.safetensors") in str(err.value) and words in str(err.value)


def test_observations_are_checked_as_the_network_sees_them(trained_policy):
    import numpy as np

    from policy_accel.errors import ObservationError
    from policy_accel.runner import PolicyRunner
    from policy_accel.solvers import make_solver

    runner = PolicyRunner(
        trained_policy, make_solver("sequential"), trained_policy.schedule(kind="ddim", num_inference_steps=2)
    )
    good = np.full((1, 2, 18), 100.0)
    for value, where in (
        (1e300, "as float32"),
        (np.nan, "as float32"),
        (-np.inf, "as float32"),
        (3e38, "normalized observation reaches"),
    ):
        obs = good.copy()
        obs[0, 1, 5] = value
        with pytest.raises(ObservationError, match=rf"{where}.*(\[batch 0, step 1, dim 5\]|units)"):
            runner.plan(obs)
    for bad in (np.zeros((1, 3, 18)), np.zeros((0, 2, 18)), [["a"] * 18] * 2, np.zeros((2, 18))):
        with pytest.raises(ObservationError, match="observation history"):
            runner.plan(bad)
    actions, _, _ = runner.plan(good)  # and a good one still plans
    assert actions.shape == (1, 8, 2) and np.isfinite(actions).all()


def test_weights_broken_after_loading_are_blamed_not_the_solver(small_ckpt):
    import numpy as np

    from policy_accel.errors import CheckpointError
    from policy_accel.runner import PolicyRunner
    from policy_accel.solvers import make_solver

    policy = load_policy(small_ckpt)
    with torch.no_grad():
        next(policy.model.parameters()).fill_(float("nan"))
    runner = PolicyRunner(policy, make_solver("sequential"), policy.schedule(kind="ddim", num_inference_steps=2))
    with pytest.raises(CheckpointError, match="weights are not finite, not the solver"):
        runner.plan(np.full((1, 2, 18), 100.0))


def test_rollout_of_a_checkpoint_with_a_nan_weight_fails_naming_file_and_tensor(tmp_path):
    ckpt = _copy_pusht(tmp_path)
    _poke(ckpt, "model.final_conv.1.weight", float("nan"), index=3)
    run = run_script("rollout.py", *FAST, f"policy.path={ckpt}", f"out_dir={tmp_path / 'out'}")
    line = one_error_line(run)
    assert str(ckpt / "model.safetensors") in line and "final_conv.1.weight" in line
    assert not (tmp_path / "out" / "results.json").exists()


# -- checkpoint configs that load but cannot work -------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda c: c["policy"].update(n_action_steps=0), "n_action_steps=0 must be >= 1"),
        (lambda c: c["policy"].update(n_action_steps=-3), "n_action_steps=-3 must be >= 1"),
        (lambda c: c["policy"].update(horizon="16"), "horizon='16' is not of type int"),
        (lambda c: c["policy"].update(obs_dim=18.0), "obs_dim=18.0 is not of type int"),
        (lambda c: c["policy"].update(n_obs_steps=True), "n_obs_steps=True is not of type int"),
        (lambda c: c["policy"]["schedule"].update(clip_sample="no"), "schedule.clip_sample='no' is not of type bool"),
        (lambda c: c["policy"]["schedule"].update(beta_end=float("nan")), "schedule.beta_end=nan"),
        (lambda c: c["policy"]["schedule"].update(num_inference_steps="10"), "num_inference_steps='10'"),
        (lambda c: c["policy"]["schedule"].update(beta_start=0.5), "need 0 < beta_start < beta_end < 1"),
        (lambda c: c["policy"]["unet"].update(down_dims=[16, "32", 64]), "unet.down_dims="),
        (lambda c: c["policy"]["unet"].update(kernel_size=4), "unet.kernel_size=4 must be odd"),
        (lambda c: c["policy"]["unet"].update(n_groups=0), "unet.n_groups=0 must be >= 1"),
        (lambda c: c["policy"]["unet"].update(extra=1), "unet has unknown fields ['extra']"),
        (lambda c: c["policy"].update(schedule=[]), "schedule must be a mapping"),
        (lambda c: c.update(version=2), "format version 2 is not one this toolkit reads"),
        (lambda c: c.update(version="1"), "format version '1'"),
        (lambda c: c.update(policy="pusht"), "'policy' is a str, expected an object"),
    ],
)
def test_checkpoint_config_fields_are_checked_for_type_and_range_when_read(edit, words, small_ckpt):
    from policy_accel.errors import CheckpointError

    _edit_config(small_ckpt, edit)
    with pytest.raises(CheckpointError) as err:
        load_policy(small_ckpt)
    assert str(small_ckpt / "config.json") in str(err.value) and words in str(err.value), str(err.value)
