"""Fixed-shape rounds (#26): operators per round outside the network and host reads per solve, counted with a
dispatch-mode counter (deterministic on a CPU); masked rows; ``check_every``; non-finite residuals; typed warm
states; the per-round trace hook."""

from __future__ import annotations

import math

import pytest
import torch

from policy_accel.profiling import OpCounter
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.session import Session
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise, SolveState
from policy_accel.solvers.newton import NewtonState, shift_jacobians

SCHEDULES = {"ddim10": ("ddim", 10), "ddim16": ("ddim", 16), "ddpm100": ("ddpm", 100)}
BOUNDED = [
    ("newton", {"jacobian": "broyden", "rounds": "fixed"}),
    ("newton", {"jacobian": "broyden", "recursion": "scan", "rounds": "fixed"}),
    ("newton", {"jacobian": "exact", "rounds": "fixed"}),
    ("newton", {"jacobian": "exact", "recursion": "scan", "rounds": "fixed"}),
    ("paradigms", {"rounds": "fixed"}),
]


def _problem(kind: str, steps: int, batch: int = 1, seed: int = 0):
    schedule = Schedule(ScheduleConfig(kind=kind, num_inference_steps=steps))
    g = torch.Generator().manual_seed(seed)
    noise = Noise.draw(steps, (batch, 16, 2), g)
    cond = torch.randn(batch, 36, generator=g).clamp(-1, 1)
    return schedule, noise, cond


def _counted(solver, net, schedule, noise, cond, **kwargs):
    """One solve after a warm-up solve (which builds the solver's buffers), counted."""
    with torch.inference_mode():
        solver.solve(net, schedule, noise, cond, **kwargs)
        counter = OpCounter()
        with counter:
            result = solver.solve(counter.wrap(net), schedule, noise, cond, **kwargs)
    return result, counter


@pytest.mark.parametrize("name,options", BOUNDED, ids=lambda x: x if isinstance(x, str) else str(x))
def test_operators_per_round_are_bounded_and_do_not_grow_with_steps(random_net, name, options):
    per_round = {}
    for label, (kind, steps) in SCHEDULES.items():
        schedule, noise, cond = _problem(kind, steps)
        result, counter = _counted(make_solver(name, **options), random_net, schedule, noise, cond)
        assert result.converged
        per_round[label] = counter.ops / result.iterations
        assert counter.host_reads <= result.iterations, (label, counter.host_reads, result.iterations)
        assert counter.network_calls == result.iterations
    assert max(per_round.values()) <= 40, per_round
    assert per_round["ddpm100"] <= 1.5 * per_round["ddim10"], per_round


@pytest.mark.parametrize(
    "name,options",
    [("newton", {"jacobian": "broyden", "rounds": "fixed"}), ("paradigms", {"tolerance": 1e-3, "rounds": "fixed"})],
)
@pytest.mark.parametrize("k", [2, 3])
def test_check_every_stays_exact_and_reads_the_device_every_k_rounds(random_net, name, options, k):
    schedule, noise, cond = _problem("ddim", 16, batch=2)
    with torch.inference_mode():
        reference = make_solver("sequential").solve(random_net, schedule, noise, cond)
        every_round = make_solver(name, **options).solve(random_net, schedule, noise, cond)
    result, counter = _counted(make_solver(name, check_every=k, **options), random_net, schedule, noise, cond)
    assert result.converged and (result.sample - reference.sample).abs().max() <= 1e-3
    # It stops at the first converged round it reads: the every-round count rounded up to a multiple of k.
    assert result.iterations == min(k * math.ceil(every_round.iterations / k), schedule.num_steps)
    assert counter.network_calls == result.iterations  # rounds reported are rounds run
    assert counter.host_reads <= result.iterations / k + 1


def test_masked_rows_match_batch_one_solves_with_check_every(random_net):
    """Rows converge at different rounds; masked (not removed), each row still equals its batch-1 solve and the
    sequential sample, and reports the round a batch-1 solve with the same check_every stops at."""
    schedule, noise, cond = _problem("ddim", 16, batch=3, seed=7)
    solver = make_solver("newton", jacobian="exact", check_every=2, rounds="fixed")
    with torch.inference_mode():
        reference = make_solver("sequential").solve(random_net, schedule, noise, cond)
        batched = solver.solve(random_net, schedule, noise, cond)
        singles = [
            solver.solve(random_net, schedule, Noise(noise.x_T[b : b + 1], noise.z[:, b : b + 1]), cond[b : b + 1])
            for b in range(3)
        ]
    assert len(set(s.iterations for s in singles)) > 1  # rows really converge at different rounds
    for b, single in enumerate(singles):
        assert batched.row_iterations[b] == single.iterations
        assert (batched.sample[b] - single.sample[0]).abs().max() <= 1e-5
        assert (batched.sample[b] - reference.sample[b]).abs().max() <= 1e-3


