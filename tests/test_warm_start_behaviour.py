"""Warm starts behave as before the WarmStart protocol (issue #35): closed-loop PushT actions and inference records of
each warm-start kind on the sequential solver (whose numbers no parallel solver's tuning moves) match the ones
recorded with the code before the refactor (tests/data/warm_start_actions.json, made by ``main()`` below from commit
99d025c: ``PYTHONPATH=<that checkout> python tests/test_warm_start_behaviour.py OUT``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from policy_accel.experiment.build import build_session
from policy_accel.experiment.tasks import env_factory

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "warm_start_actions.json"
CONFIGS = {
    "cold_ddim4": ["+experiment=seq_ddim", "policy.schedule.num_inference_steps=4"],
    "renoise_ddimtr8_k2_coupled": ["+experiment=renoise_ddimtr8_k2"],
    "rti_ddim10_k3_clip": ["+experiment=rti_ddim10_k3", "rti.discrete_dims=[1]", "rti.discrete_factor=2.0"],
    "falcon_ddim10_e50": ["+experiment=falcon_ddim10_e05", "falcon.threshold=0.5"],
    "falcon_ddim10_explore": ["+experiment=falcon_ddim10_e05", "falcon.explore=0.3", "falcon.temperature=0.5"],
}
SEEDS, STEPS = [100000, 100001], 32


def closed_loop(overrides: list[str], root: Path = ROOT) -> dict:
    """Actions and records of a short closed-loop PushT run of two episodes in lockstep."""
    with initialize_config_dir(config_dir=str(root / "configs"), version_base=None):
        cfg = compose("rollout", overrides=[*overrides, "engine=torch", "threads=1", "check_exactness=true"])
    session = build_session(cfg).session
    envs = [env_factory("pusht")() for _ in SEEDS]
    obs = np.stack([e.reset(seed=s)[0] for e, s in zip(envs, SEEDS, strict=True)])
    session.reset(seed=SEEDS[0])
    out = {"approximate": session.approximate, "actions": [], "records": []}
    for _ in range(STEPS):
        action = session.select_action(obs)
        if len(session._queue) == session.policy.config.n_action_steps - 1:  # a new plan was made for this step
            r = session.last_plan.record
            out["records"].append([r.iterations, r.nfe, r.converged, r.stop_reason, r.warm, r.deviation])
        out["actions"].append(action.tolist())
        obs = np.stack([e.step(a)[0] for e, a in zip(envs, action, strict=True)])
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_warm_start_behaviour_is_unchanged(name):
    torch.set_num_threads(1)
    reference = json.loads(REFERENCE.read_text())[name]
    got = closed_loop(CONFIGS[name])
    assert got["approximate"] == reference["approximate"]
    np.testing.assert_allclose(np.array(got["actions"]), np.array(reference["actions"]), rtol=0, atol=1e-5)
    for mine, theirs in zip(got["records"], reference["records"], strict=True):
        assert mine[:5] == theirs[:5]  # rounds, network calls, converged, stop reason, warm
        assert (mine[5] is None) == (theirs[5] is None)


def main(out: str) -> None:
    torch.set_num_threads(1)
    root = Path(__import__("policy_accel").__file__).resolve().parents[1]
    Path(out).write_text(json.dumps({name: closed_loop(o, root) for name, o in CONFIGS.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
