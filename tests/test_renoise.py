"""The APPROXIMATE re-noised warm start: Schedule.tail keeps the full chain's alphas, the session re-noises the
shifted previous sample and runs only the tail, the first inference stays cold, and the run is labelled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.session import Session
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise, shift_chunk

TABLES = ("timesteps", "sqrt_alpha_prod", "sqrt_beta_prod", "coef_x0", "coef_y", "noise_scale", "variance")


@pytest.mark.parametrize("kind,steps", [("ddim", 10), ("ddpm", 100), ("ddpm", 10)])
def test_tail_keeps_each_steps_own_coefficients(kind, steps):
    full = Schedule(ScheduleConfig(kind=kind, num_inference_steps=steps))
    for k in (1, 3, steps):
        tail = full.tail(k)
        assert tail.num_steps == k and tail.is_tail == (k < steps) and tail.is_ode == full.is_ode
        for name in TABLES + ("linear_coef",):
            torch.testing.assert_close(getattr(tail, name), getattr(full, name)[steps - k :], rtol=0, atol=0)
    assert full.tail(5).tail(2).timesteps.tolist() == full.tail(2).timesteps.tolist()
    assert full.tail(3).to("cpu").timesteps.tolist() == full.tail(3).timesteps.tolist()  # `to` keeps the cut


def test_ddim10_tail_starts_at_the_documented_levels():
    full = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=10))
    assert full.tail(2).timesteps.tolist() == [10, 0] and full.tail(3).timesteps.tolist() == [20, 10, 0]


@pytest.mark.parametrize("kind,steps,t", [("ddim", 10, 20), ("ddpm", 100, 9)])
def test_add_noise_is_diffusers_forward_process_at_the_tails_first_timestep(kind, steps, t):
    config = ScheduleConfig(kind=kind, num_inference_steps=steps)
    tail = Schedule(config).tail(3 if kind == "ddim" else 10)
    assert int(tail.timesteps[0]) == t
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 16, 2, generator=g) * 2 - 1, torch.randn(2, 16, 2, generator=g)
    expected = config.make_scheduler().add_noise(x0, eps, torch.tensor([t]))
    torch.testing.assert_close(tail.add_noise(x0, eps), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,steps,k", [("ddim", 10, 3), ("ddpm", 10, 4), ("ddim", 16, 16)])
def test_a_chain_over_the_tail_from_the_full_chains_state_ends_at_the_full_sample(random_net, kind, steps, k):
    """The truncated chain is the full chain's last k steps, alphas included (DDIM's a_prev, DDPM's variance)."""
    full = Schedule(ScheduleConfig(kind=kind, num_inference_steps=steps))
    noise = Noise.draw(steps, (2, 16, 2), torch.Generator().manual_seed(1))
    cond = torch.randn(2, 36, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    sequential = make_solver("sequential")
    with torch.inference_mode():
        whole = sequential.solve(random_net, full, noise, cond)
        tail_noise = Noise(whole.trajectory[steps - k], noise.z[steps - k :])
        part = sequential.solve(random_net, full.tail(k), tail_noise, cond)
    torch.testing.assert_close(part.sample, whole.sample, rtol=0, atol=1e-6)
    assert part.iterations == k


@pytest.mark.parametrize("k", [0, 11])
def test_bad_tail_length_is_rejected(k):
    with pytest.raises(ValueError, match="tail length"):
        Schedule(ScheduleConfig(kind="ddim", num_inference_steps=10)).tail(k)


def _obs(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(100, 400, (batch, 2, 18))


@pytest.mark.parametrize("noise_policy", ["fresh", "coupled"])
def test_renoise_runner_is_cold_first_then_runs_only_the_tail(trained_policy, noise_policy):
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=10))
    session = Session(
        trained_policy, make_solver("sequential"), schedule, "renoise", noise_policy, seed=0, renoise_steps=3
    )
    assert session.approximate
    obs = _obs()
    actions, first, record = session.plan(obs)
    assert not record.warm and first.iterations == 10 and actions.shape == (2, 8, 2)  # first inference: cold
    for step in range(1, 4):
        actions, result, record = session.plan(obs + step)
        assert record.warm and result.iterations == 3 and record.nfe == 3 * 2 and record.converged
        assert actions.shape == (2, 8, 2) and np.isfinite(actions).all() and result.sample.shape == (2, 16, 2)
    session.reset(seed=1)
    assert session.plan(obs)[1].iterations == 10  # a new episode starts cold again


