"""Defects found around the warm starts (issue #35), each pinned by a test that failed before its fix."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from policy_accel.errors import ConfigError
from policy_accel.experiment.build import build_session
from policy_accel.session import Session
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Budget

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))


def _obs(seed: int, batch: int = 1):
    import numpy as np

    return np.random.default_rng(seed).uniform(100, 400, size=(batch, 2, 18))


# ------------------------------------------------------------------------------------------------
# a solver's capability flags are not user options
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,value", [("name", "newton"), ("exact_warm_start", True)])
def test_solver_capability_flags_are_refused_as_options(option, value):
    with pytest.raises(ConfigError, match=rf"^{option}={value!r} is not allowed: .*not an option"):
        make_solver("paradigms", **{option: value})


@pytest.mark.parametrize("option,value", [("name", "newton"), ("exact_warm_start", "true")])
def test_solver_capability_flags_are_refused_on_the_command_line(option, value):
    """``solver.options.exact_warm_start=true`` would relabel warm ParaDiGMS exact; ``name`` would rename it."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("rollout", overrides=["solver=paradigms", "warm_start=true", f"+solver.options.{option}={value}"])
    with pytest.raises(ConfigError, match=rf"^solver\.options\.{option}=.* is not allowed"):
        build_session(cfg)


# ------------------------------------------------------------------------------------------------
# Falcon: tensors on the policy's device, one time budget for the whole inference
# ------------------------------------------------------------------------------------------------

_FACTORIES = {torch.tensor, torch.full, torch.zeros, torch.ones, torch.empty, torch.arange, torch.rand, torch.randn}


class _FactoryCalls(TorchFunctionMode):
    """Records the tensor factories called from the warm-start module, and the device each names."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, object, bool, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith("warm_starts.py"):
                self.calls.append((func.__name__, kwargs.get("device"), "generator" in kwargs, frame.f_lineno))
        return func(*args, **kwargs)


def test_falcon_builds_its_tensors_on_the_policy_device(trained_policy):
    """No GPU here: every tensor Falcon builds must name the device of the inference's tensors (a CPU default beside
    a CUDA policy fails at the first warm inference); random draws come from the session's CPU generator and are
    moved (the only factory calls allowed without a device are those with a generator)."""
    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=10)
    options = {"threshold": 10.0, "explore": 0.3}  # every candidate passes: screening, selection and warm groups run
    session = Session(trained_policy, make_solver("sequential"), schedule, "falcon", warm_options=options)
    session.reset(seed=0)
    with _FactoryCalls() as mode:
        records = [session.plan(_obs(i, batch=3)).record for i in range(3)]
    assert any(r.warm for r in records)
    assert mode.calls, "Falcon built no tensor: the recorder missed it"
    undeviced = [c for c in mode.calls if c[1] is None and not c[2]]
    assert not undeviced, f"built on the default device: {undeviced}"


def test_falcon_charges_the_screening_call_and_every_group_to_one_time_budget(trained_policy, monkeypatch):
    """A fake clock that advances 1 s per network call: with a 5 s budget, a warm Falcon inference makes at most 5
    calls (the screening call included), not a screening call plus a whole budget per row group."""
    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=10)
    session = Session(trained_policy, make_solver("sequential"), schedule, "falcon", warm_options={"threshold": 1e-9})
    session.reset(seed=0)
    session.plan(_obs(0))  # cold, fills the buffer
    now = [0.0]
    calls = [0]
    forward = trained_policy.denoiser

    def slow(x, t, cond):
        now[0] += 1.0
        calls[0] += 1
        return forward(x, t, cond)

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(type(trained_policy), "denoiser", property(lambda self: slow))
    plan = session.plan(_obs(1), budget=Budget(time_s=5.0))
    assert calls[0] <= 5, f"{calls[0]} network calls of 1 s each under a 5 s budget"
    assert plan.record.stop_reason == "time_budget"


# ------------------------------------------------------------------------------------------------
# the command line warns about every approximate configuration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [["warm_start=rti"], ["warm_start=falcon"]])
def test_rollout_warns_about_every_approximate_warm_start(run_rollout, tmp_path, overrides):
    out = run_rollout(
        "solver=sequential", "policy=ddim10", *overrides, "n_episodes=1", "task.max_episode_steps=9",
        "engine=torch", f"out_dir={tmp_path}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "APPROXIMATE configuration" in out.stdout + out.stderr  # Hydra's job log goes to stdout


# ------------------------------------------------------------------------------------------------
# the real-time run's offline comparison row is the same configuration
# ------------------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_realtime_offline_row_matches_renoise_steps_and_warm_options(tmp_path):
    from realtime import offline_score

    base = {"policy": "ddim10", "solver": "sequential", "noise": "fresh", "n_episodes": 100, "success_rate": 0.5}
    rows = [
        {**base, "label": "k1", "warm_start": "renoise", "renoise_steps": 1, "warm_options": "", "score": 0.1},
        {**base, "label": "k3", "warm_start": "renoise", "renoise_steps": 3, "warm_options": "", "score": 0.3},
        {**base, "label": "rti-k3", "warm_start": "rti", "renoise_steps": "",
         "warm_options": '{"discrete_dims": [], "discrete_factor": 1.0, "steps": 3}', "score": 0.4},
        {**base, "label": "rti-k5", "warm_start": "rti", "renoise_steps": "",
         "warm_options": '{"discrete_dims": [], "discrete_factor": 1.0, "steps": 5}', "score": 0.6},
    ]  # fmt: skip
    path = _csv(tmp_path / "results.csv", rows)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        renoise = compose(
            "realtime", overrides=["solver=sequential", "policy=ddim10", "warm_start=renoise", "renoise_steps=3"]
        )
        rti = compose("realtime", overrides=["solver=sequential", "policy=ddim10", "warm_start=rti", "+rti.steps=5"])
    for cfg, label in ((renoise, "k3"), (rti, "rti-k5")):
        OmegaConf.update(cfg, "offline_results", str(path), force_add=True)
        setup = build_session(cfg, check_task=False)
        found = offline_score(cfg, setup)
        assert found is not None and found["label"] == label


def test_realtime_results_record_the_warm_options(tmp_path):
    import json
    import subprocess

    out = tmp_path / "out"
    args = ["threads=1", "engine=torch", "solver=sequential", "policy=ddim10", "warm_start=rti", "+rti.steps=4",
            "seeds=[100000]", "max_steps=9", "rate_hz=50", "offline_results=null", f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "realtime.py"), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["warm_start"] == "rti" and results["approximate"]
    assert results["warm_options"] == {"steps": 4, "discrete_dims": [], "discrete_factor": 1.0}
