"""Parallel Newton for the denoising chain (DEER / DeepPCR-style), with cheap Jacobian variants.

Linearise every step around the current trajectory ``ybar`` and solve the linear recursion

    y_0 = x_T,   y_{j+1} = step_j(ybar_j) + xi_j + J_j (y_j - ybar_j),   J_j = d step_j / dy (ybar_j)

Evaluating all steps (and their Jacobians) is one batched round; the recursion is a block lower-bidiagonal
linear system in D = horizon x action_dim (32 for PushT) unknowns per step (see :class:`BlockRecursion`). With
fresh Jacobians the error falls (nearly) quadratically. Whatever the Jacobians, the first unconverged state becomes
exact each round (its inputs are exact, so its update is the plain step), so a solve takes at most T rounds.

Stopping: a row has converged when every one-step residual is below ``tolerance`` (checked on the
round's evaluation), or (exact Jacobians only) when the estimated error of its newest iterate is below
``step_tolerance``.
The estimate is the standard a-posteriori bound of a contracting iteration: with update sizes
s_k = max |y_{k+1} - y_k| and rate r = s_k / s_{k-1} < 1, the remaining error is about s_k r / (1 - r);
a Newton update that shrinks quadratically gives a tiny r, so the new iterate is accepted without a
round spent re-checking it. Chord and Broyden iterations converge too unevenly for that estimate (it let
closed-loop solves end 5.3e-3 off), so they always stop on the residual test.

Round shapes (``rounds``, see ``ROUND_SHAPES`` in solvers/base.py):
  * ``fixed`` (the default on CUDA): every round evaluates all T steps of every batch row, so its shapes (and, on a
    GPU, its kernels) never change; per round the solver dispatches a fixed number of operators whatever T (buffers
    and views are built once per shape and reused across solves), solves the linear recursion densely
    (:class:`BlockRecursion`) and reads the device once, a per-row status vector (``check_every=k``: every k rounds).
  * ``free`` (the default elsewhere): a round evaluates only the unfinished suffix, from the first step that is not
    final in some unfinished row (its position is read with the status, every round), and runs the recursion over
    that suffix as a loop of small products. A warm start that is already right up to step s costs T - s rows a
    round instead of T.
Either way, states that are final, and rows that converged, are masked rather than removed, so each row still
stops changing at the round a batch-1 solve of it would stop, and reports that round count.

Jacobian strategies:
  * ``exact``   - the Jacobian of the whole step at the current iterate, every round (D extra rows
                  per state; costly on a CPU, cheap on a GPU).
  * ``chord``   - Jacobians once per solve (or carried in from the previous control step), reused.
  * ``broyden`` - chord plus a good-Broyden rank-1 secant update per step and round; no extra
                  network calls.
How Jacobians are computed (``derivatives``): finite differences in the solver's workspace (cheap, ~2e-4 off) or
forward-mode AD (:func:`forward_jacobians`: exact, ~2.7x the cost on a CPU).
Safeguard: a round whose residual grew is followed by a plain step update (J = 0) instead of a
Newton update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch.autograd import forward_ad

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
    SolveResult,
    SolveState,
    WorkspaceCache,
    evaluate_steps,
    free_rounds,
    shift_chunk,
    start_solve,
)
from policy_accel.solvers.linear import RECURSIONS, BlockRecursion, recursion_block

JACOBIAN_STRATEGIES = ("exact", "chord", "broyden")


DERIVATIVES = ("finite_difference", "forward_ad")
FINITE_DIFFERENCE_STEP = 1e-3


@contextlib.contextmanager
def _dual_numbers() -> Iterator[None]:
    """Dual tensors cannot be built from inference tensors: leave inference mode (gradients stay off)."""
    with torch.inference_mode(False), torch.no_grad(), forward_ad.dual_level():
        yield


def forward_jacobians(
    denoiser: Denoiser,
    schedule: Schedule,
    states: torch.Tensor,
    step_index: torch.Tensor,
    global_cond: torch.Tensor,
    max_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step outputs (L, B, H, A) and their exact Jacobians wrt the input state (L, B, D, D), [out, in], by
    forward-mode AD (``derivatives=forward_ad``; finite differences run in the solver's workspace instead).

    One batch with a dual row per (state, basis direction) e_k, L * B * D rows in chunks of at most ``max_rows``,
    plus the L * B plain rows of the step outputs. Exact to rounding, but each dual row costs ~2.7 plain rows on this
    CPU (the tangent doubles every convolution). Tangents ride in the batch rather than under ``vmap``, whose missing
    batching rule for Mish falls back to a per-direction loop in torch 2.13.
    """
    L, B = states.shape[:2]
    shape = states.shape[2:]
    D = shape.numel()
    stepped, _ = evaluate_steps(denoiser, schedule, states, step_index, global_cond)
    rows_idx = step_index.repeat_interleave(B)
    cond = global_cond.repeat(L, 1)
    flat = states.reshape(L * B, *shape)
    per_chunk = max(1, max_rows // D)
    blocks = []
    with _dual_numbers():
        basis = torch.eye(D, device=states.device, dtype=states.dtype).reshape(D, *shape)
        for start in range(0, L * B, per_chunk):
            stop = min(start + per_chunk, L * B)
            n = stop - start
            primal = flat[start:stop].repeat_interleave(D, 0)  # row r*D+k: state r, direction k
            idx = rows_idx[start:stop].repeat_interleave(D)
            rows = forward_ad.make_dual(primal, basis.repeat(n, *([1] * len(shape))))
            eps = denoiser(rows, schedule.timesteps[idx], cond[start:stop].repeat_interleave(D, 0))
            columns = forward_ad.unpack_dual(schedule.step(rows, eps, idx)).tangent.reshape(n, D, D)
            blocks.append(columns.transpose(1, 2))  # [row, k (input), out] -> [row, out, in]
    return stepped, torch.cat(blocks).view(L, B, D, D)


def shift_jacobians(jac: torch.Tensor, shift: int, horizon: int) -> torch.Tensor:
    """Shift per-step Jacobians (T, B, D, D) over a (horizon, A) chunk like the trajectory.

    The overlap keeps its blocks; each new tail position gets the last position's own block (no coupling to others).
    """
    T, B, D, _ = jac.shape
    A = D // horizon
    j = jac.view(T, B, horizon, A, horizon, A)
    out = torch.zeros_like(j)
    keep = horizon - shift
    out[:, :, :keep, :, :keep, :] = j[:, :, shift:, :, shift:, :]
    tail = torch.diagonal(out[:, :, keep:, :, keep:, :], dim1=2, dim2=4)  # (T, B, A, A, shift): blocks (h, h)
    tail.copy_(j[:, :, -1, :, -1, :].unsqueeze(-1).expand_as(tail))
    return out.view(T, B, D, D)


@dataclass
class NewtonState(SolveState):
    """Newton's warm state: the trajectory and the per-step Jacobians (T, B, D, D) [out, in] of the last round."""

    jacobians: torch.Tensor | None = None

    def shifted(self, shift: int) -> NewtonState:
        horizon = self.trajectory.shape[-2]
        jac = None if self.jacobians is None else shift_jacobians(self.jacobians, shift, horizon)
        return NewtonState(shift_chunk(self.trajectory, shift), jac)

    def check(self, schedule: Schedule, noise: Noise) -> None:
        super().check(schedule, noise)
        if self.jacobians is not None:
            D = noise.x_T[0].numel()
            expected = (schedule.num_steps, noise.x_T.shape[0], D, D)
            if tuple(self.jacobians.shape) != expected:
                raise ValueError(f"warm state Jacobians have shape {tuple(self.jacobians.shape)}, need {expected}")


class _Workspace:
    """Buffers and views of one (schedule, batch, chunk shape) problem, built once and reused by every solve."""

    def __init__(self, schedule: Schedule, B: int, shape: torch.Size, dtype, device, recursion: str, fd: bool):
        T = schedule.num_steps
        D = shape.numel()
        TB = T * B
        self.T, self.B, self.D, self.shape = T, B, D, shape
        self.step = RowStep(schedule)
        # Jacobian rounds evaluate one row per (step, row, direction), then the plain rows: the perturbed rows sit
        # just before the trajectory in one buffer, so a Jacobian round's network input is a view, copied from nothing.
        pert = TB * D if fd else 0
        self._rows = torch.zeros(pert + (T + 1) * B, *shape, dtype=dtype, device=device)
        self.traj = self._rows[pert:].view(T + 1, B, *shape)
        self.traj0 = self.traj[0]
        self.y_in = self.traj[:-1].view(TB, *shape)  # the network's plain rows: (step j, row b) at j*B + b
        self.y_out = self.traj[1:].view(T, B, D, 1)
        self.xi = torch.zeros(T, B, D, 1, dtype=dtype, device=device)
        self._xi_chunks = self.xi.view(T, B, *shape)
        self.noise_scale = schedule.noise_scale.view(T, *([1] * (len(shape) + 1)))
        plain_rows = torch.arange(T, device=device).repeat_interleave(B)
        self.plain_coef = self.step.coefficients(plain_rows, len(shape) + 1)
        self.plain_t = schedule.timesteps[plain_rows]
        self.plain_cond = None  # (TB, C), allocated on the first solve (the condition's width is known then)
        self._plain_cond_steps = None
        self.plain_out = torch.zeros(TB, *shape, dtype=dtype, device=device)
        self.plain_target = self.plain_out.view(T, B, D, 1)
        self.rec = BlockRecursion(T, B, D, recursion_block(recursion, T, B, D), dtype, device)
        self.negjac = self.rec.source[:T]  # the solver's Jacobians, negated, live in the recursion's input
        self.ds = torch.zeros(T, B, D, 1, dtype=dtype, device=device)  # minus last round's change of each input state
        self._ds_tail, self._delta_head = self.ds[1:], self.rec.delta[:-1]
        self.fd = fd
        if fd:  # finite-difference rounds: one row per (step, row, direction), then the plain rows
            N = TB * (D + 1)
            self.fd_in = self._rows[:N]
            self.fd_pert = self._rows[:pert].view(TB, D, D)
            self.y_rep = self.traj[:-1].view(TB, 1, D).expand(TB, D, D)
            self.h_basis = FINITE_DIFFERENCE_STEP * torch.eye(D, dtype=dtype, device=device)
            fd_rows = torch.cat([plain_rows.repeat_interleave(D), plain_rows])
            self.fd_coef = self.step.coefficients(fd_rows, len(shape) + 1)
            self.fd_t = schedule.timesteps[fd_rows]
            self.fd_out = torch.zeros(N, *shape, dtype=dtype, device=device)
            self.fd_target = self.fd_out[pert:].view(T, B, D, 1)
            self.fd_base = self.fd_out[pert:].view(TB, 1, D)
            self.fd_cols = self.fd_out[:pert].view(TB, D, D)  # [row, direction (in), out]
            self.negjac_cols = self.negjac.reshape(TB, D, D).transpose(1, 2)
            self.fd_cond = None

    def start(self, noise: Noise, cond: torch.Tensor, init: torch.Tensor | None, negjac: torch.Tensor | None) -> None:
        """Load one solve's noise, condition, initial guess and carried Jacobians into the buffers."""
        T, B, D = self.T, self.B, self.D
        if init is None:
            self.traj.copy_(noise.x_T)
        else:
            self.traj.copy_(init)
            self.traj0.copy_(noise.x_T)
        torch.mul(self.noise_scale, noise.z, out=self._xi_chunks)
        if B == 1:  # every row has the one condition: views, no copies
            self.plain_cond = cond.expand(T, -1)
            self.fd_cond = cond.expand(T * (D + 1), -1) if self.fd else None
        else:
            if self.plain_cond is None or self.plain_cond.shape[-1] != cond.shape[-1]:
                self.plain_cond = cond.new_zeros(T * B, cond.shape[-1])
                self._plain_cond_steps = self.plain_cond.view(T, B, -1)
                if self.fd:
                    self.fd_cond = cond.new_zeros(T * B * (D + 1), cond.shape[-1])
                    self._fd_cond_pert = self.fd_cond[: T * B * D].view(T, B, D, -1)
                    self._fd_cond_plain = self.fd_cond[T * B * D :].view(T, B, -1)
                    self._plain_cond_rep = self._plain_cond_steps.unsqueeze(2).expand(T, B, D, -1)
            self._plain_cond_steps.copy_(cond.expand(T, B, -1))
            if self.fd:
                self._fd_cond_plain.copy_(self._plain_cond_steps)
                self._fd_cond_pert.copy_(self._plain_cond_rep)
        if negjac is not None:
            self.negjac.copy_(negjac)


@dataclass
class NewtonSolver:
    """Options are declared with their ranges (policy_accel/schema.py) and checked at construction."""

    jacobian: Literal[JACOBIAN_STRATEGIES] = "exact"
    tolerance: PositiveFloat = 2e-5  # max |y_{j+1} - step_j(y_j) - xi_j| over every step, normalized units
    step_tolerance: PositiveFloat | None = 1e-4  # exact Jacobians: accept once the estimated remaining error is below
    recursion: Literal[RECURSIONS] = "loop"  # "loop" | "scan": block length of the linear recursion (BlockRecursion)
    derivatives: Literal[DERIVATIVES] = "finite_difference"  # | "forward_ad": how Jacobians are computed
    check_every: PositiveInt = 1  # fixed rounds: read the convergence status from the device every k rounds
    rounds: Literal[ROUND_SHAPES] = "auto"  # fixed | free | auto (fixed on CUDA, free elsewhere)
    max_rows: PositiveInt = 4096  # largest network call of a Jacobian round; more rows are split into calls
    name: ClassVar[str] = "newton"
    exact_warm_start: ClassVar[bool] = True
    _workspaces: WorkspaceCache = field(default_factory=WorkspaceCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_fields(self)

    def _workspace(self, schedule: Schedule, noise: Noise) -> _Workspace:
        x, fd = noise.x_T, self.derivatives == "finite_difference"
        return self._workspaces.get(
            schedule,
            noise,
            lambda: _Workspace(schedule, x.shape[0], x.shape[1:], x.dtype, x.device, self.recursion, fd),
        )

    def _network(self, denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n <= self.max_rows:
            return denoiser(x, t, c)
        m = self.max_rows
        return torch.cat([denoiser(x[i : i + m], t[i : i + m], c[i : i + m]) for i in range(0, n, m)])

    def _jacobian_round(self, ws: _Workspace, denoiser: Denoiser, schedule: Schedule, lo: int) -> torch.Tensor:
        """Evaluate steps lo..T-1 and their Jacobians; writes the negated Jacobians in place, returns
        step_j(y_j) + xi_j for those steps."""
        T, B, D = ws.T, ws.B, ws.D
        if ws.fd:
            if lo == 0:
                torch.add(ws.y_rep, ws.h_basis, out=ws.fd_pert)
                eps = self._network(denoiser, ws.fd_in, ws.fd_t, ws.fd_cond)
                ws.step(ws.fd_in, eps, ws.fd_coef, out=ws.fd_out)
                torch.div(ws.fd_cols - ws.fd_base, -FINITE_DIFFERENCE_STEP, out=ws.negjac_cols)
                return ws.fd_target + ws.xi
            n0 = lo * B
            torch.add(ws.y_rep[n0:], ws.h_basis, out=ws.fd_pert[n0:])
            # The suffix's perturbed rows, then its plain rows: two slices of the one buffer.
            for a, b in ((n0 * D, T * B * D), (T * B * D + n0, T * B * (D + 1))):
                eps = self._network(denoiser, ws.fd_in[a:b], ws.fd_t[a:b], ws.fd_cond[a:b])
                ws.step(ws.fd_in[a:b], eps, tuple(c[a:b] for c in ws.fd_coef), out=ws.fd_out[a:b])
            torch.div(ws.fd_cols[n0:] - ws.fd_base[n0:], -FINITE_DIFFERENCE_STEP, out=ws.negjac_cols[n0:])
            return ws.fd_target[lo:] + ws.xi[lo:]
        states = ws.traj[lo:-1]
        steps = torch.arange(lo, T, device=states.device)
        cond = ws.plain_cond[:B]
        stepped, jac = forward_jacobians(denoiser, schedule, states, steps, cond, self.max_rows)
        torch.neg(jac, out=ws.negjac[lo:])
        return stepped.reshape(T - lo, B, D, 1) + ws.xi[lo:]

    def _plain_round(self, ws: _Workspace, denoiser: Denoiser, lo: int) -> torch.Tensor:
        """Evaluate steps lo..T-1 without Jacobians; returns step_j(y_j) + xi_j for those steps."""
        if lo == 0:
            eps = denoiser(ws.y_in, ws.plain_t, ws.plain_cond)
            ws.step(ws.y_in, eps, ws.plain_coef, out=ws.plain_out)
            return ws.plain_target + ws.xi
        n0 = lo * ws.B
        eps = denoiser(ws.y_in[n0:], ws.plain_t[n0:], ws.plain_cond[n0:])
        ws.step(ws.y_in[n0:], eps, tuple(c[n0:] for c in ws.plain_coef), out=ws.plain_out[n0:])
        return ws.plain_target[lo:] + ws.xi[lo:]

    @staticmethod
    def _suffix_recursion(ws: _Workspace, r: torch.Tensor, use: torch.Tensor, lo: int) -> torch.Tensor:
        """Free rounds: -d over steps lo..T-1 (offsets -c = ``r`` (L, B, D, 1)), one small product per step:
        e_{j+1} = r_j - N_j e_j with N = -J the stored negated Jacobians, zeroed for rows where ``use`` is False."""
        negjac = torch.where(use, ws.negjac[lo:], ws.rec.zero)
        out = torch.empty_like(r)
        out[0] = r[0]
        for j in range(1, r.shape[0]):
            torch.baddbmm(r[j], negjac[j], out[j - 1], alpha=-1, out=out[j])
        return out

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
        T, B = schedule.num_steps, noise.x_T.shape[0]
        free = free_rounds(self.rounds, noise.x_T.device)
        check_every = 1 if free else self.check_every  # free rounds read the suffix's start every round
        ws = self._workspace(schedule, noise)
        carried = warm.jacobians if isinstance(warm, NewtonState) and self.jacobian != "exact" else None
        ws.start(noise, global_cond, init, None if carried is None else -carried)
        have_jacobians = carried is not None
        exact_estimate = self.jacobian == "exact" and self.step_tolerance is not None
        # Only quadratic (exact-Jacobian) convergence makes the remaining-error estimate trustworthy: with
        # chord/Broyden Jacobians it let 50-seed closed loops end up to 5.3e-3 off (reports/closed_loop_gpu/).
        final = torch.zeros(T, B, 1, 1, dtype=torch.bool, device=noise.x_T.device)  # states known to be exact
        prev_residual = torch.full((1, B, 1, 1), float("inf"), device=noise.x_T.device)
        prev_update = torch.full_like(prev_residual, -1.0) if exact_estimate else None  # tol p; -1: no estimate
        row_rounds: list[int | None] = [None] * B
        status: list[float] = []
        iterations = nfe = 0
        prev_target, prev_lo = None, 0
        lo = 0  # free rounds: every state y_0..y_lo is final in every unfinished row; fixed rounds: always 0
        stop = None
        while stop is None:
            if self.jacobian == "exact" or not have_jacobians:
                target = self._jacobian_round(ws, denoiser, schedule, lo)
                have_jacobians = True
                nfe += (T - lo) * B * (ws.D + 1)
            else:
                target = self._plain_round(ws, denoiser, lo)
                nfe += (T - lo) * B
                if self.jacobian == "broyden" and prev_target is not None:
                    self._broyden_update(ws, target - prev_target[lo - prev_lo :], lo)
            iterations += 1
            y_out = ws.y_out[lo:] if lo else ws.y_out
            r = y_out - target  # (L, B, D, 1): minus this round's one-step residuals, the (negated) Newton offsets
            known = final[lo:] if lo else final
            err = torch.where(known, 0.0, torch.linalg.vector_norm(r, float("inf"), dim=(2, 3), keepdim=True))
            bad = err > self.tolerance  # a NaN residual is caught by the status below, never passes as converged
            count = bad.cumsum(0)
            # Newton update from each row's first unsatisfied step (its inputs are final, so its new value is
            # exact); rows whose residual grew take a plain step update (J = 0) instead.
            residual = err.amax(0, keepdim=True)  # (1, B, 1, 1)
            use = residual <= prev_residual
            prev_residual = residual
            if free:
                delta = self._suffix_recursion(ws, torch.where(count > 0, r, ws.rec.zero), use, lo)
            else:
                torch.where(count > 0, r, ws.rec.zero, out=ws.rec.offsets)
                ws.rec.load(use)
                delta = ws.rec.solve()  # minus the update
            y_out.sub_(delta)
            known = count <= bad  # every step up to the first unsatisfied one is now exact
            if exact_estimate:
                # Accepted without another round when the updates contract fast enough: with u this update, p the
                # last, rate u/p, remaining error ~ u rate / (1 - rate) <= tol <=> tol u + u^2 < tol p.
                u = torch.linalg.vector_norm(delta, float("inf"), dim=(0, 2, 3), keepdim=True)
                tol_u = self.step_tolerance * u
                known = known | (torch.addcmul(tol_u, u, u) < prev_update)
                prev_update = torch.where(use, tol_u, -1.0)  # tol p; -1: no estimate after a plain step update
            final = torch.cat([final[:lo], known]) if lo else known
            row_done = final.all(0, keepdim=True)
            if self.jacobian == "broyden":
                if lo:  # states y_0..y_lo did not move
                    ws.ds[: lo + 1].zero_()
                    ws.ds[lo + 1 :].copy_(delta[:-1])
                else:
                    ws._ds_tail.copy_(ws._delta_head if not free else delta[:-1])
                prev_target, prev_lo = target, lo
            if trace is not None:
                trace(RoundTrace(iterations, ws.traj, residual.view(B), row_done.view(B)))
            reason = clock.exhausted(iterations)
            if iterations % check_every and reason is None:
                continue
            # One host read: per row, the residual while it runs, -1 once it is done, NaN if non-finite (free
            # rounds: then the number of leading steps final in every row).
            row_status = torch.minimum(residual, torch.where(row_done, -1.0, float("inf"))).view(B)
            if free:
                leading = final.view(T, B).all(1).cumprod(0).sum().to(row_status.dtype)
                *status, leading = read_to_host(torch.cat([row_status, leading.view(1)]))
                lo = min(int(leading), T - 1)
            else:
                status = read_to_host(row_status)
            for b, v in enumerate(status):
                if v < 0 and row_rounds[b] is None:
                    row_rounds[b] = iterations
            if any(math.isnan(v) or math.isinf(v) for v in status):
                stop = "non_finite"
            elif all(v < 0 for v in status):
                stop = "converged"
            else:
                stop = reason
        converged = stop == "converged"
        trajectory = ws.traj.clone()
        jacobians = -ws.negjac
        return SolveResult(
            sample=trajectory[-1],
            trajectory=trajectory,
            iterations=iterations,
            nfe=nfe,
            converged=converged,
            residual=0.0 if converged else max((v for v in status if not v < 0), default=float("nan")),
            wall_time_s=clock.elapsed(),
            stop_reason=stop,
            row_iterations=[n if n is not None else iterations for n in row_rounds],
            state=NewtonState(trajectory, jacobians),
        )

    @staticmethod
    def _broyden_update(ws: _Workspace, df: torch.Tensor, lo: int) -> None:
        """Good Broyden per step lo..T-1 and row, on the negated Jacobians N = -J in place:
        J + (df - J ds) ds^T / |ds|^2, skipped where |ds|^2 <= 1e-20 (the state did not move). The buffer holds
        s = -ds (the recursion returns minus the update), so N + (df - N s) s^T / |s|^2 is the same update."""
        s, negjac = (ws.ds[lo:], ws.negjac[lo:]) if lo else (ws.ds, ws.negjac)
        rb = df - torch.einsum("tbij,tbjx->tbix", negjac, s)
        n2 = torch.einsum("tbdx,tbdy->tbxy", s, s)
        inv = (n2 > 1e-20) / n2.clamp(min=1e-20)
        negjac.add_(torch.einsum("tbix,tbjx,tbxy->tbij", rb, s, inv))
