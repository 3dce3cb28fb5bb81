"""Free-shape rounds (the CPU default): a round evaluates only what can still change (Newton's unfinished suffix,
ParaDiGMS' live window), and returns what the fixed-shape rounds return, in as many rounds or fewer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from policy_accel.profiling import OpCounter
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise, free_rounds

NEWTON = [{"jacobian": "broyden"}, {"jacobian": "chord"}, {"jacobian": "exact"}]


def _problem(kind: str, steps: int, batch: int, seed: int = 0):
    schedule = Schedule(ScheduleConfig(kind=kind, num_inference_steps=steps))
    g = torch.Generator().manual_seed(seed)
    noise = Noise.draw(steps, (batch, 16, 2), g)
    cond = torch.randn(batch, 36, generator=g).clamp(-1, 1)
    return schedule, noise, cond


def _warm_guess(trajectory: torch.Tensor, noise: Noise, seed: int = 1) -> torch.Tensor:
    """A good but imperfect initial trajectory: the answer, perturbed."""
    g = torch.Generator().manual_seed(seed)
    init = trajectory + 1e-2 * torch.randn(trajectory.shape, generator=g)
    init[0] = noise.x_T
    return init


class _Rows:
    """The denoiser, recording the rows of every call."""

    def __init__(self, net):
        self.net, self.rows = net, []

    def __call__(self, x, t, c):
        self.rows.append(x.shape[0])
        return self.net(x, t, c)


def test_auto_is_free_on_the_cpu_and_fixed_on_cuda():
    assert free_rounds("auto", torch.device("cpu"))
    assert not free_rounds("auto", torch.device("cuda"))
    assert free_rounds("free", torch.device("cuda")) and not free_rounds("fixed", torch.device("cpu"))


@pytest.mark.parametrize("options", NEWTON, ids=lambda o: o["jacobian"])
@pytest.mark.parametrize("kind,steps,batch", [("ddpm", 100, 1), ("ddim", 16, 1), ("ddim", 16, 3)])
def test_newton_free_rounds_return_the_fixed_rounds_answer_with_fewer_rows(trained_policy, options, kind, steps, batch):
    if options["jacobian"] == "exact" and kind == "ddpm":
        pytest.skip("exact Jacobians at DDPM-100 cost 3,300 rows per step: covered at DDIM-16")
    schedule, noise, cond = _problem(kind, steps, batch, seed=5)
    net = trained_policy.denoiser
    with torch.inference_mode():
        reference = make_solver("sequential").solve(net, schedule, noise, cond)
        results = {}
        for rounds in ("fixed", "free"):
            solver = make_solver("newton", rounds=rounds, **options)
            cold = solver.solve(net, schedule, noise, cond)
            warm = solver.solve(
                net, schedule, noise, cond, warm=replace(cold.state, trajectory=_warm_guess(cold.trajectory, noise))
            )
            results[rounds] = cold, warm
    for fixed, free in zip(results["fixed"], results["free"], strict=True):
        assert free.converged and fixed.converged
        assert free.row_iterations == fixed.row_iterations and free.iterations == fixed.iterations
        assert (free.sample - fixed.sample).abs().max() <= 1e-5
        assert (free.sample - reference.sample).abs().max() <= 1e-3
        assert free.nfe < fixed.nfe  # the converged prefix is not evaluated again


def test_newton_free_rounds_evaluate_only_the_unfinished_suffix(trained_policy):
    """On a warm start, every round after the first evaluates T - s steps (s final steps), s never decreasing."""
    schedule, noise, cond = _problem("ddpm", 100, 1, seed=2)
    net = _Rows(trained_policy.denoiser)
    solver = make_solver("newton", jacobian="broyden")
    with torch.inference_mode():
        cold = solver.solve(trained_policy.denoiser, schedule, noise, cond)
        warm = solver.solve(
            net, schedule, noise, cond, warm=replace(cold.state, trajectory=_warm_guess(cold.trajectory, noise))
        )
    assert warm.converged and len(net.rows) == warm.iterations
    assert net.rows[0] == 100 and all(b <= a for a, b in zip(net.rows, net.rows[1:], strict=False))
    assert net.rows[-1] < 100 and warm.nfe == sum(net.rows)


@pytest.mark.parametrize("batch", [1, 3])
def test_paradigms_free_rounds_are_exact_and_need_no_more_rounds(trained_policy, batch):
    schedule, noise, cond = _problem("ddpm", 100, batch, seed=4)
    net = trained_policy.denoiser
    with torch.inference_mode():
        reference = make_solver("sequential").solve(net, schedule, noise, cond)
        fixed = make_solver("paradigms", rounds="fixed").solve(net, schedule, noise, cond)
        rows = _Rows(net)
        free = make_solver("paradigms", rounds="free").solve(rows, schedule, noise, cond)
    assert free.converged and (free.sample - reference.sample).abs().max() <= 1e-3
    assert free.iterations <= fixed.iterations and free.nfe < fixed.nfe
    assert rows.rows[-1] < 16 * batch  # the window shrank at the end of the chain


@pytest.mark.parametrize("name,options", [("newton", {"jacobian": "broyden"}), ("paradigms", {})])
def test_free_rounds_read_the_device_once_per_round(random_net, name, options):
    schedule, noise, cond = _problem("ddim", 16, 2)
    solver = make_solver(name, rounds="free", **options)
    with torch.inference_mode():
        solver.solve(random_net, schedule, noise, cond)
        counter = OpCounter()
        with counter:
            result = solver.solve(counter.wrap(random_net), schedule, noise, cond)
    assert result.converged and counter.network_calls == result.iterations
    assert counter.host_reads <= result.iterations
