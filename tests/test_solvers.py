"""Exactness: every parallel solver, given the same noise, returns the sequential sample within its
stated tolerance, in at most T rounds: random and trained networks, DDPM and DDIM, batch 1 and 4."""

from __future__ import annotations

import pytest
import torch

from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Budget, Noise, SolveState
from policy_accel.solvers.linear import BlockRecursion, recursion_block

# (solver, options, max |parallel - sequential| in normalized action units)
EXACT_SOLVERS = [
    ("paradigms", {}, 1e-3),  # default tau = 0.01
    ("paradigms", {"tolerance": 1e-3}, 1e-3),
    ("parataa", {}, 1e-3),
    ("newton", {"jacobian": "exact"}, 1e-3),
    ("newton", {"jacobian": "exact", "derivatives": "forward_ad"}, 1e-3),
    ("newton", {"jacobian": "chord"}, 1e-3),
    ("newton", {"jacobian": "broyden"}, 1e-3),
    # The CPU runs free-shape rounds by default (solvers/base.py ROUND_SHAPES); the fixed ones (CUDA's) too:
    ("paradigms", {"rounds": "fixed"}, 1e-3),
    ("newton", {"jacobian": "exact", "rounds": "fixed"}, 1e-3),
    ("newton", {"jacobian": "broyden", "rounds": "fixed"}, 1e-3),
]
SAMPLERS = [("ddpm", 100), ("ddim", 16)]
# Tightened tolerances: the solvers then agree with the sequential sampler to float32 round-off.
TIGHT_SOLVERS = [
    ("paradigms", {"tolerance": 1e-5}, 1e-5),
    ("parataa", {"tol_abs": 1e-7, "tol_rel": 0.0}, 1e-5),
    ("newton", {"jacobian": "broyden", "tolerance": 1e-7, "step_tolerance": 1e-7}, 1e-5),
]


def _ids(case):
    name, options, _ = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def _solve_both(net, kind, steps, batch, name, options, cond_dim, seed=0, init=None):
    schedule = Schedule(ScheduleConfig(kind=kind, num_inference_steps=steps))
    g = torch.Generator().manual_seed(seed)
    noise = Noise.draw(steps, (batch, 16, 2), g)
    cond = torch.randn(batch, cond_dim, generator=g).clamp(-1, 1)
    with torch.inference_mode():
        reference = make_solver("sequential").solve(net, schedule, noise, cond)
        warm = None if init is None else SolveState(init)
        result = make_solver(name, **options).solve(net, schedule, noise, cond, warm=warm)
    return reference, result


@pytest.mark.parametrize("case", EXACT_SOLVERS + TIGHT_SOLVERS, ids=_ids)
@pytest.mark.parametrize("kind,steps", SAMPLERS)
@pytest.mark.parametrize("batch", [1, 4])
def test_random_network(random_net, case, kind, steps, batch):
    name, options, atol = case
    reference, result = _solve_both(random_net, kind, steps, batch, name, options, cond_dim=36)
    assert result.converged and result.stop_reason == "converged"
    assert 1 <= result.iterations <= steps
    assert result.sample.shape == (batch, 16, 2)
    assert (result.sample - reference.sample).abs().max() <= atol


@pytest.mark.parametrize("case", [c for c in EXACT_SOLVERS if c[1].get("jacobian") != "exact"], ids=_ids)
@pytest.mark.parametrize("kind,steps", SAMPLERS)
@pytest.mark.parametrize("batch", [1, 4])
def test_trained_checkpoint(trained_policy, case, kind, steps, batch):
    name, options, atol = case
    reference, result = _solve_both(trained_policy.denoiser, kind, steps, batch, name, options, cond_dim=36, seed=3)
    assert result.converged and 1 <= result.iterations <= steps
    assert (result.sample - reference.sample).abs().max() <= atol


