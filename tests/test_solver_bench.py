"""eval/solver_bench.py: named configurations solve the sequential sampler's chain on its noise, cold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "eval/solver_bench.py", f"out_dir={tmp_path}", "n_obs=2", "threads=1", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_configurations_by_name_reproduce_the_sequential_sample(tmp_path):
    run = _bench(tmp_path, "policy=ddim4", "configurations=[paradigms,newton_broyden_cold]")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "solver_bench.json").read_text())
    rows = results["solvers"]
    assert list(rows) == ["sequential", "paradigms", "newton_broyden_cold"]  # the baseline first
    assert results["schedule"] == "ddim4" and rows["sequential"]["iterations_mean"] == 4
    # the configuration's own solver and options (configs/experiment/ + configs/solver/), on the bench's sampler
    assert rows["newton_broyden_cold"]["solver"] == "newton" and rows["newton_broyden_cold"]["options"]["jacobian"] == (
        "broyden"
    )
    assert rows["paradigms"]["options"] == {"window": 16, "tolerance": 0.01}
    for name in ("paradigms", "newton_broyden_cold"):
        assert rows[name]["converged_frac"] == 1.0 and rows[name]["max_abs_dev"] < 1e-3, name
    assert "| newton_broyden_cold |" in run.stdout


def test_warm_start_configurations_and_unknown_names_are_refused(tmp_path):
    run = _bench(tmp_path, "configurations=[newton_broyden_warm]")
    assert run.returncode != 0 and "'newton_broyden_warm' sets warm_start=True" in run.stderr
    run = _bench(tmp_path, "configurations=[paradigms,newton_missing]")
    assert run.returncode != 0 and "unknown configuration 'newton_missing'" in run.stderr
    assert not (tmp_path / "solver_bench.json").exists()
