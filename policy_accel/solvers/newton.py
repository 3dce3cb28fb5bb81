"""Parallel Newton for the denoising chain (DEER / DeepPCR-style), with cheap Jacobian variants.

Linearise every step around the current trajectory ``ybar`` and solve the linear recursion

    y_0 = x_T,   y_{j+1} = step_j(ybar_j) + xi_j + J_j (y_j - ybar_j),   J_j = d step_j / dy (ybar_j)

Evaluating all steps (and their Jacobians) is one batched round; the recursion is a short loop of
D x D matrix-vector products (D = horizon x action_dim, 32 for PushT). With fresh Jacobians the
error falls (nearly) quadratically. Whatever the Jacobians, the first unconverged state becomes exact each
round (its inputs are exact, so its update is the plain step), so a solve takes at most T rounds.

Stopping: a row has converged when every one-step residual is below ``tolerance`` (checked on the
round's evaluation), or (exact Jacobians only) when the estimated error of its newest iterate is below
``step_tolerance``.
The estimate is the standard a-posteriori bound of a contracting iteration: with update sizes
s_k = max |y_{k+1} - y_k| and rate r = s_k / s_{k-1} < 1, the remaining error is about s_k r / (1 - r);
a Newton update that shrinks quadratically gives a tiny r, so the new iterate is accepted without a
round spent re-checking it. Chord and Broyden iterations converge too unevenly for that estimate (it let
closed-loop solves end 5.3e-3 off), so they always stop on the residual test.

Batch rows converge (and stop changing) independently, so each row's round count is what a batch-1
solve of it would need.

Jacobian strategies:
  * ``exact``   - the Jacobian of the whole step at the current iterate, every round (D extra rows
                  per state; costly on a CPU, cheap on a GPU).
  * ``chord``   - Jacobians once per solve (or carried in from the previous control step), reused.
  * ``broyden`` - chord plus a good-Broyden rank-1 secant update per step and round; no extra
                  network calls.
How Jacobians are computed (``derivatives``, see ``step_jacobians``): finite differences (cheap, ~2e-4
off) or forward-mode AD (exact, ~2.7x the cost on a CPU).
Safeguard: a round whose residual grew is followed by a plain step update (J = 0) instead of a
Newton update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad

from policy_accel.schedule import Schedule
from policy_accel.solvers.base import (
    Budget,
    Clock,
    Denoiser,
    Noise,
    SolveResult,
    check_inputs,
    cold_trajectory,
    evaluate_steps,
    step_noise,
)

JACOBIAN_STRATEGIES = ("exact", "chord", "broyden")


DERIVATIVES = ("finite_difference", "forward_ad")
FINITE_DIFFERENCE_STEP = 1e-3


@contextlib.contextmanager
def _dual_numbers() -> Iterator[None]:
    """Dual tensors cannot be built from inference tensors: leave inference mode (gradients stay off)."""
    with torch.inference_mode(False), torch.no_grad(), forward_ad.dual_level():
        yield


def step_jacobians(
    denoiser: Denoiser,
    schedule: Schedule,
    states: torch.Tensor,
    step_index: torch.Tensor,
    global_cond: torch.Tensor,
    derivatives: str = "finite_difference",
    max_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step outputs (L, B, H, A) and their Jacobians wrt the input state (L, B, D, D), [out, in].

    One batch with a row per (state, basis direction) e_k, L * B * D rows in chunks of at most
    ``max_rows``, plus the L * B plain rows of the step outputs. ``derivatives``:
      * ``finite_difference`` - rows y + h e_k, h = 1e-3: plain forward calls, but float32 rounding
        leaves ~2e-4 error in the Jacobian entries (1e-2 where h crosses the x0 clipping kink).
      * ``forward_ad`` - rows y with tangent e_k (dual numbers): exact to rounding, but each dual row
        costs ~2.7 plain rows on this CPU (the tangent doubles every convolution).
    Tangents ride in the batch rather than under ``vmap``, whose missing batching rule for Mish falls
    back to a per-direction loop in torch 2.13.
    """
    if derivatives not in DERIVATIVES:
        raise ValueError(f"unknown derivatives {derivatives!r}; valid: {', '.join(DERIVATIVES)}")
    L, B = states.shape[:2]
    shape = states.shape[2:]
    D = shape.numel()
    stepped, _ = evaluate_steps(denoiser, schedule, states, step_index, global_cond)
    rows_idx = step_index.repeat_interleave(B)
    cond = global_cond.repeat(L, 1)
    flat = states.reshape(L * B, *shape)
    base = stepped.reshape(L * B, 1, D)
    per_chunk = max(1, max_rows // D)
    blocks = []
    with _dual_numbers() if derivatives == "forward_ad" else contextlib.nullcontext():
        basis = torch.eye(D, device=states.device, dtype=states.dtype).reshape(D, *shape)
        for start in range(0, L * B, per_chunk):
            stop = min(start + per_chunk, L * B)
            n = stop - start
            primal = flat[start:stop].repeat_interleave(D, 0)  # row r*D+k: state r, direction k
            directions = basis.repeat(n, *([1] * len(shape)))
            idx = rows_idx[start:stop].repeat_interleave(D)
            if derivatives == "forward_ad":
                rows = forward_ad.make_dual(primal, directions)
            else:
                rows = primal + FINITE_DIFFERENCE_STEP * directions
            eps = denoiser(rows, schedule.timesteps[idx], cond[start:stop].repeat_interleave(D, 0))
            out = schedule.step(rows, eps, idx)
            if derivatives == "forward_ad":
                columns = forward_ad.unpack_dual(out).tangent.reshape(n, D, D)
            else:
                columns = (out.reshape(n, D, D) - base[start:stop]) / FINITE_DIFFERENCE_STEP
            blocks.append(columns.transpose(1, 2))  # [row, k (input), out] -> [row, out, in]
    return stepped, torch.cat(blocks).view(L, B, D, D)


def affine_recursion(coupling: torch.Tensor, offsets: torch.Tensor, method: str = "loop") -> torch.Tensor:
    """All d_{j+1} = A_j d_j + c_j for j = 0..L-1 from d_0 = 0: coupling A (L, B, D, D), offsets c (L, B, D).

    ``loop`` runs the recursion step by step (L small products); ``scan`` composes the affine maps
    with a doubling (Hillis-Steele) prefix scan: log2(L) rounds of batched products, the form that
    parallelises on wide hardware. Both return (L, B, D) = d_1..d_L.
    """
    if method == "loop":
        out = torch.empty_like(offsets)
        d = torch.zeros_like(offsets[0])
        for j in range(offsets.shape[0]):
            d = (coupling[j] @ d.unsqueeze(-1)).squeeze(-1) + offsets[j]
            out[j] = d
        return out
    A, c = coupling, offsets  # never modified in place: every round builds new tensors
    shift = 1
    while shift < A.shape[0]:
        # Compose map j with the prefix ending at j - shift: x -> A_j (A_p x + c_p) + c_j.
        c_new = (A[shift:] @ c[:-shift].unsqueeze(-1)).squeeze(-1) + c[shift:]
        A_new = A[shift:] @ A[:-shift]
        c = torch.cat([c[:shift], c_new])
        A = torch.cat([A[:shift], A_new])
        shift *= 2
    return c


@dataclass
class NewtonSolver:
    jacobian: str = "exact"
    tolerance: float = 2e-5  # max |y_{j+1} - step_j(y_j) - xi_j| over every step, normalized units
    step_tolerance: float | None = 1e-4  # exact Jacobians: accept once the estimated remaining error is below this
    recursion: str = "loop"  # "loop" | "scan": how the linear recursion is solved (see affine_recursion)
    derivatives: str = "finite_difference"  # | "forward_ad": how Jacobians are computed (see step_jacobians)
    name: str = "newton"

    def __post_init__(self) -> None:
        if self.jacobian not in JACOBIAN_STRATEGIES:
            raise ValueError(f"unknown Jacobian strategy {self.jacobian!r}; valid: {', '.join(JACOBIAN_STRATEGIES)}")
        if not self.tolerance > 0:
            raise ValueError(f"newton tolerance={self.tolerance} must be > 0")
        if self.step_tolerance is not None and not self.step_tolerance > 0:
            raise ValueError(f"newton step_tolerance={self.step_tolerance} must be > 0 (or null to disable)")
        if self.derivatives not in DERIVATIVES:
            raise ValueError(f"unknown derivatives {self.derivatives!r}; valid: {', '.join(DERIVATIVES)}")
        if self.recursion not in ("loop", "scan"):
            raise ValueError(f"unknown recursion {self.recursion!r}; valid: loop, scan")

    def solve(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        noise: Noise,
        global_cond: torch.Tensor,
        init: torch.Tensor | None = None,
        budget: Budget | None = None,
        carry: dict | None = None,
    ) -> SolveResult:
        check_inputs(schedule, noise, global_cond, init)
        T, B = schedule.num_steps, noise.x_T.shape[0]
        shape = noise.x_T.shape[1:]
        D = shape.numel()
        device = noise.x_T.device
        clock = Clock(budget, T)
        xi = step_noise(schedule, noise)
        traj = cold_trajectory(noise, T) if init is None else init.clone()
        traj[0] = noise.x_T
        steps = torch.arange(T, device=device)
        levels = torch.arange(T, device=device).view(T, 1)

        jac = None
        carried = (carry or {}).get("jacobians")
        if self.jacobian != "exact" and carried is not None and carried.shape == (T, B, D, D):
            jac = carried.clone()
        # Per batch row: states y_0..y_frozen are final; rows leave `active` when they converge, so each
        # row ends after as many rounds as a batch-1 solve of it would take.
        frozen = torch.zeros(B, dtype=torch.long, device=device)
        active = torch.ones(B, dtype=torch.bool, device=device)
        row_iterations = torch.zeros(B, dtype=torch.long, device=device)
        prev_residual = torch.full((B,), float("inf"), device=device)
        prev_update = torch.full((B,), float("inf"), device=device)
        prev_states = prev_stepped = None
        residual = torch.zeros(B, device=device)
        iterations = nfe = 0
        stop = "converged"
        while True:
            rows = active.nonzero().squeeze(1)
            lo = int(frozen[rows].min())
            L, R = T - lo, len(rows)
            states = traj[lo:, rows][:-1]
            cond = global_cond[rows]
            if self.jacobian == "exact" or jac is None:
                stepped, fresh = step_jacobians(denoiser, schedule, states, steps[lo:], cond, self.derivatives)
                if jac is None:
                    jac = torch.zeros(T, B, D, D, device=device, dtype=traj.dtype)
                jac[lo:, rows] = fresh
                nfe += L * R * (D + 1)
            else:
                stepped, _ = evaluate_steps(denoiser, schedule, states, steps[lo:], cond)
                nfe += L * R
                if self.jacobian == "broyden" and prev_states is not None:
                    jac[lo:, rows] = self._broyden_update(
                        jac[lo:, rows], states - prev_states[lo:, rows], stepped - prev_stepped[lo:, rows]
                    )
            iterations += 1
            row_iterations[rows] = iterations
            target = stepped + xi[lo:, rows]
            err = (traj[lo + 1 :, rows] - target).abs().flatten(2).amax(-1)  # (L, R)
            err = torch.where(levels[lo:] + 1 <= frozen[rows], torch.zeros_like(err), err)  # final states
            bad = err > self.tolerance
            residual[rows] = err.amax(0)
            done = ~bad.any(0)  # every step satisfied: this row has converged
            # Newton update from each row's first unsatisfied step (its inputs are final, so its new
            # value is exact); rows whose residual grew take a plain step update (J = 0) instead.
            first_bad = torch.where(bad.any(0), bad.int().argmax(0), torch.full_like(rows, L))
            offsets = (target - traj[lo + 1 :, rows]).reshape(L, R, D)
            from_first_bad = (levels[:L] >= first_bad).unsqueeze(-1)  # (L, R, 1), window-local
            offsets = torch.where(from_first_bad, offsets, torch.zeros_like(offsets))
            use_newton = (residual[rows] <= prev_residual[rows]).view(1, R, 1, 1)
            prev_residual[rows] = residual[rows]
            coupling = torch.where(use_newton, jac[lo:, rows], torch.zeros_like(jac[lo:, rows]))
            delta = affine_recursion(coupling, offsets, self.recursion)
            delta = torch.where(done.view(1, R, 1), torch.zeros_like(delta), delta)
            traj[lo + 1 :, rows] = traj[lo + 1 :, rows] + delta.view(L, R, *shape)
            if self.jacobian == "broyden":
                if prev_states is None:
                    prev_states, prev_stepped = torch.zeros_like(traj[:-1]), torch.zeros_like(traj[:-1])
                prev_states[lo:, rows], prev_stepped[lo:, rows] = states, stepped
            frozen[rows] = torch.where(done, frozen[rows], lo + first_bad + 1)
            # Accepted without another round: every state was rebuilt from final inputs (exact), or the
            # updates contract fast enough that the estimated remaining error is below step_tolerance.
            update = delta.abs().flatten(2).amax(-1).amax(0)
            rate = update / prev_update[rows]  # inf before the second Newton update: no estimate yet
            contracting = torch.isfinite(prev_update[rows]) & (rate < 1)
            estimate = torch.where(contracting, update * rate / (1 - rate), torch.full_like(update, float("inf")))
            prev_update[rows] = torch.where(use_newton.view(R), update, torch.full_like(update, float("inf")))
            # Only quadratic (exact-Jacobian) convergence makes the estimate trustworthy: with chord/Broyden
            # Jacobians it let 50-seed closed loops end up to 5.3e-3 off (reports/closed_loop_gpu/).
            small = estimate <= (self.step_tolerance or 0.0) if self.jacobian == "exact" else torch.zeros_like(done)
            finished = done | (frozen[rows] >= T) | small
            active[rows] = ~finished
            if not bool(active.any()):
                break
            reason = clock.exhausted(iterations)
            if reason is not None:
                stop = reason
                break
        converged = stop == "converged"
        return SolveResult(
            sample=traj[-1],
            trajectory=traj,
            iterations=iterations,
            nfe=nfe,
            converged=converged,
            residual=0.0 if converged else float(residual[active].max()),
            wall_time_s=clock.elapsed(),
            stop_reason=stop,
            extras={"jacobians": jac},
            row_iterations=row_iterations.tolist(),
        )

    @staticmethod
    def _broyden_update(jac: torch.Tensor, ds: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
        """Good Broyden: J + (df - J ds) ds^T / |ds|^2, per step and batch row."""
        L, B = ds.shape[:2]
        s = ds.reshape(L, B, -1, 1)
        f = df.reshape(L, B, -1, 1)
        denom = (s * s).sum(dim=(-2, -1), keepdim=True)
        ok = denom > 1e-20
        update = (f - jac @ s) @ s.transpose(-1, -2) / denom.clamp(min=1e-20)
        return jac + torch.where(ok, update, torch.zeros_like(update))