@pytest.mark.parametrize("derivatives", ["finite_difference", "forward_ad"])
def test_trained_checkpoint_exact_newton_is_exact_in_few_rounds(trained_policy, derivatives):
    options = {"jacobian": "exact", "derivatives": derivatives}
    reference, result = _solve_both(trained_policy.denoiser, "ddim", 16, 1, "newton", options, 36)
    assert result.converged and result.iterations <= 16
    assert (result.sample - reference.sample).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["paradigms", "parataa", "newton"])
def test_any_initial_trajectory_converges_to_the_sequential_sample(random_net, name):
    """A warm start only changes the starting guess, never the answer."""
    init = torch.randn(17, 2, 16, 2, generator=torch.Generator().manual_seed(5))
    options = {"tolerance": 1e-3} if name == "paradigms" else {}
    reference, result = _solve_both(random_net, "ddim", 16, 2, name, options, 36, init=init)
    assert result.converged
    assert (result.sample - reference.sample).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["sequential", "paradigms", "parataa", "newton"])
@pytest.mark.parametrize(
    "budget,reason", [(Budget(max_iterations=2), "iteration_budget"), (Budget(time_s=1e-6), "time_budget")]
)
def test_budget_is_reported_and_the_chunk_is_still_valid(random_net, name, budget, reason):
    schedule = Schedule(ScheduleConfig())
    noise = Noise.draw(100, (2, 16, 2), torch.Generator().manual_seed(0))
    with torch.inference_mode():
        result = make_solver(name).solve(random_net, schedule, noise, torch.zeros(2, 36), budget=budget)
    assert not result.converged and result.stop_reason == reason
    assert result.sample.shape == (2, 16, 2) and torch.isfinite(result.sample).all()
    assert result.iterations <= 2


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("picard", {}, "unknown solver 'picard'"),
        ("paradigms", {"windw": 8}, "windw=8 is not allowed: not an option of solver 'paradigms'"),
        ("paradigms", {"window": 0}, "window"),
        ("parataa", {"order": 0}, "order"),
        ("newton", {"jacobian": "secant"}, "jacobian='secant' is not allowed: expected one of"),
        ("newton", {"tolerance": -1}, "tolerance"),
        ("newton", {"step_tolerance": 0.0}, "step_tolerance"),
        ("newton", {"recursion": "cr"}, "recursion='cr'"),
        ("newton", {"derivatives": "complex_step"}, "derivatives='complex_step'"),
    ],
)
def test_bad_solver_names_and_options_fail_clearly(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_solver(name, **options)


def test_mismatched_noise_and_init_are_rejected(random_net):
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=16))
    noise = Noise.draw(16, (1, 16, 2))
    solver = make_solver("paradigms")
    with pytest.raises(ValueError, match="noise.z"):
        solver.solve(random_net, schedule, Noise.draw(10, (1, 16, 2)), torch.zeros(1, 36))
    with pytest.raises(ValueError, match="global_cond batch"):
        solver.solve(random_net, schedule, noise, torch.zeros(2, 36))
    with pytest.raises(ValueError, match="warm state trajectory has shape"):
        solver.solve(random_net, schedule, noise, torch.zeros(1, 36), warm=SolveState(torch.zeros(5, 1, 16, 2)))


@pytest.mark.parametrize("kwargs", [{"max_iterations": 0}, {"time_s": 0.0}])
def test_bad_budget_is_rejected(kwargs):
    with pytest.raises(ValueError):
        Budget(**kwargs)


def _affine_recursion(coupling: torch.Tensor, offsets: torch.Tensor, method: str) -> torch.Tensor:
    """d_1..d_L of d_{j+1} = A_j d_j + c_j (d_0 = 0) through BlockRecursion, as Newton writes it (both negated)."""
    L, B, D = offsets.shape
    rec = BlockRecursion(L, B, D, recursion_block(method, L, B, D), offsets.dtype, offsets.device)
    torch.neg(coupling, out=rec.source[:L])
    torch.neg(offsets.unsqueeze(-1), out=rec.offsets)
    rec.load(torch.ones(1, B, 1, 1, dtype=torch.bool))
    return -rec.solve().squeeze(-1)


