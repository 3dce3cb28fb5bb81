"""Observation validation, action extraction and the warm-start runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy_accel.runner import PolicyRunner, shift_horizon
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver


@pytest.mark.parametrize(
    "obs,match",
    [
        (np.zeros((1, 18)), r"shape \(B, 2, 18\)"),
        (np.zeros((1, 3, 18)), r"shape \(B, 2, 18\)"),
        (np.zeros((1, 2, 20)), r"shape \(B, 2, 18\)"),
        (np.full((1, 2, 18), np.nan), "NaN or inf"),
        (np.full((1, 2, 18), np.inf), "NaN or inf"),
    ],
)
def test_bad_observations_are_rejected(trained_policy, obs, match):
    with pytest.raises(ValueError, match=match):
        trained_policy.condition(obs)


def test_predict_action_shapes_and_range(trained_policy):
    obs = np.random.default_rng(0).uniform(100, 400, (3, 2, 18))
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=4))
    actions, result = trained_policy.predict_action(obs, make_solver("sequential"), schedule)
    assert actions.shape == (3, 8, 2) and np.isfinite(actions).all()
    assert result.sample.shape == (3, 16, 2)
    # Clipped x0 keeps normalized actions in [-1, 1], so raw actions stay inside the training range.
    lo, hi = (
        trained_policy.action_normalizer.stats["min"].numpy(),
        trained_policy.action_normalizer.stats["max"].numpy(),
    )
    assert (actions >= lo - 1e-3).all() and (actions <= hi + 1e-3).all()


def test_shift_horizon():
    x = torch.arange(6.0).view(1, 6, 1)
    assert shift_horizon(x, 2).flatten().tolist() == [2, 3, 4, 5, 5, 5]
    fill = torch.tensor([[[9.0], [8.0]]])
    assert shift_horizon(x, 2, fill).flatten().tolist() == [2, 3, 4, 5, 9, 8]


@pytest.mark.parametrize("solver", ["paradigms", "newton"])
def test_warm_started_runner_returns_the_sequential_sample_of_its_noise(trained_policy, solver):
    """Warm starts reuse the previous solve as the initial guess; the answer is still exact."""
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=16))
    options = {"tolerance": 1e-3} if solver == "paradigms" else {}
    runner = PolicyRunner(trained_policy, make_solver(solver, **options), schedule, warm_start=True, seed=0)
    obs = np.random.default_rng(0).uniform(100, 400, (1, 2, 18))
    _, first, record = runner.plan(obs)
    assert not record.warm
    _, second, record = runner.plan(obs + 1.0)
    assert record.warm
    noise = runner._previous[1]
    with torch.inference_mode():
        cond = trained_policy.condition(obs + 1.0)
        reference = make_solver("sequential").solve(trained_policy.denoiser, schedule, noise, cond)
    assert (second.sample - reference.sample).abs().max() <= 1e-3
    # The new x_T keeps the previous x_T's positions 8.. (shifted by the 8 executed actions).
    assert torch.equal(noise.x_T[:, :8], first.trajectory[0][:, 8:])
