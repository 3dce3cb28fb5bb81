"""The protocol every solver implements, and the pieces they share.

A solver solves the triangular system ``y_{j+1} = step_j(y_j) + noise_scale_j * z_j`` (j = 0..T-1,
``y_0 = x_T``) given all of its noise up front. ``solve`` is pure: everything a solve needs
(noise, conditioning, an optional initial trajectory, budgets) is passed in, and everything it
learned comes back in a :class:`SolveResult`, with a typed warm state (:class:`SolveState`) for the next solve.

Every solver treats a non-finite residual or sample as not converged: such a solve ends with
``converged=False`` and ``stop_reason="non_finite"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from policy_accel.multistep import dynamic_threshold
from policy_accel.schedule import Schedule
from policy_accel.schema import PositiveFloat, PositiveInt, check_fields

# eps = denoiser(sample (N, H, A), timestep (N,), global_cond (N, C))
# How a parallel solver shapes its rounds: "fixed" (same shapes every round: what CUDA graphs need, and cheap
# launches on a GPU), "free" (only what can still change: fewer network rows on a CPU), "auto" (fixed on CUDA).
ROUND_SHAPES = ("auto", "fixed", "free")
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

    max_iterations: PositiveInt | None = None
    time_s: PositiveFloat | None = None  # NaN or inf would never (or always) stop a solve

    def __post_init__(self) -> None:
        check_fields(self)

    def remaining(self, started: float) -> Budget:
        """What is left of this budget at this moment of an inference that began at ``started``
        (``time.perf_counter``) and runs several solves: its time shrinks by what was spent (at least one round still
        runs: a spent budget stops after it)."""
        if self.time_s is None:
            return self
        return Budget(self.max_iterations, max(self.time_s - (time.perf_counter() - started), 1e-9))


@dataclass
class SolveState:
    """A solve's warm start, and what one solve hands the next: the chain estimate (the initial trajectory of the
    solve it warms), and (subclasses) noise-independent solver state such as Newton's Jacobians. ``shifted`` moves
    it along the (horizon, channels) chunk by the actions executed in between; the overlap keeps its values and each
    new tail position repeats the last one."""

    trajectory: torch.Tensor  # (T+1, B, H, A)

    def shifted(self, shift: int) -> SolveState:
        return SolveState(shift_chunk(self.trajectory, shift))

    def check(self, schedule: Schedule, noise: Noise) -> None:
        """Raise if this state cannot warm-start a solve of this schedule and noise (a silent mismatch would be
        ignored or, worse, broadcast)."""
        expected = (schedule.num_steps + 1, *noise.x_T.shape)
        if tuple(self.trajectory.shape) != expected:
            raise ValueError(
                f"warm state trajectory has shape {tuple(self.trajectory.shape)}, this solve needs {expected}"
            )


def shift_chunk(x: torch.Tensor, shift: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., H, A) shifted left by ``shift`` along H; the new tail positions are ``fill`` (..., shift, A) or,
    without it, repeat the last position."""
    if not 0 <= shift <= x.shape[-2]:
        raise ValueError(f"shift={shift} must be in [0, {x.shape[-2]}]")
    tail = x[..., -1:, :].expand(*x.shape[:-2], shift, x.shape[-1]) if fill is None else fill
    return torch.cat([x[..., shift:, :], tail], dim=-2)


def check_state(state: SolveState | None, schedule: Schedule, noise: Noise) -> None:
    if state is None:
        return
    if not isinstance(state, SolveState):
        raise ValueError(f"warm state must be a SolveState (or None), got {type(state).__name__}")
    state.check(schedule, noise)


@dataclass
class RoundTrace:
    """One round of a parallel solve, for studies that read iterates (``solve(..., trace=fn)``).

    Tensors are the solver's own buffers, valid during the call only: clone what you keep. Reading them on the
    host costs a synchronisation the solve itself does not make.
    """

    iteration: int  # rounds done so far, this one included
    trajectory: torch.Tensor  # (T+1, B, H, A) after this round's update
    residual: torch.Tensor  # (B,) largest one-step residual each row had at this round's evaluation
    done: torch.Tensor  # (B,) bool: the row has converged (it no longer changes)


RoundHook = Callable[[RoundTrace], None]


@dataclass
class SolveResult:
    sample: torch.Tensor  # (B, H, A): the output estimate y_T
    trajectory: torch.Tensor  # (T+1, B, H, A): the whole chain estimate, y_0 = x_T
    iterations: int  # sequential rounds of network calls
    nfe: int  # network evaluations, one per batch row (Jacobian work included)
    converged: bool
    residual: float  # largest one-step residual |y_{j+1} - step_j(y_j) - xi_j| seen last
    wall_time_s: float
    stop_reason: str  # "converged" | "iteration_budget" | "time_budget" | "exhausted" | "non_finite"
    extras: dict = field(default_factory=dict)  # solver-specific diagnostics
    # Rounds each batch row needed, for solvers whose rows converge independently (a batch-1 solve of
    # that row would take as many); None when the batch moves together and every row took `iterations`.
    row_iterations: list[int] | None = None

    def rounds_per_row(self) -> list[int]:
        batch = self.sample.shape[0]
        return self.row_iterations if self.row_iterations is not None else [self.iterations] * batch

    # The warm state for the next solve (trajectory, plus e.g. Newton's Jacobians); None: nothing to carry.
    state: SolveState | None = None


