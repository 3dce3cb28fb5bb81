"""The sequential solver is the sampler Diffusion Policy runs: a plain diffusers loop, same noise."""

from __future__ import annotations

import pytest
import torch

from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Budget, Noise


def diffusers_loop(net, config: ScheduleConfig, cond: torch.Tensor, shape, seed: int) -> tuple[torch.Tensor, Noise]:
    """Diffusion Policy's conditional_sample, and the noise it drew, replayed from the same generator."""
    scheduler = config.make_scheduler()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x_T = x.clone()
    z = torch.zeros(len(scheduler.timesteps), *shape)
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            eps = net(x, t, cond)
            if config.kind == "ddpm" and t > 0:
                state = g.get_state()
                z[j] = torch.randn(shape, generator=g)
                g.set_state(state)
            x = scheduler.step(eps, t, x, generator=g).prev_sample
    return x, Noise(x_T, z)


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 10), ("ddim", 16), ("ddim", 100)])
@pytest.mark.parametrize("batch", [1, 4])
def test_sequential_matches_diffusers_loop(random_net, kind, steps, batch):
    config = ScheduleConfig(kind=kind, num_inference_steps=steps)
    cond = torch.randn(batch, 36, generator=torch.Generator().manual_seed(1))
    expected, noise = diffusers_loop(random_net, config, cond, (batch, 16, 2), seed=2)
    with torch.no_grad():
        result = make_solver("sequential").solve(random_net, Schedule(config), noise, cond)
    assert result.converged and result.iterations == steps and result.nfe == steps * batch
    assert (result.sample - expected).abs().max() <= 1e-6


def test_sequential_budget_returns_a_flagged_finite_estimate(random_net):
    schedule = Schedule(ScheduleConfig())
    noise = Noise.draw(100, (2, 16, 2), torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = make_solver("sequential").solve(random_net, schedule, noise, torch.zeros(2, 36), budget=Budget(10))
    assert not result.converged and result.stop_reason == "iteration_budget" and result.iterations == 10
    assert result.sample.shape == (2, 16, 2) and torch.isfinite(result.sample).all()
    assert result.sample.abs().max() <= 1.0  # the clipped x0 estimate
