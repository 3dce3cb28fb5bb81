"""Closed-loop inference: observation history in, executed action chunk out, with optional warm starts.

Warm start: the robot executed ``n_action_steps`` actions since the previous inference, so the
previous trajectory (every denoising level) is shifted by that many positions along the horizon
and handed to the solver as its initial guess (Newton also gets the previous Jacobians, shifted
alike). The new tail positions (``tail_fill``):
  * ``repeat`` - each level repeats its last position.
  * ``chain``  - the sampler's chain run for the tail alone with this inference's noise, the denoiser
                 replaced by one that predicts the previous chunk's last action as the clean sample.
                 The repeated tail ignores the tail's fresh noise, so its first residual is O(1)
                 (3 normalized units on PushT); the chain's is ~0.07. It costs no network call, but Newton
                 repairs a repeated tail in its first round anyway: exact Newton on one PushT episode
                 took 5.71 rounds per inference with it against 5.82 (reports/closed_loop_gpu/README.md).
Either way the solver still solves the chain for *this* inference's noise to its tolerance, so a
warm start changes the cost, never the answer.

Noise policy (for every solver, sequential included, so runs compare on the same noise):
  * ``fresh``   - new noise at every inference.
  * ``coupled`` - the previous noise shifted like the trajectory, fresh draws only where new time
                  steps enter. Every draw is still standard normal, so each chunk is a sample of
                  the same policy; consecutive chunks become correlated (their overlap shares
                  noise), like a temporally consistent policy. Identical noise at every inference
                  is not offered: it makes the policy deterministic and it can stall forever.

APPROXIMATE warm start ``warm_start="renoise"`` (with ``renoise_steps=k``): the previous final sample
is shifted like above, re-noised to the level of the schedule's step ``T-k`` with the forward process
q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eps = this inference's x_T draw), and only the
schedule's last ``k`` steps are run (``Schedule.tail(k)``, with the solver the session holds). This
changes the sampling distribution: the result is not the sampler's output for any noise, so it trades
exactness for k network calls per control step (the idea of streaming / real-time-iteration diffusion
policies). ``session.approximate`` is True (also for warm-started paradigms, which is not reliably exact)
and every report labels such runs. The first inference of an episode is a full cold solve.

APPROXIMATE published warm starts (``policy_accel/warm_starts.py``, knobs in ``warm_options``): ``warm_start="rti"``
(RTI-DP: the shifted previous clean chunk run through the schedule's last steps without re-noising) and
``warm_start="falcon"`` (Falcon: restart from a buffered partially denoised chunk chosen by a one-step threshold rule).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from policy_accel.errors import CheckpointError, ObservationError
from policy_accel.observations import ObservationHistory, check_observation
from policy_accel.policy import DiffusionPolicy
from policy_accel.schedule import Schedule
from policy_accel.schema import PositiveInt, check_mapping, check_value
from policy_accel.solvers.base import Budget, Noise, Solver, SolveResult, SolveState, step_noise
from policy_accel.solvers.sequential import SequentialSolver, fused_chain
from policy_accel.warm_starts import FalconConfig, FalconState, RTIConfig, falcon_solve, rti_chain

NOISE_POLICIES = ("fresh", "coupled")
TAIL_FILLS = ("repeat", "chain")
# off | exact (same answer, cheaper) | approximate: re-noise + last k steps, RTI-DP, Falcon (warm_starts.py)
WARM_STARTS = (False, True, "renoise", "rti", "falcon")
# The constructor's schema (policy_accel/schema.py): check_exactness="no" would read as true, seed=1.5 fail in torch.
_ARGUMENTS = {
    "noise": Literal[NOISE_POLICIES],
    "budget": Budget | None,
    "seed": int,
    "check_exactness": bool,
    "renoise_steps": PositiveInt | None,
    "tail_fill": Literal[TAIL_FILLS],
    "warm_options": dict | None,
}
log = logging.getLogger(__name__)
OBSERVATION_RANGE = 1e3  # normalized units; beyond this a non-finite network output is blamed on the observation


@dataclass
class InferenceRecord:
    """What one control step's inference cost and how it ended."""

    latency_s: float
    iterations: int
    nfe: int
    converged: bool
    stop_reason: str
    warm: bool
    # max |sample - sequential sample| on the chain the solver solved, same noise (check_exactness only); for a
    # renoise warm start that chain is the schedule's tail from the re-noised start, so the approximation of the
    # re-noising itself is not in it (it is labelled by ``Session.approximate`` instead).
    deviation: float | None = None
    row_iterations: list[int] | None = None  # rounds per batch row (= a batch-1 solve's count for Newton)