class Solver(Protocol):
    # Capabilities are class attributes, never options: a user cannot relabel an approximate solver exact.
    name: ClassVar[str]
    # True when a warm start (``warm``) changes only the cost, never the answer beyond the stated tolerance;
    # False for solvers whose stopping test a good guess can pass early (ParaDiGMS compares successive iterates).
    exact_warm_start: ClassVar[bool]

    def solve(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        noise: Noise,
        global_cond: torch.Tensor,
        warm: SolveState | None = None,
        budget: Budget | None = None,
        trace: RoundHook | None = None,
    ) -> SolveResult: ...


class SolveClock:
    """Tracks one solve's iteration and time budgets (the controller's time source is ``control.Clock``)."""

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


def free_rounds(rounds: str, device: torch.device) -> bool:
    """Whether a solve on ``device`` uses free-shape rounds under the ``rounds`` option (see ROUND_SHAPES)."""
    return rounds == "free" or (rounds == "auto" and device.type != "cuda")


def largest_entry(x: torch.Tensor) -> torch.Tensor:
    """(L, B, ...) -> (L, B): the largest |entry| of each state, the parallel solvers' stopping measure. A NaN entry
    gives NaN, which each solver's non-finite check catches."""
    return x.abs().flatten(2).amax(-1)


def step_noise(schedule: Schedule, noise: Noise) -> torch.Tensor:
    """xi_j = noise_scale_j * z_j for every step, (T, B, H, A)."""
    return schedule.noise_scale.view(-1, *([1] * (noise.z.ndim - 1))) * noise.z


def cold_trajectory(noise: Noise, num_steps: int) -> torch.Tensor:
    """The standard cold start: every state a copy of x_T."""
    return noise.x_T.unsqueeze(0).repeat(num_steps + 1, *([1] * noise.x_T.ndim))


def start_solve(
    schedule: Schedule, noise: Noise, global_cond: torch.Tensor, warm: SolveState | None, budget: Budget | None
) -> SolveClock:
    """What every solve opens with: its inputs and warm state checked, its budget clock started."""
    check_inputs(schedule, noise, global_cond)
    check_state(warm, schedule, noise)
    return SolveClock(budget, schedule.num_steps)


class WorkspaceCache:
    """A solver's buffers for the one problem shape it solves now (a controller solves one shape over and over):
    built on the first solve of a (schedule, batch, chunk shape, dtype, device), reused until the shape changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._workspace = None

    def get(self, schedule: Schedule, noise: Noise, build: Callable[[], object]):
        x = noise.x_T
        key = (repr(schedule.describe()), str(schedule.device), x.shape, x.dtype, str(x.device))
        if key != self._key:
            self._key, self._workspace = key, build()
        return self._workspace


def check_inputs(schedule: Schedule, noise: Noise, global_cond: torch.Tensor) -> None:
    T = schedule.num_steps
    if noise.z.shape[0] != T or noise.z.shape[1:] != noise.x_T.shape:
        raise ValueError(
            f"noise.z must have shape ({T}, *x_T.shape) = ({T}, {tuple(noise.x_T.shape)}), got {tuple(noise.z.shape)}"
        )
    if global_cond.shape[0] != noise.x_T.shape[0]:
        raise ValueError(f"global_cond batch {global_cond.shape[0]} != sample batch {noise.x_T.shape[0]}")


def non_finite(result_sample: torch.Tensor) -> bool:
    """One host read: does the sample hold NaN or inf?"""
    return not bool(torch.isfinite(result_sample).all())


class RowStep:
    """``Schedule.step`` for rows whose coefficients are gathered once per solve (or per round by a device index),
    in five operators: the chain's arithmetic with fused multiply-adds, so a round dispatches no indexing.

    The fused forms round differently from ``Schedule.step`` by a float32 ulp; a parallel solve converges to its
    own step's fixed point, which differs from the sequential sample by round-off.
    """

    def __init__(self, schedule: Schedule):
        if schedule.is_multistep:
            raise ValueError(
                f"{schedule.config.kind} is a multistep sampler, not a one-step chain: only solver=sequential runs it"
            )
        self.schedule = schedule
        # (T, 4): sqrt(abar_t), sqrt(1 - abar_t), coefficient of x0, coefficient of y (DDPM) or eps (DDIM)
        self.table = torch.stack(
            [schedule.sqrt_alpha_prod, schedule.sqrt_beta_prod, schedule.coef_x0, schedule.coef_y], dim=1
        )

    def coefficients(self, index: torch.Tensor, ndim: int) -> tuple[torch.Tensor, ...]:
        """The four coefficients for rows ``index`` (N,), each shaped (N, 1, ...) to broadcast over ``ndim`` dims."""
        table = self.table[index].view(-1, 4, *([1] * (ndim - 1)))
        return table.unbind(1)

    def __call__(
        self, y: torch.Tensor, eps: torch.Tensor, coefs: tuple[torch.Tensor, ...], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        s0, s1, c_x0, c_y = coefs
        x0 = torch.addcmul(y, s1, eps, value=-1).div_(s0)
        config = self.schedule.config
        if config.thresholding:
            x0 = dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
        elif config.clip_sample:
            x0 = x0.clamp_(-1.0, 1.0)
        return torch.addcmul(c_y * (eps if self.schedule.is_ode else y), c_x0, x0, out=out)
