"""The protocol every solver implements, and the pieces they share.

A solver solves the triangular system ``y_{j+1} = step_j(y_j) + noise_scale_j * z_j`` (j = 0..T-1,
``y_0 = x_T``) given all of its noise up front. ``solve`` is pure: everything a solve needs
(noise, conditioning, an optional initial trajectory, budgets) is passed in, and everything it
learned comes back in a :class:`SolveResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from policy_accel.schedule import Schedule

# eps = denoiser(sample (N, H, A), timestep (N,), global_cond (N, C))
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Noise:
    """All noise of one sampling run: the initial state and one draw per step."""

    x_T: torch.Tensor  # (B, H, A)
    z: torch.Tensor  # (T, B, H, A)

    @classmethod
    def draw(
        cls, num_steps: int, shape: tuple[int, ...], generator: torch.Generator | None = None, device="cpu"
    ) -> Noise:
        x_T = torch.randn(shape, generator=generator, device=device)
        z = torch.randn((num_steps, *shape), generator=generator, device=device)
        return cls(x_T, z)

    def to_device(self, device: torch.device | str) -> Noise:
        return Noise(self.x_T.to(device), self.z.to(device))


@dataclass
class Budget:
    """Limits on one solve; a solve that reaches one returns its current estimate, flagged."""

    max_iterations: int | None = None
    time_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError(f"max_iterations={self.max_iterations} must be >= 1")
        if self.time_s is not None and self.time_s <= 0:
            raise ValueError(f"time_s={self.time_s} must be > 0")


@dataclass
class SolveResult:
    sample: torch.Tensor  # (B, H, A): the output estimate y_T
    trajectory: torch.Tensor  # (T+1, B, H, A): the whole chain estimate, y_0 = x_T
    iterations: int  # sequential rounds of network calls
    nfe: int  # network evaluations, one per batch row (Jacobian work included)
    converged: bool
    residual: float  # largest one-step residual |y_{j+1} - step_j(y_j) - xi_j| seen last
    wall_time_s: float
    stop_reason: str  # "converged" | "iteration_budget" | "time_budget" | "exhausted"
    extras: dict = field(default_factory=dict)  # solver state worth carrying (e.g. Jacobians)
    # Rounds each batch row needed, for solvers whose rows converge independently (a batch-1 solve of
    # that row would take as many); None when the batch moves together and every row took `iterations`.
    row_iterations: list[int] | None = None

    def rounds_per_row(self) -> list[int]:
        batch = self.sample.shape[0]
        return self.row_iterations if self.row_iterations is not None else [self.iterations] * batch


class Solver(Protocol):
    name: str

    def solve(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        noise: Noise,
        global_cond: torch.Tensor,
        init: torch.Tensor | None = None,
        budget: Budget | None = None,
        carry: dict | None = None,
    ) -> SolveResult: ...


class Clock:
    """Tracks a solve's iteration and time budgets."""

    def __init__(self, budget: Budget | None, num_steps: int):
        budget = budget or Budget()
        self.max_iterations = min(budget.max_iterations or num_steps, num_steps)
        self.time_s = budget.time_s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self, iterations: int) -> str | None:
        if iterations >= self.max_iterations:
            return "iteration_budget"
        if self.time_s is not None and self.elapsed() >= self.time_s:
            return "time_budget"
        return None


def evaluate_steps(
    denoiser: Denoiser,
    schedule: Schedule,
    states: torch.Tensor,
    step_index: torch.Tensor,
    global_cond: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched network call: steps ``step_index`` (L,) applied to ``states`` (L, B, H, A).

    Returns the deterministic step outputs and the network outputs, both (L, B, H, A).
    """
    L, B = states.shape[:2]
    flat = states.reshape(L * B, *states.shape[2:])
    rows = step_index.repeat_interleave(B)
    cond = global_cond.repeat(L, 1)
    eps = denoiser(flat, schedule.timesteps[rows], cond)
    out = schedule.step(flat, eps, rows)
    return out.view_as(states), eps.view_as(states)


def step_noise(schedule: Schedule, noise: Noise) -> torch.Tensor:
    """xi_j = noise_scale_j * z_j for every step, (T, B, H, A)."""
    return schedule.noise_scale.view(-1, *([1] * (noise.z.ndim - 1))) * noise.z


def cold_trajectory(noise: Noise, num_steps: int) -> torch.Tensor:
    """The standard cold start: every state a copy of x_T."""
    return noise.x_T.unsqueeze(0).repeat(num_steps + 1, *([1] * noise.x_T.ndim))


def check_inputs(schedule: Schedule, noise: Noise, global_cond: torch.Tensor, init: torch.Tensor | None) -> None:
    T = schedule.num_steps
    if noise.z.shape[0] != T or noise.z.shape[1:] != noise.x_T.shape:
        raise ValueError(
            f"noise.z must have shape ({T}, *x_T.shape) = ({T}, {tuple(noise.x_T.shape)}), got {tuple(noise.z.shape)}"
        )
    if global_cond.shape[0] != noise.x_T.shape[0]:
        raise ValueError(f"global_cond batch {global_cond.shape[0]} != sample batch {noise.x_T.shape[0]}")
    if init is not None and init.shape != (T + 1, *noise.x_T.shape):
        raise ValueError(f"init trajectory must have shape {(T + 1, *noise.x_T.shape)}, got {tuple(init.shape)}")


def one_step_residual(trajectory: torch.Tensor, stepped: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """max |y_{j+1} - step_j(y_j) - xi_j| per step and batch row, (T, B)."""
    return (trajectory[1:] - stepped - xi).abs().flatten(2).amax(-1)
