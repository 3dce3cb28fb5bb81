"""ParaDiGMS (Shih et al., NeurIPS 2023): Picard iteration over a sliding window.

Each iteration evaluates the network once on the whole window (window x batch rows, each with its
own timestep) and rebuilds every window state from the cumulative sum of drifts
``step_j(y_j) - y_j`` plus the pre-drawn noise. A state has converged when its change between
iterations is small against that step's noise scale in every entry, ``max |dy| <= tau * sqrt(var)``; the
window slides past the leading converged states, plus one (that state's inputs had converged, so its new value is
exact). The stride is always >= 1, so a solve never takes more than T iterations.

Why the largest entry and not ParaDiGMS' RMS over the D entries (``|dy|^2 / D <= tau^2 var``): the exactness
contract is a bound on every entry, and an RMS dilutes a change concentrated in a few entries. Measured in closed
loop (10 PushT seeds, DDPM-100, window 16, max |sample - sequential|): RMS at 0.01 ended 8.7e-3 off on the FiLM
chunk (D = 32) and 1.8e-3 on the inpainting chunk (D = 320, the actions among 20 observation channels); the largest
entry at 0.01 ends 6.7e-5 and 6.0e-4 off, for 31.0 instead of 29.5 rounds (docs/results.md).

Two round shapes (``rounds``, see ``ROUND_SHAPES`` in solvers/base.py):
  * ``fixed`` (the default on CUDA, where graphs need it): the window is gathered by a device index, so every round
    has the same shapes and makes no host read but the convergence status (``check_every=k``: every k rounds); a
    window that runs past the last step evaluates padding steps whose changes never count, and new window states
    start from the cold guess (copies of x_T, ParaDiGMS' own initialisation).
  * ``free`` (the default elsewhere): the window is a slice that shrinks at the end of the chain, so a round
    evaluates only live steps; states entering the window continue the chain with the last network output held
    fixed (plus their own noise), a better guess than copies of x_T (about 2 of ~30 rounds fewer at DDPM-100,
    window 16). The window position is read from the device every round (``check_every`` does not apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from policy_accel.profiling import read_to_host
from policy_accel.schedule import Schedule
from policy_accel.schema import PositiveFloat, PositiveInt, check_fields
from policy_accel.solvers.base import (
    ROUND_SHAPES,
    Budget,
    Denoiser,
    Noise,
    RoundHook,
    RoundTrace,
    RowStep,
    SolveClock,
    SolveResult,
    SolveState,
    WorkspaceCache,
    cold_trajectory,
    evaluate_steps,
    free_rounds,
    largest_entry,
    start_solve,
    step_noise,
)


class _Workspace:
    """Buffers of one (schedule, batch, chunk shape, window) problem, built once and reused by every solve."""

    def __init__(self, schedule: Schedule, B: int, shape: torch.Size, p: int, check_every: int, dtype, device):
        T = schedule.num_steps
        pad = check_every * p + 1  # a window may run past T, and keep sliding for up to check_every - 1 rounds
        levels = T + 1 + pad
        self.T, self.B, self.p, self.shape = T, B, p, shape
        self.step = RowStep(schedule)
        self.levels = torch.zeros(levels, B, *shape, dtype=dtype, device=device)
        self.traj = self.levels[: T + 1]
        self.rows = self.levels.view(levels * B, *shape)
        # Per (level, row): step coefficients (padding steps map every state to 0), timestep, noise.
        steps = T + pad
        table = torch.zeros(steps, 4, dtype=dtype, device=device)
        table[:, 0] = 1.0
        table[:T] = self.step.table
        self.table = table.repeat_interleave(B, 0).view(steps * B, 4, *([1] * len(shape)))
        self.timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(pad)]).repeat_interleave(B)
        self.xi = torch.zeros(steps * B, *shape, dtype=dtype, device=device)
        self._xi_steps = self.xi[: T * B].view(T, B, *shape)
        self.noise_scale = schedule.noise_scale.view(T, *([1] * (len(shape) + 1)))
        # 1 / std per state: y_i is judged against the noise scale of the step that consumes it
        # (y_T never blocks: if it is the first to change, the window ends anyway); padding never counts.
        scale = torch.zeros(levels, 1, dtype=dtype, device=device)
        scale[:T, 0] = schedule.variance.rsqrt()
        scale[T, 0] = 1e15
        self.scale = scale
        self.window = torch.arange(p, device=device)
        self.batch = torch.arange(B, device=device)
        self.cond = None

    def row_index(self, level: torch.Tensor) -> torch.Tensor:
        """Flat (level, row) indices of levels ``level`` (p,)."""
        if self.B == 1:
            return level
        return (level.unsqueeze(1) * self.B + self.batch).view(-1)


@dataclass
class ParadigmsSolver:
    """Options are declared with their ranges (policy_accel/schema.py) and checked at construction."""

    window: PositiveInt = 16
    tolerance: PositiveFloat = 0.01  # ParaDiGMS uses 0.1; measured here it let one of 30 PushT solves end 0.53 off
    check_every: PositiveInt = 1  # fixed rounds: read the convergence status from the device every k rounds
    rounds: Literal[ROUND_SHAPES] = "auto"  # fixed | free | auto (fixed on CUDA, free elsewhere)
    name: ClassVar[str] = "paradigms"
    # Its stopping test compares successive iterates, which a good initial guess passes early (0.24 off on Can).
    exact_warm_start: ClassVar[bool] = False
    _workspaces: WorkspaceCache = field(default_factory=WorkspaceCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_fields(self)

    def _workspace(self, schedule: Schedule, noise: Noise) -> _Workspace:
        x, p = noise.x_T, min(self.window, schedule.num_steps)
        return self._workspaces.get(
            schedule,
            noise,
            lambda: _Workspace(schedule, x.shape[0], x.shape[1:], p, self.check_every, x.dtype, x.device),
        )

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
        clock = start_solve(schedule, noise, global_cond, warm, budget)
        init = None if warm is None else warm.trajectory
        if free_rounds(self.rounds, noise.x_T.device):
            return self._solve_free(denoiser, schedule, noise, global_cond, init, clock, trace)
        T, B = schedule.num_steps, noise.x_T.shape[0]
        ws = self._workspace(schedule, noise)
        p = ws.p
        if init is None:
            ws.levels.copy_(noise.x_T)
        else:
            ws.traj.copy_(init)
        ws.traj[0].copy_(noise.x_T)
        torch.mul(ws.noise_scale, noise.z, out=ws._xi_steps)
        cond = global_cond.repeat(p, 1)
        begin = torch.zeros(1, dtype=torch.long, device=noise.x_T.device)
        iterations = nfe = 0
        status = [float("inf")]
        stop = None
        while stop is None:
            level = ws.window + begin
            rows = ws.row_index(level)
            states = ws.rows.index_select(0, rows)
            eps = denoiser(states, ws.timesteps.index_select(0, rows), cond)
            stepped = ws.step(states, eps, ws.table.index_select(0, rows).unbind(1))
            drift = (stepped - states + ws.xi.index_select(0, rows)).view(p, B, *ws.shape)
            new = ws.levels.index_select(0, begin) + torch.cumsum(drift, dim=0)
            after = level + 1
            change = largest_entry(new - ws.levels.index_select(0, after))
            err = change * ws.scale.index_select(0, after)  # (p, B): max |dy| / std
            violated = (err > self.tolerance).any(dim=1)  # NaN never violates; the status below catches it
            first = (violated.cumsum(0) == 0).sum()  # leading converged states
            ws.levels.index_copy_(0, after, new)
            evaluated = begin
            begin = begin + (first + 1).clamp(max=p)
            iterations += 1
            nfe += min(p, T) * B
            if trace is not None:
                trace(RoundTrace(iterations, ws.traj, err.amax(0), (begin >= T).expand(B)))
            reason = clock.exhausted(iterations)
            if iterations % self.check_every and reason is None:
                continue
            # One host read: the worst scaled change while the window runs, -1 once it passed the last step.
            status = read_to_host(torch.minimum(err.amax(), torch.where(begin >= T, -1.0, float("inf"))))
            if not math.isfinite(status[0]):
                stop = "non_finite"
            elif status[0] < 0:
                stop = "converged"
            elif reason is not None:
                stop = reason
                end = min(int(evaluated) + p, T)
                if init is None and end < T:
                    # States past the window were never evaluated; the clean sample predicted at the last
                    # evaluated state is a better anytime estimate.
                    last = (end - 1 - int(evaluated)) * B
                    index = torch.full((B,), end - 1, device=states.device)
                    ws.traj[end + 1 :] = schedule.predict_x0(states[last : last + B], eps[last : last + B], index)
        trajectory = ws.traj.clone()
        return SolveResult(
            sample=trajectory[-1],
            trajectory=trajectory,
            iterations=iterations,
            nfe=nfe,
            converged=stop == "converged",
            residual=0.0 if stop == "converged" else status[0],
            wall_time_s=clock.elapsed(),
            stop_reason=stop,
            state=SolveState(trajectory),
        )

    def _solve_free(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        noise: Noise,
        global_cond: torch.Tensor,
        init: torch.Tensor | None,
        clock: SolveClock,
        trace: RoundHook | None,
    ) -> SolveResult:
        """Free-shape rounds: the live window only, new states continuing the chain (module docstring)."""
        T, B = schedule.num_steps, noise.x_T.shape[0]
        xi = step_noise(schedule, noise)
        traj = cold_trajectory(noise, T) if init is None else init.clone()
        traj[0] = noise.x_T
        # 1 / std per state, as on fixed rounds (y_T never blocks).
        scale = torch.cat([schedule.variance.rsqrt(), schedule.variance.new_tensor([1e15])])
        steps = torch.arange(T, device=traj.device)
        p = min(self.window, T)
        begin, end = 0, p
        iterations = nfe = 0
        worst = float("inf")
        stop = None
        while stop is None:
            states = traj[begin:end]
            stepped, eps = evaluate_steps(denoiser, schedule, states, steps[begin:end], global_cond)
            iterations += 1
            nfe += (end - begin) * B
            new = traj[begin] + torch.cumsum(stepped - states + xi[begin:end], dim=0)
            change = largest_entry(new - traj[begin + 1 : end + 1])
            err = change * scale[begin + 1 : end + 1, None]  # (L, B): max |dy| / std
            violated = (err > self.tolerance).any(dim=1)  # NaN never violates; `worst` below catches it
            traj[begin + 1 : end + 1] = new
            # One host read: how many leading states converged, and the worst scaled change (NaN if non-finite).
            first, worst = read_to_host(torch.stack([(violated.cumsum(0) == 0).sum().to(err.dtype), err.amax()]))
            new_begin = begin + min(int(first) + 1, p)
            new_end = min(new_begin + p, T)
            if trace is not None:
                trace(RoundTrace(iterations, traj, err.amax(0), torch.full((B,), new_begin >= T)))
            if not math.isfinite(worst):
                stop = "non_finite"
            elif new_begin >= T:
                stop = "converged"
            elif (reason := clock.exhausted(iterations)) is not None:
                stop = reason
                if init is None and end < T:
                    # States past the window were never evaluated: the clean sample predicted at the last
                    # evaluated state is a better anytime estimate.
                    traj[end + 1 :] = schedule.predict_x0(states[-1], eps[-1], steps[end - 1 : end].expand(B))
            elif init is None and new_end > end:
                # New window states continue the chain from y_end with the last network output held fixed.
                y = traj[end]
                for k in range(end, new_end):
                    y = schedule.step(y, eps[-1], steps[k : k + 1].expand(B)) + xi[k]
                    traj[k + 1] = y
            begin, end = new_begin, new_end
        return SolveResult(
            sample=traj[-1],
            trajectory=traj,
            iterations=iterations,
            nfe=nfe,
            converged=stop == "converged",
            residual=0.0 if stop == "converged" else worst,
            wall_time_s=clock.elapsed(),
            stop_reason=stop,
            state=SolveState(traj),  # shared with `trajectory`, as on fixed rounds (both are this solve's own copy)
        )
