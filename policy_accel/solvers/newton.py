"""Parallel Newton for the denoising chain (DEER / DeepPCR-style), with cheap Jacobian variants.

Linearise every step around the current trajectory ``ybar`` and solve the linear recursion

    y_0 = x_T,   y_{j+1} = step_j(ybar_j) + xi_j + J_j (y_j - ybar_j),   J_j = d step_j / dy (ybar_j)

Evaluating all steps (and their Jacobians) is one batched round; the recursion is a short loop of
D x D matrix-vector products (D = horizon x action_dim, 32 for PushT). With fresh Jacobians the
error falls (nearly) quadratically. Whatever the Jacobians, the first unconverged state becomes exact each
round (its inputs are exact, so its update is the plain step), so a solve takes at most T rounds.

Jacobian strategies:
  * ``fresh``   - new Jacobians every round (finite differences, D extra rows per state; costly on a CPU).
  * ``chord``   - Jacobians once per solve (or carried in from the previous control step), reused.
  * ``broyden`` - chord plus a good-Broyden rank-1 secant update per step and round; no extra
                  network calls.
Safeguard: a round whose residual grew is followed by a plain step update (J = 0) instead of a
Newton update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

JACOBIAN_STRATEGIES = ("fresh", "chord", "broyden")


def step_jacobians(
    denoiser: Denoiser,
    schedule: Schedule,
    states: torch.Tensor,
    step_index: torch.Tensor,
    global_cond: torch.Tensor,
    max_rows: int = 4096,
    step_size: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step outputs (L, B, H, A) and their Jacobians wrt the input state (L, B, D, D), [out, in].

    Forward finite differences: one batch with a row per (state, basis direction), L * B * (D + 1)
    rows in chunks of at most ``max_rows``. Plain forward calls batch well on every device (forward-
    mode AD through Mish falls back to slow loops in torch 2.13), and the Jacobian only steers the
    iteration: the converged trajectory is checked against the exact steps, not the linearisation.
    """
    L, B = states.shape[:2]
    shape = states.shape[2:]
    D = shape.numel()
    stepped, _ = evaluate_steps(denoiser, schedule, states, step_index, global_cond)
    flat = states.reshape(L * B, D)
    base_out = stepped.reshape(L * B, D)
    rows_idx = step_index.repeat_interleave(B)
    cond = global_cond.repeat(L, 1)
    shift = step_size * torch.eye(D, device=states.device, dtype=states.dtype)
    jac = torch.empty(L * B, D, D, device=states.device, dtype=states.dtype)
    per_chunk = max(1, max_rows // D)
    for start in range(0, L * B, per_chunk):
        stop = min(start + per_chunk, L * B)
        n = stop - start
        perturbed = (flat[start:stop].unsqueeze(1) + shift).reshape(n * D, *shape)  # row r*D+k = y_r + h e_k
        idx = rows_idx[start:stop].repeat_interleave(D)
        eps = denoiser(perturbed, schedule.timesteps[idx], cond[start:stop].repeat_interleave(D, 0))
        out = schedule.step(perturbed, eps, idx).reshape(n, D, D)  # [row, k (input), out]
        jac[start:stop] = ((out - base_out[start:stop].unsqueeze(1)) / step_size).transpose(1, 2)
    return stepped, jac.view(L, B, D, D)


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
    jacobian: str = "fresh"
    tolerance: float = 2e-5  # max |y_{j+1} - step_j(y_j) - xi_j| over every step, normalized units
    recursion: str = "loop"  # "loop" | "scan": how the linear recursion is solved (see affine_recursion)
    name: str = "newton"

    def __post_init__(self) -> None:
        if self.jacobian not in JACOBIAN_STRATEGIES:
            raise ValueError(f"unknown Jacobian strategy {self.jacobian!r}; valid: {', '.join(JACOBIAN_STRATEGIES)}")
        if not self.tolerance > 0:
            raise ValueError(f"newton tolerance={self.tolerance} must be > 0")
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
        clock = Clock(budget, T)
        xi = step_noise(schedule, noise)
        traj = cold_trajectory(noise, T) if init is None else init.clone()
        traj[0] = noise.x_T
        steps = torch.arange(T, device=traj.device)

        jac = None
        carried = (carry or {}).get("jacobians")
        if self.jacobian != "fresh" and carried is not None and carried.shape == (T, B, D, D):
            jac = carried.clone()
        frozen = 0  # states y_0..y_frozen are final
        iterations = nfe = 0
        prev_residual = float("inf")
        prev_states = prev_stepped = None
        stop = "converged"
        residual = float("inf")
        while True:
            states = traj[frozen:T]
            L = T - frozen
            if self.jacobian == "fresh" or jac is None:
                stepped, fresh = step_jacobians(denoiser, schedule, states, steps[frozen:], global_cond)
                if jac is None:
                    jac = torch.zeros(T, B, D, D, device=traj.device, dtype=traj.dtype)
                jac[frozen:] = fresh
                nfe += L * B * (D + 1)
            else:
                stepped, _ = evaluate_steps(denoiser, schedule, states, steps[frozen:], global_cond)
                nfe += L * B
                if self.jacobian == "broyden" and prev_states is not None:
                    self._broyden_update(jac[frozen:], states - prev_states[-L:], stepped - prev_stepped[-L:])
            iterations += 1
            target = stepped + xi[frozen:]
            err = (traj[frozen + 1 :] - target).abs().flatten(2).amax(-1).amax(-1)  # (L,)
            residual = float(err.max())
            bad = (err > self.tolerance).nonzero()
            if len(bad) == 0:
                break
            first_bad = int(bad[0])
            use_newton = residual <= prev_residual
            prev_residual = residual
            # Newton update of the unconverged suffix. With d_j = y_j - ybar_j the linearised chain is
            # d_{j+1} = J_j d_j + (target_j - ybar_{j+1}), and d_base = 0: y_base's inputs have converged.
            base = frozen + first_bad
            offsets = (target[first_bad:] - traj[base + 1 :]).reshape(T - base, B, D)
            coupling = jac[base:] if use_newton else torch.zeros_like(jac[base:])
            delta = affine_recursion(coupling, offsets, self.recursion)
            new = traj.clone()
            new[base + 1 :] = traj[base + 1 :] + delta.view(T - base, B, *shape)
            prev_states, prev_stepped = states, stepped
            traj = new
            frozen = base + 1
            if frozen >= T:
                break  # every state was rebuilt from exact inputs: the output is the sequential one
            reason = clock.exhausted(iterations)
            if reason is not None:
                stop = reason
                break
        return SolveResult(
            sample=traj[-1],
            trajectory=traj,
            iterations=iterations,
            nfe=nfe,
            converged=stop == "converged",
            residual=residual if stop != "converged" or residual <= self.tolerance else 0.0,
            wall_time_s=clock.elapsed(),
            stop_reason=stop,
            extras={"jacobians": jac},
        )

    @staticmethod
    def _broyden_update(jac: torch.Tensor, ds: torch.Tensor, df: torch.Tensor) -> None:
        """Good Broyden: J += (df - J ds) ds^T / |ds|^2, per step and batch row, in place."""
        L, B = ds.shape[:2]
        s = ds.reshape(L, B, -1, 1)
        f = df.reshape(L, B, -1, 1)
        denom = (s * s).sum(dim=(-2, -1), keepdim=True)
        ok = denom > 1e-20
        update = (f - jac @ s) @ s.transpose(-1, -2) / denom.clamp(min=1e-20)
        jac += torch.where(ok, update, torch.zeros_like(update))
