"""Anytime solves, cold and warm: one round gives a finite chunk flagged unconverged; a budget of T rounds (every
solver's worst case) gives the exact sample. tests/test_solvers.py covers cold solves at 2 rounds and a time budget."""

from __future__ import annotations

import pytest
import torch

from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Budget, Noise, SolveState

STEPS = 16
PARALLEL = ["newton", "paradigms", "parataa"]


def _problem():
    """DDIM-16, batch 2, random conditioning."""
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=STEPS))
    g = torch.Generator().manual_seed(0)
    noise = Noise.draw(STEPS, (2, 16, 2), g)
    cond = torch.randn(2, 36, generator=g).clamp(-1, 1)
    return schedule, noise, cond, g


def _init(random_net, schedule, noise, cond, g):
    """The sequential solve, and a warm initial trajectory near (not at) it."""
    with torch.inference_mode():
        reference = make_solver("sequential").solve(random_net, schedule, noise, cond)
    init = reference.trajectory + 0.05 * torch.randn(reference.trajectory.shape, generator=g)
    init[0] = noise.x_T
    return reference, init


@pytest.mark.parametrize("name", PARALLEL)
@pytest.mark.parametrize("warm", [False, True])
def test_one_round_returns_a_finite_chunk_flagged_unconverged(random_net, name, warm):
    schedule, noise, cond, g = _problem()
    _, init = _init(random_net, schedule, noise, cond, g)
    with torch.inference_mode():
        result = make_solver(name).solve(
            random_net, schedule, noise, cond, warm=SolveState(init) if warm else None, budget=Budget(max_iterations=1)
        )
    assert not result.converged and result.stop_reason == "iteration_budget" and result.iterations == 1
    assert result.sample.shape == (2, 16, 2) and torch.isfinite(result.sample).all()


@pytest.mark.parametrize("name", PARALLEL)
@pytest.mark.parametrize("warm", [False, True])
def test_a_budget_of_t_rounds_returns_the_exact_sample(random_net, name, warm):
    schedule, noise, cond, g = _problem()
    reference, init = _init(random_net, schedule, noise, cond, g)
    options = {"tolerance": 1e-3} if name == "paradigms" else {}  # warm ParaDiGMS at tau 0.01 is not safe (README)
    with torch.inference_mode():
        result = make_solver(name, **options).solve(
            random_net,
            schedule,
            noise,
            cond,
            warm=SolveState(init) if warm else None,
            budget=Budget(max_iterations=STEPS),
        )
    assert result.converged and result.stop_reason == "converged" and result.iterations <= STEPS
    assert (result.sample - reference.sample).abs().max() <= 1e-3
