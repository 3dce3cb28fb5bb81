"""The sequential sampler: the reference every parallel solver is checked against."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from policy_accel.schedule import Schedule
from policy_accel.solvers.base import (
    Budget,
    Denoiser,
    Noise,
    RoundHook,
    SolveResult,
    SolveState,
    cold_trajectory,
    non_finite,
    start_solve,
    step_noise,
)
from policy_accel.solvers.multistep import solve_multistep


@dataclass
class SequentialSolver:
    """One network call per step, T sequential rounds. Ignores ``warm`` and ``trace``: it has nothing to
    refine and no iterates.

    A sample that comes out non-finite ends the solve unconverged (``stop_reason="non_finite"``): one host read.
    """

    name: ClassVar[str] = "sequential"
    exact_warm_start: ClassVar[bool] = True

    def solve(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        noise: Noise,
        global_cond: torch.Tensor,
        warm: SolveState | None = None,
        budget: Budget | None = None,
        trace: RoundHook | None = None,
    ) -> SolveResult:
        clock = start_solve(schedule, noise, global_cond, warm if not schedule.is_multistep else None, budget)
        if schedule.is_multistep:  # DPM-Solver++ / UniPC: not a one-step chain (policy_accel/multistep.py)
            return _flag_non_finite(solve_multistep(denoiser, schedule, noise, global_cond, clock))
        T, B = schedule.num_steps, noise.x_T.shape[0]
        xi = step_noise(schedule, noise)
        program = fused_chain(denoiser, schedule) if budget is None else None
        if program is not None:  # the whole chain as one compiled program (policy_accel/model/engine.py)
            traj = program(noise.x_T, xi, global_cond)
            return _flag_non_finite(
                SolveResult(
                    sample=traj[-1],
                    trajectory=traj,
                    iterations=T,
                    nfe=T * B,
                    converged=True,
                    residual=0.0,
                    wall_time_s=clock.elapsed(),
                    stop_reason="converged",
                    state=SolveState(traj),
                )
            )
        traj = cold_trajectory(noise, T)
        y = noise.x_T
        indices = torch.arange(T, device=y.device).view(T, 1).expand(T, B)  # views per step, no allocation
        timesteps = schedule.timesteps[indices]
        stop = "converged"
        for j in range(T):
            index = indices[j]
            eps = denoiser(y, timesteps[j], global_cond)
            y_next = schedule.step(y, eps, index) + xi[j]
            traj[j + 1] = y_next
            reason = clock.exhausted(j + 1) if j + 1 < T else None
            if reason is not None:
                # Anytime estimate: the clean sample predicted at the last evaluated state.
                traj[j + 2 :] = schedule.predict_x0(y, eps, index).unsqueeze(0)
                stop = reason
                break
            y = y_next
        return _flag_non_finite(
            SolveResult(
                sample=traj[-1],
                trajectory=traj,
                iterations=j + 1,
                nfe=(j + 1) * B,
                converged=stop == "converged",
                residual=0.0 if stop == "converged" else float("inf"),
                wall_time_s=clock.elapsed(),
                stop_reason=stop,
                state=SolveState(traj),
            )
        )


def fused_chain(denoiser: Denoiser, schedule: Schedule, compile: bool = False):
    """The engine's one-program version of ``schedule``'s chain, when the denoiser offers one and it was prepared
    (``compile=True`` prepares it: before a control loop, never inside one); None otherwise."""
    chain = getattr(denoiser, "chain", None)
    return None if chain is None else chain(schedule, compile=compile)


def _flag_non_finite(result: SolveResult) -> SolveResult:
    if not non_finite(result.sample):
        return result
    return replace(result, converged=False, stop_reason="non_finite", residual=float("nan"))
