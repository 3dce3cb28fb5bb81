"""Observation validation, action extraction and the warm-start session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.session import Session
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise, shift_chunk, step_noise
from policy_accel.solvers.newton import shift_jacobians
from policy_accel.warm_starts import tail_chain


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


def test_shift_chunk_and_its_filled_tail():
    x = torch.arange(6.0).view(1, 6, 1)
    assert shift_chunk(x, 2).flatten().tolist() == [2, 3, 4, 5, 5, 5]
    fill = torch.tensor([[[9.0], [8.0]]])
    assert shift_chunk(x, 2, fill).flatten().tolist() == [2, 3, 4, 5, 9, 8]
    assert x.flatten().tolist() == [0, 1, 2, 3, 4, 5]  # the input is left as it was


def test_shift_jacobians_moves_blocks_with_the_chunk():
    jac = torch.arange(16.0).view(1, 1, 4, 4)  # J[out, in] over 4 positions of a 1-D action
    shifted = shift_jacobians(jac, 2, horizon=4)[0, 0]
    assert shifted[:2, :2].tolist() == [[10.0, 11.0], [14.0, 15.0]]
    assert shifted[2, 2] == 15.0 and shifted[3, 3] == 15.0 and shifted[2, 3] == 0.0 and shifted[0, 3] == 0.0


@pytest.mark.parametrize("solver", ["paradigms", "parataa", "newton"])
@pytest.mark.parametrize("noise_policy", ["fresh", "coupled"])
def test_warm_started_runner_returns_the_sequential_sample_of_its_noise(trained_policy, solver, noise_policy):
    """Warm starts reuse the previous solve as the initial guess; the answer is still exact."""
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=16))
    options = {"tolerance": 1e-3} if solver == "paradigms" else {}
    session = Session(trained_policy, make_solver(solver, **options), schedule, True, noise_policy, seed=0)
    obs = np.random.default_rng(0).uniform(100, 400, (2, 2, 18))
    _, first, record = session.plan(obs)
    assert not record.warm  # the first inference of an episode is cold
    _, second, record = session.plan(obs + 1.0)
    assert record.warm
    noise = session._previous_noise
    with torch.inference_mode():
        cond = trained_policy.condition(obs + 1.0)
        reference = make_solver("sequential").solve(trained_policy.denoiser, schedule, noise, cond)
    assert second.converged and (second.sample - reference.sample).abs().max() <= 1e-3
    shared = torch.equal(noise.x_T[:, :8], first.trajectory[0][:, 8:])
    assert shared == (noise_policy == "coupled")  # coupled noise keeps the overlap's draws
    session.reset(seed=1)
    assert not session.plan(obs)[2].warm


@pytest.mark.parametrize(
    "solver,warm_start,approximate",
    [("paradigms", True, True), ("paradigms", False, False), ("newton", True, False), ("sequential", "renoise", True)],
)
def test_runner_labels_configurations_that_are_not_reliably_exact(trained_policy, solver, warm_start, approximate):
    """Warm paradigms' stopping test can pass early (0.24 off on Can), so it is labelled like re-noising."""
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=4))
    steps = 2 if warm_start == "renoise" else None
    session = Session(trained_policy, make_solver(solver), schedule, warm_start, renoise_steps=steps)
    assert session.approximate is approximate


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
def test_tail_chain_is_the_sampler_chain_of_a_denoiser_that_predicts_a_fixed_clean_sample(kind, steps):
    schedule = Schedule(ScheduleConfig(kind=kind, num_inference_steps=steps))
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 8, 2, generator=g) * 1.6 - 0.8
    noise = Noise.draw(steps, (2, 8, 2), g)

    def oracle(sample, timestep, cond):  # the epsilon of `clean` at the row's timestep
        index = torch.searchsorted(-schedule.timesteps, -timestep)  # timesteps descend
        s0 = schedule.sqrt_alpha_prod[index].view(-1, 1, 1)
        s1 = schedule.sqrt_beta_prod[index].view(-1, 1, 1)
        return (sample - s0 * clean) / s1

    with torch.inference_mode():
        reference = make_solver("sequential").solve(oracle, schedule, noise, torch.zeros(2, 1))
        chain = tail_chain(schedule, clean, noise.x_T, step_noise(schedule, noise))
    torch.testing.assert_close(chain[-1], reference.sample)
    torch.testing.assert_close(chain, reference.trajectory)


def test_chain_tail_fill_keeps_warm_starts_exact(trained_policy):
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=16))
    session = Session(trained_policy, make_solver("newton"), schedule, True, "coupled", seed=0, tail_fill="chain")
    obs = np.random.default_rng(0).uniform(100, 400, (2, 2, 18))
    session.plan(obs)
    _, second, record = session.plan(obs + 1.0)
    assert record.warm
    with torch.inference_mode():
        cond = trained_policy.condition(obs + 1.0)
        reference = make_solver("sequential").solve(trained_policy.denoiser, schedule, session._previous_noise, cond)
    assert second.converged and (second.sample - reference.sample).abs().max() <= 1e-3
    with pytest.raises(ValueError, match="tail_fill='extrapolate' is not allowed: expected one of repeat, chain"):
        Session(trained_policy, make_solver("newton"), schedule, True, tail_fill="extrapolate")


def test_unknown_noise_policy_is_rejected(trained_policy):
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=4))
    with pytest.raises(ValueError, match="noise='same' is not allowed: expected one of fresh, coupled"):
        Session(trained_policy, make_solver("sequential"), schedule, noise="same")


@pytest.mark.parametrize("batch", [1, 3])
def test_select_action_is_the_padded_history_plan_replayed_one_action_at_a_time(trained_policy, batch):
    """select_action owns the observation history (DP's start padding) and the action queue: it must give the
    actions of planning on that history every n_action_steps steps, with the same noise, warm starts included."""
    from policy_accel.observations import ObservationHistory

    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=4)
    cfg = trained_policy.config
    rng = np.random.default_rng(0)
    observations = rng.uniform(150, 350, (2 * cfg.n_action_steps, batch, cfg.obs_dim))

    def session():
        s = Session(trained_policy, make_solver("newton"), schedule, warm_start=True, noise="coupled")
        s.reset(seed=3)
        return s

    one_at_a_time = session()
    got = np.stack([one_at_a_time.select_action(obs) for obs in observations])
    by_hand, histories, expected = session(), [ObservationHistory(cfg.n_obs_steps) for _ in range(batch)], []
    for step, obs in enumerate(observations):
        for h, row in zip(histories, obs, strict=True):
            h.push(row)
        if step % cfg.n_action_steps == 0:
            chunk = by_hand.plan(np.stack([h.stacked() for h in histories])).actions
        expected.append(chunk[:, step % cfg.n_action_steps])
    np.testing.assert_array_equal(got, np.stack(expected))
    assert got.shape == (2 * cfg.n_action_steps, batch, cfg.action_dim)
    assert one_at_a_time.last_plan.record.warm  # the second chunk was warm-started from the first
    with pytest.raises(ValueError, match="rows"):
        one_at_a_time.select_action(observations[0][:1] if batch > 1 else np.repeat(observations[0], 2, axis=0))
    one_at_a_time.reset()
    one_at_a_time.select_action(observations[0][:1])  # a new episode may change the batch


def test_select_action_refuses_a_history_shaped_observation(trained_policy):
    s = Session(trained_policy, make_solver("sequential"), trained_policy.schedule(kind="ddim", num_inference_steps=2))
    with pytest.raises(ValueError, match=r"shape \(B, 18\)"):
        s.select_action(np.zeros((1, 2, 18)))
