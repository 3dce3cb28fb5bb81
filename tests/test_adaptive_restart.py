"""The per-inference restart level (``warm_start=adaptive``, policy_accel/warm_starts.py AdaptiveRestart): an
APPROXIMATE tail restart whose number of tail steps follows how far the observation moved; one class, its config
mapping (``adaptive.*``) and configs/experiment/adaptive_ddimtr8_k2_8.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from policy_accel.experiment.build import build_session
from policy_accel.experiment.results import label
from policy_accel.session import Session
from policy_accel.solvers import make_solver
from policy_accel.warm_starts import AdaptiveConfig, AdaptiveRestart, warm_start_of

ROOT = Path(__file__).resolve().parents[1]


def _obs(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(100, 400, size=(batch, 2, 18))


def _session(policy, steps: int = 8, **options) -> Session:
    schedule = policy.schedule(kind="ddim", num_inference_steps=steps, timestep_spacing="trailing")
    return Session(policy, make_solver("sequential"), schedule, "adaptive", seed=0, warm_options=options)


def test_levels_follow_the_observation_change():
    warm = AdaptiveRestart(AdaptiveConfig(min_steps=2, max_steps=8, scale=0.4))
    warm._cond = torch.zeros(4, 10)
    moved = torch.tensor([0.0, 0.1, 0.2, 5.0]).view(4, 1).expand(4, 10)  # RMS change 0, 0.1, 0.2, 5
    assert warm.levels(moved, 8).tolist() == [2, 4, 5, 8]  # 2 + 6 * min(1, d / 0.4), rounded


def test_a_still_observation_runs_the_short_tail_and_a_jump_is_a_cold_solve(trained_policy):
    session = _session(trained_policy, min_steps=2, max_steps=None, scale=0.1)
    assert session.approximate
    session.reset(seed=0)
    obs = _obs(0)
    first = session.plan(obs).record
    still = session.plan(obs).record
    assert (first.iterations, first.warm) == (8, False)
    assert (still.iterations, still.nfe, still.warm) == (2, 2, True)
    # a jump far past `scale`: the whole schedule from this inference's x_T, as a cold session with the same draws
    cold = Session(trained_policy, make_solver("sequential"), session.schedule, False, seed=0)
    cold.reset(seed=0)
    for o in (obs, obs, obs + 200.0):
        reference = cold.plan(o)
    jump = session.plan(obs + 200.0)
    assert (jump.record.iterations, jump.record.warm) == (8, False)
    torch.testing.assert_close(jump.result.sample, reference.result.sample, rtol=0, atol=0)


def test_rows_restart_at_their_own_level_in_one_inference(trained_policy):
    session = _session(trained_policy, min_steps=1, max_steps=6, scale=0.1)
    session.reset(seed=0)
    obs = _obs(1, batch=2)
    session.plan(obs)
    moved = obs.copy()
    moved[1] += 200.0  # only the second row's observation moves
    plan = session.plan(moved)
    assert plan.record.row_iterations == [1, 6] and plan.record.nfe == 7 and plan.record.warm
    assert np.isfinite(plan.actions).all()


def test_results_labels_and_overrides_come_from_the_object():
    warm = AdaptiveRestart(AdaptiveConfig(min_steps=2, max_steps=8, scale=0.3))
    record = warm.record()
    assert record == {
        "warm_start": "adaptive",
        "renoise_steps": None,
        "warm_options": {"min_steps": 2, "max_steps": 8, "scale": 0.3, "renoise": True},
        "tail_fill": "repeat",
    }
    assert warm_start_of(record).options() == record["warm_options"]
    row = {"policy": "ddimtr8", "solver": "sequential", "approximate": True, **record}
    assert label(row) == "ddimtr8 sequential adaptive-k2-8-s0.3 (approx.)"
    assert "adaptive.scale=0.3" in warm.overrides() and "warm_start=adaptive" in warm.overrides()


def test_the_named_configuration_builds_approximate():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("rollout", overrides=["+experiment=adaptive_ddimtr8_k2_8", "task=can", "n_episodes=1"])
    setup = build_session(cfg)
    assert setup.warm_start == "adaptive" and setup.session.approximate
    assert setup.session.warm.config == AdaptiveConfig(min_steps=2, max_steps=8, scale=0.3)
    assert setup.schedule.config.spacing == "trailing" and setup.schedule.num_steps == 8


@pytest.mark.parametrize(
    "options,match",
    [
        ({"min_steps": 5, "max_steps": 3}, "min_steps <= max_steps"),
        ({"max_steps": 9}, "max_steps <= 8"),
        ({"scale": 0.0}, "adaptive.scale=0.0 is not allowed"),
        ({"renoise": "yes"}, "adaptive.renoise='yes' is not allowed"),
        ({"tail": 3}, "adaptive.tail=3 is not allowed: not an option"),
    ],
)
def test_bad_knobs_are_refused(trained_policy, options, match):
    with pytest.raises(ValueError, match=match):
        _session(trained_policy, **options)
