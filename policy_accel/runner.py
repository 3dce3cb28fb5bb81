"""Closed-loop inference: observation history in, executed action chunk out, with optional warm starts.

A warm start reuses the previous control step's solve. The robot executed ``n_action_steps``
actions since then, so the previous trajectory (every denoising level) and its noise are shifted
by that many positions along the horizon; the freed tail is filled with the last position (states)
and fresh draws (noise). The solver then solves the chain *for that noise* exactly, checked against
the sequential sampler given the same noise: only the starting guess and the noise's correlation
across control steps change, never the solution of the chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from policy_accel.policy import DiffusionPolicy
from policy_accel.schedule import Schedule
from policy_accel.solvers.base import Budget, Noise, Solver, SolveResult


@dataclass
class InferenceRecord:
    """What one control step's inference cost and how it ended."""

    latency_s: float
    iterations: int
    nfe: int
    converged: bool
    stop_reason: str
    warm: bool


def shift_horizon(x: torch.Tensor, shift: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Shift ``x`` (..., H, A) left by ``shift`` along H; the tail repeats the last entry or takes ``fill``."""
    out = torch.empty_like(x)
    out[..., : x.shape[-2] - shift, :] = x[..., shift:, :]
    if fill is None:
        out[..., x.shape[-2] - shift :, :] = x[..., -1:, :]
    else:
        out[..., x.shape[-2] - shift :, :] = fill
    return out


class PolicyRunner:
    """Runs a :class:`DiffusionPolicy` with one solver at every control step of a batch of episodes."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        solver: Solver,
        schedule: Schedule,
        warm_start: bool = False,
        budget: Budget | None = None,
        seed: int = 0,
    ):
        self.policy = policy
        self.solver = solver
        self.schedule = schedule
        self.warm_start = warm_start
        self.budget = budget
        self.generator = torch.Generator().manual_seed(seed)
        self._previous: tuple[SolveResult, Noise] | None = None

    def reset(self, seed: int | None = None) -> None:
        """Forget the previous solve (a new episode); optionally reseed the sampler noise."""
        self._previous = None
        if seed is not None:
            self.generator.manual_seed(seed)

    def _noise_and_init(self, batch: int) -> tuple[Noise, torch.Tensor | None, dict | None]:
        fresh = self.policy.draw_noise(self.schedule, batch, self.generator)
        if not self.warm_start or self._previous is None or self._previous[1].x_T.shape[0] != batch:
            return fresh, None, None
        result, noise = self._previous
        shift = self.policy.config.n_action_steps
        keep = self.policy.config.horizon - shift
        noise = Noise(
            shift_horizon(noise.x_T, shift, fresh.x_T[..., keep:, :]),
            shift_horizon(noise.z, shift, fresh.z[..., keep:, :]),
        )
        init = shift_horizon(result.trajectory, shift)
        init[0] = noise.x_T
        return noise, init, result.extras

    @torch.inference_mode()
    def plan(self, obs_history: np.ndarray) -> tuple[np.ndarray, SolveResult, InferenceRecord]:
        """(B, n_obs_steps, obs_dim) observations -> executed actions (B, n_action_steps, action_dim)."""
        start = time.perf_counter()
        cond = self.policy.condition(obs_history)
        noise, init, carry = self._noise_and_init(cond.shape[0])
        result = self.policy.sample(cond, self.solver, self.schedule, noise, init=init, budget=self.budget, carry=carry)
        actions = self.policy.actions(result.sample)
        latency = time.perf_counter() - start
        if not np.all(np.isfinite(actions)):
            raise RuntimeError(f"solver {self.solver.name!r} returned non-finite actions ({result.stop_reason})")
        self._previous = (result, noise)
        record = InferenceRecord(
            latency, result.iterations, result.nfe, result.converged, result.stop_reason, init is not None
        )
        return actions, result, record