def test_block_recursion_scan_equals_loop_equals_the_sequential_recursion():
    g = torch.Generator().manual_seed(0)
    coupling = 0.3 * torch.randn(37, 2, 5, 5, generator=g, dtype=torch.float64)
    offsets = torch.randn(37, 2, 5, generator=g, dtype=torch.float64)
    loop = _affine_recursion(coupling, offsets, "loop")
    torch.testing.assert_close(_affine_recursion(coupling, offsets, "scan"), loop)
    d = torch.zeros(2, 5, dtype=torch.float64)
    for j in range(37):
        d = (coupling[j] @ d.unsqueeze(-1)).squeeze(-1) + offsets[j]
        torch.testing.assert_close(loop[j], d)


@pytest.mark.parametrize("jacobian", ["exact", "broyden"])
def test_newton_batch_rows_converge_like_batch_one_solves(random_net, jacobian):
    """Rows leave the batch when they converge: each row's round count is its batch-1 count."""
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=16))
    g = torch.Generator().manual_seed(7)
    noise = Noise.draw(16, (3, 16, 2), g)
    cond = torch.randn(3, 36, generator=g).clamp(-1, 1)
    solver = make_solver("newton", jacobian=jacobian)
    with torch.inference_mode():
        batched = solver.solve(random_net, schedule, noise, cond)
        for b in range(3):
            row = Noise(noise.x_T[b : b + 1], noise.z[:, b : b + 1])
            single = solver.solve(random_net, schedule, row, cond[b : b + 1])
            assert batched.row_iterations[b] == single.iterations
            assert (batched.sample[b] - single.sample[0]).abs().max() <= 1e-5
    assert batched.iterations == max(batched.row_iterations)


def test_cuda_graphs_refuse_a_cpu_model(random_net):
    from policy_accel.model.graphs import GraphedDenoiser

    with pytest.raises(ValueError, match="CUDA"):
        GraphedDenoiser(random_net)


def test_forward_jacobians_match_autograd_and_finite_differences_come_close(trained_policy):
    """Forward-mode Jacobians equal reverse-mode autograd's to rounding; the workspace's finite differences (read
    from a chord solve's first round, taken at the cold trajectory) are off by up to ~1e-2."""
    from policy_accel.solvers.newton import forward_jacobians

    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=4))
    g = torch.Generator().manual_seed(2)
    noise = Noise.draw(4, (2, 16, 2), g)
    cond = torch.randn(2, 36, generator=g).clamp(-1, 1)
    states = noise.x_T.expand(4, 2, 16, 2)  # the cold trajectory's states
    steps = torch.arange(4)
    with torch.inference_mode():
        stepped, exact = forward_jacobians(trained_policy.denoiser, schedule, states, steps, cond)
        chord = make_solver("newton", jacobian="chord").solve(
            trained_policy.denoiser, schedule, noise, cond, budget=Budget(max_iterations=1)
        )
    approximate = chord.state.jacobians
    for level in range(4):
        for row in range(2):
            index = steps[level : level + 1]

            def step(y, row=row, index=index):
                eps = trained_policy.model(y.view(1, 16, 2), schedule.timesteps[index], cond[row : row + 1])
                return schedule.step(y.view(1, 16, 2), eps, index).flatten()

            reference = torch.autograd.functional.jacobian(step, states[level, row].flatten().clone())
            torch.testing.assert_close(exact[level, row], reference, atol=2e-5, rtol=1e-4)
            assert (approximate[level, row] - reference).abs().max() <= 5e-2
            # a batched network call and a single-row one round differently in float32 (1.1e-5 seen on a clean clone)
            torch.testing.assert_close(
                stepped[level, row].flatten(), step(states[level, row].flatten()), atol=1e-4, rtol=1e-4
            )