class Plan(NamedTuple):
    """What one control step's inference returns: the executed raw actions (B, n_action_steps, action_dim), the
    solve (normalized chunk, trajectory, warm state, stats) and its record."""

    actions: np.ndarray
    result: SolveResult
    record: InferenceRecord


def tail_chain(schedule: Schedule, clean: torch.Tensor, x_T: torch.Tensor, added_noise: torch.Tensor) -> torch.Tensor:
    """The chain (T+1, *x_T.shape) from ``x_T`` with per-step noise ``added_noise`` (T, ...) for a denoiser that
    predicts ``clean`` (shaped like ``x_T``) at every level: each step's epsilon maps its state to ``clean``."""
    out = torch.empty((schedule.num_steps + 1, *x_T.shape), dtype=x_T.dtype, device=x_T.device)
    out[0] = x_T
    rows = torch.zeros(x_T.shape[0], dtype=torch.long, device=x_T.device)
    for j in range(schedule.num_steps):
        eps = (out[j] - schedule.sqrt_alpha_prod[j] * clean) / schedule.sqrt_beta_prod[j]
        out[j + 1] = schedule.step(out[j], eps, rows + j) + added_noise[j]
    return out


def shift_horizon(x: torch.Tensor, shift: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Shift ``x`` (..., H, A) left by ``shift`` along H; the tail repeats the last entry or takes ``fill``."""
    tail = x[..., -1:, :].expand(*x.shape[:-2], shift, x.shape[-1]) if fill is None else fill
    return torch.cat([x[..., shift:, :], tail], dim=-2)


class Session:
    """Runs a :class:`DiffusionPolicy` with one solver at every control step of a batch of episodes."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        solver: Solver,
        schedule: Schedule,
        warm_start: bool | str = False,
        noise: str = "fresh",
        budget: Budget | None = None,
        seed: int = 0,
        check_exactness: bool = False,
        renoise_steps: int | None = None,
        tail_fill: str = "repeat",
        warm_options: dict | None = None,
    ):
        arguments = locals()
        for name, hint in _ARGUMENTS.items():  # each one line naming the argument
            check_value(arguments[name], hint, name)
        if not any(warm_start is w or (isinstance(w, str) and warm_start == w) for w in WARM_STARTS):
            raise ValueError(
                f"unknown warm_start {warm_start!r}; valid: false, true (exact), renoise, rti, falcon (approximate)"
            )
        if warm_start == "renoise":
            if renoise_steps is None or not 1 <= renoise_steps <= schedule.num_steps:
                raise ValueError(
                    f"warm_start='renoise' needs renoise_steps in [1, {schedule.num_steps}] (the schedule's last "
                    f"steps to run), got {renoise_steps!r}"
                )
        elif renoise_steps is not None:
            raise ValueError(f"renoise_steps={renoise_steps} is only used with warm_start='renoise'")
        self.rti = self.falcon = None  # the published approximate warm starts' knobs (policy_accel/warm_starts.py)
        if warm_start in ("rti", "falcon"):
            options = dict(warm_options or {})
            cls = RTIConfig if warm_start == "rti" else FalconConfig
            check_mapping(options, cls, f"{warm_start}.", owner=f"warm_start={warm_start!r}")
            if warm_start == "rti":
                self.rti = RTIConfig(**options)
                self.rti.validate(schedule, policy.config.action_dim)
            else:
                self.falcon = FalconConfig(**options)
                self.falcon.validate(schedule)
        elif warm_options:
            raise ValueError(f"warm_options {warm_options} are only used with warm_start='rti' or 'falcon'")
        # Warm paradigms' stopping test compares successive iterates: not reliably exact (0.24 off on Can).
        unreliable_warm_start = warm_start is True and not solver.exact_warm_start
        if unreliable_warm_start:
            log.warning(
                f"warm-started {solver.name} is not reliably exact: its stopping test compares successive iterates, "
                "which a good guess passes early (measured up to 0.24 off at tau 0.01); its results are labelled "
                "approximate; prefer solver=newton"
            )
        self.policy = policy
        self.noise = noise
        self.check_exactness = check_exactness
        self._reference = SequentialSolver()
        self.solver = solver
        self.schedule = schedule
        self.warm_start = warm_start
        self.tail_fill = tail_fill
        self.renoise_steps = renoise_steps
        self.renoise = warm_start == "renoise"
        # True when the session's chunks are not (reliably) the sampler's output for their noise: labelled in every
        # report and kept out of exact fronts. A reduced-precision engine (bf16) is such an approximation too.
        self.approximate = (
            self.renoise or unreliable_warm_start or warm_start in ("rti", "falcon") or policy.engine.approximate
        )
        self._tail = schedule.tail(renoise_steps) if self.renoise else None
        self.prepare()
        self.budget = budget
        self.generator = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Forget the episode (previous solve, observation history, queued actions); optionally reseed the noise."""
        self._previous: tuple[SolveResult, Noise] | None = None
        self._falcon_state = FalconState()
        self._histories: list[ObservationHistory] = []
        self._queue: deque[np.ndarray] = deque()
        self.last_plan: Plan | None = None
        if seed is not None:
            self.generator.manual_seed(seed)

    def select_action(self, obs: np.ndarray) -> np.ndarray:
        """The newest observation (B, obs_dim) in, the action (B, action_dim) to execute now out (LeRobot's
        ``select_action``): the session keeps each row's observation history (DP's start padding) and plans a new
        chunk when the previous chunk's ``n_action_steps`` actions are spent; ``last_plan`` holds its solve."""
        obs_dim = self.policy.config.obs_dim
        obs = check_observation(obs, (None, obs_dim))
        if not self._histories:
            self._histories = [ObservationHistory(self.policy.config.n_obs_steps, obs_dim) for _ in range(len(obs))]
        elif len(self._histories) != obs.shape[0]:
            raise ObservationError(f"{obs.shape[0]} observations for a session of {len(self._histories)} rows")
        for history, row in zip(self._histories, obs, strict=True):
            history.push(row)
        if not self._queue:
            self.last_plan = self.plan(np.stack([h.stacked() for h in self._histories]))
            self._queue.extend(np.swapaxes(self.last_plan.actions, 0, 1))  # one (B, action_dim) per step
        return self._queue.popleft()

    def _noise_and_init(self, batch: int) -> tuple[Noise, torch.Tensor | None, SolveState | None]:
        """This inference's noise (by the noise policy) and, for an exact warm start, the solver's initial guess."""
        fresh = self.policy.draw_noise(self.schedule, batch, self.generator)
        if self._previous is None or self._previous[1].x_T.shape[0] != batch:
            return fresh, None, None
        result, previous_noise = self._previous
        shift, horizon = self.policy.config.n_action_steps, self.policy.config.horizon
        noise = fresh
        if self.noise == "coupled":
            keep = horizon - shift
            noise = Noise(
                shift_horizon(previous_noise.x_T, shift, fresh.x_T[..., keep:, :]),
                shift_horizon(previous_noise.z, shift, fresh.z[..., keep:, :]),
            )
        if self.warm_start is not True:  # off, or renoise (which needs no initial trajectory)
            return noise, None, None
        # The solver's warm state (trajectory, plus e.g. Newton's Jacobians) shifted by the executed actions.
        state = (result.state or SolveState(result.trajectory)).shifted(shift)
        init = state.trajectory
        init[0] = noise.x_T
        if self.tail_fill == "chain":
            keep = horizon - shift
            clean = result.sample[:, -1:, :].expand(-1, shift, -1)
            tail_noise = step_noise(self.schedule, noise)[:, :, keep:, :]
            init[:, :, keep:, :] = tail_chain(self.schedule, clean, noise.x_T[:, keep:, :], tail_noise)
        return noise, init, state

    def _renoised_chain(self, previous_sample: torch.Tensor, noise: Noise) -> tuple[Schedule, Noise]:
        """APPROXIMATE warm start: the shifted previous sample re-noised to the tail's first level, and the tail.

        The re-noising draw is this inference's ``x_T`` and the tail steps keep their own ``z`` rows, so the
        generator is consumed exactly as in a cold solve (and the noise policy applies unchanged).
        """
        tail = self._tail
        x0 = shift_horizon(previous_sample, self.policy.config.n_action_steps)
        start = tail.add_noise(x0, noise.x_T, 0)
        return tail, Noise(start, noise.z[noise.z.shape[0] - tail.num_steps :])

    def _raise_non_finite(self, result: SolveResult, cond: torch.Tensor) -> None:
        """Name the cause of non-finite actions: the policy's weights or normalizers (changed since loading), an
        observation far outside the training range (finite, but the network overflows on it), and only when neither,
        the network or solver diverging."""
        try:
            self.policy.check_finite()
        except ValueError as err:
            raise CheckpointError(f"the policy's weights are not finite, not the solver: {err}") from None
        peak = float(cond.abs().max())
        if peak > OBSERVATION_RANGE:
            raise ObservationError(
                f"the normalized observation reaches {peak:.3g} (the training data spans [-1, 1]) and the network "
                "returned non-finite values on it: check the observation's units and layout"
            )
        raise RuntimeError(
            f"solver {self.solver.name!r} returned non-finite actions ({result.stop_reason}) from a finite observation "
            "and finite weights: the network or the solver diverged"
        )

    def prepare(self) -> None:
        """Compile what the policy's engine can run as one program for this session (the sequential chains of its
        sampler and re-noise tail): now, before a control loop, never inside its first inference. Call it again
        after changing the policy's engine."""
        if self.solver.name == "sequential":
            for chain in (self.schedule, self._tail):
                if chain is not None:
                    fused_chain(self.policy.denoiser, chain, compile=True)

    @torch.inference_mode()
    def plan(self, obs_history: np.ndarray, budget: Budget | None = None) -> Plan:
        """(B, n_obs_steps, obs_dim) observations -> executed actions (B, n_action_steps, action_dim).

        ``budget`` overrides ``self.budget`` for this call (a real-time controller's deadline).
        """
        start = time.perf_counter()
        self.policy.sync_engine()
        cond = self.policy.condition(obs_history)
        batch = cond.shape[0]
        renoise = self.renoise and self._previous is not None and self._previous[1].x_T.shape[0] == batch
        noise, init, carry = self._noise_and_init(batch)
        schedule, chain_noise = self.schedule, noise
        shift = self.policy.config.n_action_steps
        rti = self.rti is not None and self._previous is not None and self._previous[1].x_T.shape[0] == batch
        if renoise:
            schedule, chain_noise = self._renoised_chain(self._previous[0].sample, noise)
        elif rti:
            schedule, chain_noise = rti_chain(self.schedule, self._previous[0].sample, noise, shift, self.rti)
        if self.falcon is not None:
            result, self._falcon_state, falcon_info = falcon_solve(
                self._falcon_state, self.policy.denoiser, self.solver, self.schedule, noise, cond, shift, self.falcon,
                self.generator, budget or self.budget,
            )  # fmt: skip
            rti = any(s > 0 for s in falcon_info["start_steps"])  # warm when any row restarted from the buffer
        else:
            result = self.solver.solve(
                self.policy.denoiser, schedule, chain_noise, cond, init=init, budget=budget or self.budget, carry=carry
            )
        actions = self.policy.actions(result.sample)
        latency = time.perf_counter() - start
        if not np.all(np.isfinite(actions)):
            self._raise_non_finite(result, cond)
        self._previous = (result, noise)
        deviation = None
        # untimed: the sequential sampler on the same chain, noise and observation (not Falcon: its chains are per row)
        if self.check_exactness and self.falcon is None:
            reference = self._reference.solve(self.policy.denoiser, schedule, chain_noise, cond)
            deviation = float((result.sample - reference.sample).abs().max())
        record = InferenceRecord(
            latency,
            result.iterations,
            result.nfe,
            result.converged,
            result.stop_reason,
            init is not None or renoise or rti,
            deviation,
            result.rounds_per_row(),
        )
        return Plan(actions, result, record)