class _NaNAt:
    """The random network, but NaN at one timestep (or everywhere)."""

    def __init__(self, net, timestep: int | None = None):
        self.net, self.timestep = net, timestep

    def __call__(self, x, t, c):
        eps = self.net(x, t, c)
        bad = torch.ones_like(t, dtype=torch.bool) if self.timestep is None else t == self.timestep
        return torch.where(bad.view(-1, 1, 1), float("nan"), eps)


SOLVERS = [
    ("sequential", {}),
    ("paradigms", {}),
    ("parataa", {}),
    ("newton", {"jacobian": "exact"}),
    ("newton", {"jacobian": "broyden"}),
    ("newton", {"jacobian": "chord", "recursion": "scan"}),
    ("paradigms", {"rounds": "fixed"}),
    ("newton", {"jacobian": "broyden", "rounds": "fixed"}),
]


@pytest.mark.parametrize("name,options", SOLVERS, ids=lambda x: x if isinstance(x, str) else str(x))
@pytest.mark.parametrize("where", ["everywhere", "one_step"])
def test_a_non_finite_residual_never_passes_as_converged(random_net, name, options, where):
    schedule, noise, cond = _problem("ddim", 10, batch=2)
    net = _NaNAt(random_net, None if where == "everywhere" else int(schedule.timesteps[4]))
    with torch.inference_mode():
        result = make_solver(name, **options).solve(net, schedule, noise, cond)
    assert not result.converged and result.stop_reason == "non_finite"


def test_warm_states_of_the_wrong_kind_or_shape_are_refused(random_net):
    schedule, noise, cond = _problem("ddim", 10, batch=2)
    solver = make_solver("newton", jacobian="broyden")
    with torch.inference_mode():
        result = solver.solve(random_net, schedule, noise, cond)
        assert isinstance(result.state, NewtonState) and result.state.jacobians.shape == (10, 2, 32, 32)
        with pytest.raises(ValueError, match="SolveState"):
            solver.solve(random_net, schedule, noise, cond, warm={"jacobians": result.state.jacobians})
        with pytest.raises(ValueError, match="Jacobians have shape"):
            solver.solve(random_net, schedule, noise, cond, warm=NewtonState(result.trajectory, torch.zeros(3, 2)))
        with pytest.raises(ValueError, match="trajectory has shape"):
            make_solver("paradigms").solve(random_net, schedule, noise, cond, warm=SolveState(torch.zeros(5, 2)))


def test_newton_state_shifts_its_trajectory_and_jacobians_like_the_chunk():
    g = torch.Generator().manual_seed(0)
    state = NewtonState(torch.randn(11, 2, 16, 2, generator=g), torch.randn(10, 2, 32, 32, generator=g))
    shifted = state.shifted(8)
    torch.testing.assert_close(shifted.trajectory[..., :8, :], state.trajectory[..., 8:, :])
    torch.testing.assert_close(shifted.trajectory[..., 8:, :], state.trajectory[..., -1:, :].expand(11, 2, 8, 2))
    torch.testing.assert_close(shifted.jacobians, shift_jacobians(state.jacobians, 8, horizon=16))


def test_carried_jacobians_skip_the_jacobian_round_and_keep_the_answer(random_net):
    """A warm state's Jacobians replace the first round's finite differences (no D extra rows per state)."""
    schedule, noise, cond = _problem("ddim", 10, batch=1)
    solver = make_solver("newton", jacobian="broyden")
    with torch.inference_mode():
        reference = make_solver("sequential").solve(random_net, schedule, noise, cond)
        cold = solver.solve(random_net, schedule, noise, cond)
        warm = solver.solve(random_net, schedule, noise, cond, warm=cold.state)
    # No Jacobian rows in the warm solve (free rounds evaluate fewer than 10 steps after the first round).
    assert warm.nfe <= warm.iterations * 10 and cold.nfe >= 10 * 33
    assert warm.converged and (warm.sample - reference.sample).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["newton", "paradigms", "parataa"])
def test_trace_hook_sees_every_round(random_net, name):
    schedule, noise, cond = _problem("ddim", 10, batch=2)
    seen = []

    def hook(trace):
        seen.append((trace.iteration, trace.trajectory.clone(), trace.residual.shape, trace.done.shape))

    with torch.inference_mode():
        result = make_solver(name).solve(random_net, schedule, noise, cond, trace=hook)
    assert [s[0] for s in seen] == list(range(1, result.iterations + 1))
    assert all(s[2] == (2,) and s[3] == (2,) for s in seen)
    torch.testing.assert_close(seen[-1][1], result.trajectory)


def test_runner_labels_warm_starts_by_the_solvers_attribute_not_its_name(trained_policy):
    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=10)
    assert Session(trained_policy, make_solver("paradigms"), schedule, True).approximate
    assert not Session(trained_policy, make_solver("newton"), schedule, True).approximate
    relabelled = make_solver("newton")
    relabelled.exact_warm_start = False
    assert Session(trained_policy, relabelled, schedule, True).approximate