def test_renoise_runner_finishes_the_shifted_renoised_previous_sample(trained_policy):
    """Wiring: the warm chunk is the tail solve from sqrt(abar) shift(previous) + sqrt(1 - abar) x_T of this draw."""
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=10))
    session = Session(trained_policy, make_solver("sequential"), schedule, "renoise", seed=0, renoise_steps=2)
    obs = _obs()
    _, first, _ = session.plan(obs)
    _, second, _ = session.plan(obs + 1.0)
    g = torch.Generator().manual_seed(0)
    trained_policy.draw_noise(schedule, 2, g)  # the first inference's draw
    noise = trained_policy.draw_noise(schedule, 2, g)
    tail = schedule.tail(2)
    start = (tail.sqrt_alpha_prod[0] * shift_chunk(first.sample, 8)) + tail.sqrt_beta_prod[0] * noise.x_T
    with torch.inference_mode():
        cond = trained_policy.condition(obs + 1.0)
        expected = make_solver("sequential").solve(trained_policy.denoiser, tail, Noise(start, noise.z[8:]), cond)
    torch.testing.assert_close(second.sample, expected.sample, rtol=0, atol=1e-6)


def test_renoise_over_the_whole_ddpm_schedule_reduces_to_a_cold_solve(trained_policy):
    """k = T re-noises to t = 99, where sqrt(abar) = 5e-4: the previous chunk's weight vanishes and the warm step
    is the plain cold solve of the same draws (the generator is consumed identically)."""
    schedule = Schedule(ScheduleConfig(kind="ddpm", num_inference_steps=100))
    assert float(schedule.sqrt_alpha_prod[0]) < 1e-3
    solver = make_solver("sequential")
    renoise = Session(trained_policy, solver, schedule, "renoise", seed=0, renoise_steps=100)
    cold = Session(trained_policy, solver, schedule, False, seed=0)
    obs = _obs(1)
    for step in range(3):
        _, result, record = renoise.plan(obs + step)
        _, reference, _ = cold.plan(obs + step)
        assert record.warm == (step > 0) and result.iterations == 100
        assert (result.sample - reference.sample).abs().max() <= 1e-5  # normalized; measured 6e-8


def test_renoise_with_a_parallel_solver_on_the_tail(trained_policy):
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=16))
    session = Session(trained_policy, make_solver("newton"), schedule, "renoise", seed=0, renoise_steps=8)
    session.check_exactness = True  # deviation is measured on the chain the solver solved: the tail
    obs = _obs(1)
    session.plan(obs)
    actions, result, record = session.plan(obs + 1.0)
    # Newton solves the 8-step tail in fewer rounds than its 8 steps (5 measured), to the sequential tail's answer
    assert record.warm and result.iterations < 8 and result.trajectory.shape[0] == 9
    assert np.isfinite(actions).all() and record.deviation is not None and record.deviation <= 1e-3
    sequential = Session(trained_policy, make_solver("sequential"), schedule, "renoise", seed=0, renoise_steps=8)
    sequential.plan(obs)
    assert (sequential.plan(obs + 1.0).result.sample - result.sample).abs().max() <= 1e-3


@pytest.mark.parametrize(
    "warm_start,steps,match",
    [
        ("renoise", None, "needs renoise_steps in \\[1, 10\\]"),
        ("renoise", 11, "needs renoise_steps in \\[1, 10\\]"),
        ("renoise", 0, "renoise_steps=0 is not allowed"),
        (True, 3, "only used with warm_start='renoise'"),
        (False, 3, "only used with warm_start='renoise'"),
        ("exact", None, "unknown warm_start 'exact'"),
    ],
)
def test_bad_renoise_options_are_rejected(trained_policy, warm_start, steps, match):
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=10))
    with pytest.raises(ValueError, match=match):
        Session(trained_policy, make_solver("sequential"), schedule, warm_start, renoise_steps=steps)


@pytest.mark.parametrize("warm_start", [False, True])
def test_exact_warm_start_options_are_not_approximate(trained_policy, warm_start):
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=4))
    session = Session(trained_policy, make_solver("newton"), schedule, warm_start, check_exactness=True)
    assert not session.approximate
    session.plan(_obs(1))
    record = session.plan(_obs(1)).record
    # the sequential sampler's answer for the same noise (cold or warm), and warm exactly when asked
    assert record.converged and record.deviation is not None and record.deviation <= 1e-3
    assert record.warm == warm_start


@pytest.mark.parametrize("steps,t", [(4, 24), (8, 11)])
def test_a_one_step_trailing_tail_denoises_from_a_real_noise_level_and_a_leading_one_does_not(steps, t):
    """Why the front's re-noise configurations use trailing spacing: trailing DDIM's last step starts at a real
    noise level and goes straight to the clean sample (one call does a full denoising step), while leading DDIM's
    last step sits at t = 0 (sigma 0.025): re-noising there adds almost no noise, so the call can barely move it."""
    trailing = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=steps, timestep_spacing="trailing")).tail(1)
    leading = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=steps)).tail(1)
    assert int(trailing.timesteps[0]) == t and float(trailing.sqrt_beta_prod[0]) > 0.19
    assert float(trailing.coef_x0[0]) == 1.0 and float(trailing.coef_y[0]) == 0.0  # x_prev = predicted x0
    assert int(leading.timesteps[0]) == 0 and float(leading.sqrt_beta_prod[0]) < 0.03
