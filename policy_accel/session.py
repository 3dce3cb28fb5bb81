"""Closed-loop inference: observation history in, executed action chunk out, with a warm start across steps.

The warm start (``policy_accel/warm_starts.py``: cold, exact, tail restarts (re-noise, RTI-DP), Falcon) prepares each
inference's chain from the previous result and may own the solve; the session draws the noise, runs the plan below
as one straight line, and labels the run: ``session.approximate`` is True when its chunks are not (reliably) the
sampler's output for their noise (an approximate warm start, a warm solver whose stopping test a good guess fools,
or a reduced-precision engine), and every report labels such runs.

Noise policy (for every solver, sequential included, so runs compare on the same noise):
  * ``fresh``   - new noise at every inference.
  * ``coupled`` - the previous noise shifted like the trajectory, fresh draws only where new time
                  steps enter. Every draw is still standard normal, so each chunk is a sample of
                  the same policy; consecutive chunks become correlated (their overlap shares
                  noise), like a temporally consistent policy. Identical noise at every inference
                  is not offered: it makes the policy deterministic and it can stall forever.

The first inference of an episode (and the first after the batch size changes) is always cold.
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
from policy_accel.observations import Observation, ObservationHistory, stack_observations, unstack_observations
from policy_accel.policy import DiffusionPolicy
from policy_accel.schedule import Schedule
from policy_accel.schema import PositiveInt, check_value
from policy_accel.solvers.base import Budget, Noise, Solver, SolveResult, shift_chunk
from policy_accel.solvers.sequential import SequentialSolver, fused_chain
from policy_accel.warm_starts import TAIL_FILLS, WarmStart, make_warm_start

NOISE_POLICIES = ("fresh", "coupled")
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
    # of ``latency_s``: the observation to the network's condition (normalization, and an image policy's encoder,
    # which runs once per inference), so reports can show what the denoiser's solve left to the encoder
    condition_s: float = 0.0


class Plan(NamedTuple):
    """What one control step's inference returns: the executed raw actions (B, n_action_steps, action_dim), the
    solve (normalized chunk, trajectory, warm state, stats) and its record."""

    actions: np.ndarray
    result: SolveResult
    record: InferenceRecord


class Session:
    """Runs a :class:`DiffusionPolicy` with one solver at every control step of a batch of episodes."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        solver: Solver,
        schedule: Schedule,
        warm_start: bool | str | WarmStart = False,
        noise: str = "fresh",
        budget: Budget | None = None,
        seed: int = 0,
        check_exactness: bool = False,
        renoise_steps: int | None = None,
        tail_fill: str = "repeat",
        warm_options: dict | None = None,
    ):
        """``warm_start``: a :class:`~policy_accel.warm_starts.WarmStart`, or a config's ``warm_start`` value with
        its ``renoise_steps`` / ``tail_fill`` / ``warm_options`` (:func:`~policy_accel.warm_starts.make_warm_start`).
        """
        arguments = locals()
        for name, hint in _ARGUMENTS.items():  # each one line naming the argument
            check_value(arguments[name], hint, name)
        if isinstance(warm_start, WarmStart):
            self.warm = warm_start
        else:
            self.warm = make_warm_start(warm_start, renoise_steps, tail_fill, warm_options)
        self.warm.bind(schedule, policy.config.action_dim, solver)
        self.policy = policy
        self.noise = noise
        self.check_exactness = check_exactness
        self._reference = SequentialSolver()
        self.solver = solver
        self.schedule = schedule
        # True when the session's chunks are not (reliably) the sampler's output for their noise: labelled in every
        # report and kept out of exact fronts. A reduced-precision engine (bf16) is such an approximation too.
        self.approximate = self.warm.approximate(solver) or policy.engine.approximate
        self.prepare()
        self.budget = budget
        self.generator = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Forget the episode (previous solve, observation history, queued actions); optionally reseed the noise."""
        self.warm.reset()
        self._previous_noise: Noise | None = None
        self._histories: list[ObservationHistory] = []
        self._queue: deque[np.ndarray] = deque()
        self.last_plan: Plan | None = None
        if seed is not None:
            self.generator.manual_seed(seed)

    def select_action(self, obs: Observation) -> np.ndarray:
        """The newest observation (B, obs_dim), or for an image policy a dict of (B, ...) arrays (cameras: float
        images in [0, 1], (C, H, W) per row), in; the action (B, action_dim) to execute now out (LeRobot's
        ``select_action``): the session keeps each row's observation history (DP's start padding) and plans a new
        chunk when the previous chunk's ``n_action_steps`` actions are spent; ``last_plan`` holds its solve."""
        rows = unstack_observations(self.policy.check_observation(obs, (None,)))
        if not self._histories:
            self._histories = [self.policy.observation_history() for _ in rows]
        elif len(self._histories) != len(rows):
            raise ObservationError(f"{len(rows)} observations for a session of {len(self._histories)} rows")
        for history, row in zip(self._histories, rows, strict=True):
            history.push(row)
        if not self._queue:
            self.last_plan = self.plan(stack_observations([h.stacked() for h in self._histories]))
            self._queue.extend(np.swapaxes(self.last_plan.actions, 0, 1))  # one (B, action_dim) per step
        return self._queue.popleft()

    def _noise(self, batch: int) -> Noise:
        """This inference's noise by the noise policy (the generator is consumed alike whatever the warm start). A
        batch of another size than the previous inference's starts a new episode: the warm start forgets it."""
        fresh = self.policy.draw_noise(self.schedule, batch, self.generator)
        previous = self._previous_noise
        if previous is None or previous.x_T.shape[0] != batch:
            self.warm.reset()
            return fresh
        if self.noise == "fresh":
            return fresh
        shift = self.policy.config.n_action_steps
        keep = self.policy.config.horizon - shift
        return Noise(
            shift_chunk(previous.x_T, shift, fresh.x_T[..., keep:, :]),
            shift_chunk(previous.z, shift, fresh.z[..., keep:, :]),
        )

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
        sampler and its warm start's tails): now, before a control loop, never inside its first inference. Call it again
        after changing the policy's engine."""
        if self.solver.name == "sequential":
            for chain in self.warm.chains(self.schedule):
                fused_chain(self.policy.denoiser, chain, compile=True)

    @torch.inference_mode()
    def plan(self, obs_history: Observation, budget: Budget | None = None) -> Plan:
        """(B, n_obs_steps, obs_dim) observations (an image policy: a dict of (B, n_obs_steps, ...) arrays,
        :meth:`DiffusionPolicy.condition`) -> executed actions (B, n_action_steps, action_dim).

        ``budget`` overrides ``self.budget`` for this call (a real-time controller's deadline).
        """
        start = time.perf_counter()
        self.policy.sync_engine()
        conditioning = time.perf_counter()
        cond = self.policy.condition(obs_history)
        condition_s = time.perf_counter() - conditioning
        noise = self._noise(cond.shape[0])
        chain = self.warm.prepare(self.schedule, noise, self.policy.config.n_action_steps, cond)
        result, warm = self.warm.solve(
            self.solver, self.policy.denoiser, chain, cond, budget or self.budget, self.generator
        )
        actions = self.policy.actions(result.sample)
        latency = time.perf_counter() - start
        if not np.all(np.isfinite(actions)):
            self._raise_non_finite(result, cond)
        self.warm.update(result)
        self._previous_noise = noise
        deviation = None
        if self.check_exactness and self.warm.checkable:  # untimed: the sequential sampler on the same chain
            reference = self._reference.solve(self.policy.denoiser, chain.schedule, chain.noise, cond)
            deviation = float((result.sample - reference.sample).abs().max())
        record = InferenceRecord(
            latency,
            result.iterations,
            result.nfe,
            result.converged,
            result.stop_reason,
            warm,
            deviation,
            result.rounds_per_row(),
            condition_s,
        )
        return Plan(actions, result, record)
