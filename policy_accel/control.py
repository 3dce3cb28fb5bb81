"""A fixed-rate controller that runs Diffusion Policy inference in the background.

A robot's control loop must tick at its own rate whatever inference costs. :class:`RealTimeController`
is what such a loop calls: ``observe(obs, t)`` when an observation arrives, ``act(t)`` once per tick.
Inference runs in one worker thread on the newest observation history, and the next chunk is computed
while the current one executes, so inference latency is hidden up to the chunk length.

Timing convention (Diffusion Policy's, ``action_offset = 0``): a chunk planned from an observation
history whose newest observation was *taken* at time ``t_obs`` holds actions meant for the ticks
``t_obs + (action_offset + i) * dt``, i = 0..n-1 (Diffusion Policy's executed chunk starts at the
prediction step of the newest observation). ``act(t)`` returns the action meant for the tick at ``t``;
an action matches a tick within half a period.

Queue and hand-over: a new chunk takes over at the end of the current one; its actions for ticks that
the queue already covers are dropped (*overlap*), and so are actions whose tick has already been served
or cannot be commanded in time, ``t_action < now + act_latency_s`` (*stale*, as Diffusion Policy's
real-robot evaluation drops them). By default a chunk contributes its remaining executed actions, so the
controller replans more often than once per chunk when inference is slow. With ``chunk_steps=n`` it
executes ``n`` actions from the hand-over on, reaching into its ``reserve`` (the rest of the predicted
horizon): chunks then start every ``n`` ticks, the prediction is used ``lead`` ticks further out.

Deadline-aware solving: the next inference starts when waiting for one more observation would leave
less than the expected latency (``lead_s``, or the slowest of the recent inferences times
``latency_safety``) before the queue runs dry. The planner is handed the time left until then as its
time budget, less the most any recent solve ran past its own (a solver checks its budget between
iterations); a parallel solver that runs out returns its current estimate, counted as an *unconverged*
inference, not an error.

Fallback when the queue runs dry (counted as a *miss*): ``"hold"`` commands ``hold_action(newest
observation)`` if given, else repeats the last action (for position control: stay at the last target);
``"continue"`` executes the newest chunk's own prediction for that tick (its ``reserve``, the horizon
past the executed chunk) and holds only past its end.

Example (a robot loop at 10 Hz; ``session`` is a :class:`~policy_accel.session.Session`)::

    clock = MonotonicClock()
    with RealTimeController(SessionPlanner(session), dt=0.1, n_obs_steps=2, hold_action=hold) as ctrl:
        t0 = ctrl.start_episode(robot.observe())       # the robot waits at rest for its first chunk
        for k in itertools.count():
            t = t0 + k * 0.1                           # absolute tick times: the period cannot drift
            clock.sleep_until(t)
            if k:
                ctrl.observe(robot.observe(), t)       # the observation and when it was taken
            robot.command(ctrl.act(t).action)

``eval/realtime.py`` is the full integration with PushT, injected delays and the measurements.

Threading: one caller thread drives ``observe``/``act``; the worker only runs the planner. An exception
in the planner surfaces in the caller's next call as :class:`InferenceError` chained to the original
exception (with its traceback). ``stop()`` (or leaving the ``with`` block) joins the worker: no thread is
left running.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from policy_accel.errors import ConfigError, ObservationError
from policy_accel.observations import Observation, ObservationHistory, stack_observations
from policy_accel.schema import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_value,
)

if TYPE_CHECKING:  # the controller itself needs neither torch nor the policy
    from policy_accel.session import Session

FALLBACKS = ("hold", "continue")


class Clock(Protocol):
    """Monotonic time in seconds; injected so tests run on a fake clock and robots on a real one."""

    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    """The wall clock: ``time.monotonic``, immune to system clock changes."""

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        """Sleep until ``t`` (never returns early; ``time.sleep`` may)."""
        while (left := t - time.monotonic()) > 0:
            time.sleep(left)


class FakeClock:
    """A clock that moves only when told to: ``sleep_until``/``advance`` jump instantly. Thread-safe."""

    def __init__(self, start: float = 0.0):
        self._t = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def sleep_until(self, t: float) -> None:
        with self._lock:
            self._t = max(self._t, float(t))

    def advance(self, dt: float) -> None:
        with self._lock:
            self._t += float(dt)


@dataclass
class PlannedChunk:
    """A planner's answer: ``actions[i]`` is meant for ``t_obs + (action_offset + i) * dt``."""

    actions: np.ndarray  # (n, action_dim)
    converged: bool = True  # False: the solver stopped on its budget and returned its current estimate
    reserve: np.ndarray | None = None  # (m, action_dim) predictions past the chunk (chunk_steps, "continue")
    info: dict = field(default_factory=dict)


# obs_history (n_obs_steps, obs_dim) or a dict of (n_obs_steps, ...) arrays (an image policy's), time budget in
# seconds (None: unlimited) -> PlannedChunk (or the bare actions)
Planner = Callable[[Observation, "float | None"], "PlannedChunk | np.ndarray"]


class SessionPlanner:
    """Adapts a :class:`~policy_accel.session.Session` to the planner protocol (batch 1).

    The controller's time budget becomes the solve's ``Budget.time_s`` (capped by the session's own,
    whose ``max_iterations`` is kept). The reserve is the rest of the predicted horizon after the executed
    chunk. Warm starts shift by ``n_action_steps``: that matches the controller's replanning with
    ``chunk_steps=n_action_steps`` (while its lead is steady); when it replans more often, the initial guess
    is misaligned and only costs iterations (the chain is still solved to the solver's tolerance).
    """

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, obs_history: Observation, time_budget_s: float | None) -> PlannedChunk:
        from policy_accel.solvers.base import Budget

        base = self.session.budget
        time_s = time_budget_s
        if base is not None and base.time_s is not None:
            time_s = base.time_s if time_s is None else min(time_s, base.time_s)
        max_iterations = None if base is None else base.max_iterations
        budget = None if time_s is None and max_iterations is None else Budget(max_iterations, time_s)
        plan = self.session.plan(stack_observations([obs_history]), budget=budget)
        reserve = self.session.policy.reserve(plan.result.sample)[0]
        return PlannedChunk(plan.actions[0], plan.record.converged, reserve, dataclasses.asdict(plan.record))

    def reset(self, seed: int | None = None) -> None:
        self.session.reset(seed)


@dataclass(frozen=True)
class ControlAction:
    """What ``act`` returns: the action for one tick and where it came from."""

    action: np.ndarray
    t: float  # the tick it is meant for
    source: str  # "chunk" | "hold" | "continue" (the last two are misses)
    chunk_id: int | None = None  # the chunk it came from (also for "continue")
    obs_time: float | None = None  # when that chunk's newest observation was taken
    index: int | None = None  # its position in that chunk

    @property
    def missed(self) -> bool:
        return self.source != "chunk"


@dataclass(frozen=True)
class InferenceInfo:
    """One finished inference, as merged into the queue (passed to ``on_inference``)."""

    chunk_id: int
    obs_time: float
    submitted: float
    started: float
    finished: float
    merged: float
    budget_s: float | None
    needed_at: float | None  # when the chunk had to be ready (None: unbounded first inference)
    converged: bool
    n_actions: int
    n_fresh: int
    n_stale: int
    n_overlap: int
    info: dict

    @property
    def latency_s(self) -> float:
        return self.finished - self.started

    @property
    def late(self) -> bool:
        return self.needed_at is not None and self.finished > self.needed_at


@dataclass
class ControllerStats:
    """Counters only (constant memory however long the controller runs)."""

    ticks: int = 0
    misses: int = 0  # ticks served by the fallback
    inferences: int = 0
    unconverged: int = 0  # inferences that hit their (deadline) budget and returned their estimate
    late_chunks: int = 0  # chunks that finished after they were needed
    stale_dropped: int = 0
    overlap_dropped: int = 0
    discarded: int = 0  # chunks of a previous episode, finished after reset
    max_latency_s: float = 0.0


class InferenceError(RuntimeError):
    """The inference worker raised; ``__cause__`` is the original exception, with its traceback."""

    def __init__(self, message: str, worker_traceback: str):
        super().__init__(message)
        self.worker_traceback = worker_traceback


@dataclass
class _Request:
    history: Observation
    obs_time: float
    submitted: float
    needed_at: float | None
    epoch: int
    overshoot_s: float  # subtracted from the budget: how far recent solves ran past theirs
    reset: tuple | None  # (seed,) to reset the planner (a new episode) before planning
    rebase_to_finish: bool = False  # start_episode: the world waits, so the chunk starts when it is ready


@dataclass
class _Done:
    request: _Request
    plan: PlannedChunk
    started: float
    finished: float
    budget_s: float | None


@dataclass
class _Queued:
    t: float
    action: np.ndarray
    chunk_id: int
    obs_time: float
    index: int


# The constructor's schema (policy_accel/schema.py): a NaN lead or a string period fails here, not ticks later.
_ARGUMENTS = {
    "planner": Callable,
    "dt": PositiveFloat,
    "n_obs_steps": PositiveInt,
    "fallback": Literal[FALLBACKS],
    "hold_action": Callable | None,
    "act_latency_s": NonNegativeFloat,
    "action_offset": NonNegativeInt,
    "chunk_steps": PositiveInt | None,
    "lead_s": NonNegativeFloat | None,
    "latency_guess_s": NonNegativeFloat | None,
    "latency_safety": PositiveFloat,
    "latency_window": PositiveInt,
    "deadline_margin_s": NonNegativeFloat | None,
    "min_budget_s": PositiveFloat | None,  # a solve's time budget (Budget.time_s > 0)
    "on_inference": Callable | None,
    "stop_timeout_s": PositiveFloat,
    "obs_dim": PositiveInt | None,
}
FUTURE_TICKS = 100  # act(t) for a tick further ahead of the clock than this many periods is a clock mix-up


class RealTimeController:
    """Fixed-rate control around a background planner; see the module docstring for the timing rules.

    ``obs_dim`` (optional) is the observation size every ``observe`` is checked against; without it, the first
    observation of an episode (an array, or a dict of arrays: an image policy's) sets the shape (the keys and shapes).
    """

    def __init__(
        self,
        planner: Planner,
        dt: float,
        n_obs_steps: int,
        *,
        clock: Clock | None = None,
        fallback: str = "hold",
        hold_action: Callable[[Observation], np.ndarray] | None = None,
        act_latency_s: float = 0.0,
        action_offset: int = 0,
        chunk_steps: int | None = None,
        lead_s: float | None = None,
        latency_guess_s: float | None = None,
        latency_safety: float = 1.25,
        latency_window: int = 20,
        deadline_margin_s: float | None = None,
        min_budget_s: float | None = None,
        on_inference: Callable[[InferenceInfo], None] | None = None,
        stop_timeout_s: float = 60.0,
        obs_dim: int | None = None,
    ):
        arguments = locals()
        for name, hint in _ARGUMENTS.items():  # each one line naming the argument, before anything starts
            check_value(arguments[name], hint, name)
        self.planner = planner
        self.dt = float(dt)
        self.n_obs_steps = n_obs_steps
        self.clock: Clock = clock or MonotonicClock()
        self.fallback = fallback
        self.hold_action = hold_action
        self.act_latency_s = float(act_latency_s)
        self.action_offset = action_offset
        self.chunk_steps = chunk_steps
        self.lead_s = lead_s
        self.latency_guess_s = self.dt if latency_guess_s is None else float(latency_guess_s)
        self.latency_safety = latency_safety
        self.deadline_margin_s = 0.1 * self.dt if deadline_margin_s is None else float(deadline_margin_s)
        self.min_budget_s = 0.5 * self.dt if min_budget_s is None else float(min_budget_s)
        self.on_inference = on_inference
        self.stop_timeout_s = stop_timeout_s
        self.stats = ControllerStats()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._overshoots: deque[float] = deque(maxlen=latency_window)
        # worker hand-off, guarded by _cond
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self._request: _Request | None = None
        self._done: deque[_Done] = deque()
        self._error: BaseException | None = None
        self._error_tb = ""
        self._error_reported = False
        # caller-side state
        self._epoch = 0
        self._pending_reset: tuple | None = None
        self._chunks = 0
        self._history = ObservationHistory(n_obs_steps, obs_dim)  # checks every observation (dtype, shape, finite)
        self._obs_time: float | None = None
        self._obs_seq = 0
        self._launched_seq = -1
        self._queue: deque[_Queued] = deque()
        self._continuation: list[_Queued] = []  # the newest chunk's actions + reserve, for "continue"
        self._last_t: float | None = None
        self._last_action: np.ndarray | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> RealTimeController:
        """Start the inference worker (idempotent while running)."""
        if self.running:
            return self
        with self._cond:
            self._stopping = False
            self._busy = False
            self._request = None
        self._thread = threading.Thread(target=self._work, name="policy-accel-inference", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop and join the worker; an inference in progress is let finish (its result is dropped)."""
        thread = self._thread
        with self._cond:
            self._stopping = True
            self._request = None
            self._cond.notify_all()
        if thread is not None:
            thread.join(self.stop_timeout_s if timeout is None else timeout)
            if thread.is_alive():
                raise RuntimeError("inference worker did not stop in time (a planner call is still running)")
        self._thread = None
        with self._cond:
            self._busy = False
            self._done.clear()

    def __enter__(self) -> RealTimeController:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None and not self._error_reported:
            self._raise_if_failed()  # a worker error the caller never saw must not vanish

    # -- episodes --------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        """Forget the episode (queue, history, last action) without blocking.

        An inference still running finishes in the background and is discarded; the planner is reset
        (``planner.reset(seed)``, if it has one) by the worker right before the next inference.
        """
        self._raise_if_failed()
        self._epoch += 1
        self._pending_reset = (seed,)
        self._history.clear()
        self._obs_time = None
        self._queue.clear()
        self._continuation = []
        self._last_t = None
        self._last_action = None

    def start_episode(self, obs: Observation, seed: int | None = None, timeout: float | None = None) -> float:
        """Reset, plan the first chunk synchronously and return the episode's first tick time ``t0``.

        For a robot that waits at rest until its first chunk is ready: the observation is as fresh when
        the chunk is ready as when it was taken, so the chunk's actions are meant for ``t0 + i * dt`` with
        ``t0 = now + act_latency_s``, and the loop's first ``act(t0)`` is due right away.
        """
        self._require_running()
        obs = self._history.check(obs, episode_start=True)  # refused before anything is reset
        self.reset(seed)
        if not self.wait_for_inference(timeout):
            raise TimeoutError("the previous inference did not finish in time")
        now = self.clock.now()
        self._append_obs(obs, now)
        self._submit(now, needed_at=None, rebase=True)
        if not self.wait_for_inference(timeout):
            raise TimeoutError("the first inference of the episode did not finish in time")
        self._poll()
        if not self._queue:
            raise RuntimeError("the first inference of the episode returned no action")
        return self._queue[0].t

    # -- the loop's calls ------------------------------------------------------------------------
    def observe(self, obs: Observation, t: float) -> None:
        """A new observation taken at time ``t`` (may arrive later than ``t``); may start an inference.

        Times must be finite and non-decreasing within an episode: an observation older than the previous one
        would be planned from as if it were new (use ``reset``/``start_episode`` when the clock really restarts).
        """
        self._require_running()
        t = _finite_time(t, "observe", ObservationError)
        if self._obs_time is not None and t < self._obs_time:
            raise ObservationError(
                f"observe(t={t:g}): the observation is taken before the previous one (t={self._obs_time:g}); "
                "observation times must not go backwards (call reset() or start_episode() when the clock restarts)"
            )
        obs = self._history.check(obs)
        self._poll()
        self._append_obs(obs, t)
        self._maybe_launch()

    def act(self, t: float) -> ControlAction:
        """The action for the tick at ``t``: the queued chunk action, or the fallback (a miss)."""
        self._require_running()
        t = self._check_tick(_finite_time(t, "act", ConfigError))
        self._poll()
        half = 0.5 * self.dt
        while self._queue and self._queue[0].t < t - half:
            self._queue.popleft()
            self.stats.stale_dropped += 1
        if self._queue and self._queue[0].t <= t + half:
            q = self._queue.popleft()
            out = ControlAction(q.action, t, "chunk", q.chunk_id, q.obs_time, q.index)
        else:
            out = self._fallback_action(t)
            self.stats.misses += 1
        self.stats.ticks += 1
        self._last_t = t
        self._last_action = out.action
        self._maybe_launch()
        return out

    def wait_for_inference(self, timeout: float | None = None) -> bool:
        """Block until no inference is in flight (True) or ``timeout`` passes (False); merges the result."""
        with self._cond:
            idle = self._cond.wait_for(lambda: not self._busy or self._error is not None, timeout)
        self._poll()
        return idle

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def expected_latency_s(self) -> float:
        """The latency the launch rule plans for: the slowest recent inference (or the guess), times safety."""
        if self.lead_s is not None:
            return self.lead_s
        base = max(self._latencies) if self._latencies else self.latency_guess_s
        return base * self.latency_safety

    # -- internals -------------------------------------------------------------------------------
    def _check_tick(self, t: float) -> float:
        """Refuse a tick that cannot be right: before the last one served, or far ahead of the controller's clock."""
        if self._last_t is not None and t < self._last_t:
            raise ConfigError(
                f"act(t={t:g}): the tick is before the last tick served (t={self._last_t:g}); tick times must not "
                "go backwards"
            )
        now = self.clock.now()
        if t > now + self.act_latency_s + FUTURE_TICKS * self.dt:
            raise ConfigError(
                f"act(t={t:g}): the tick is {t - now:g} s ahead of the controller's clock (now={now:g}), more than "
                f"{FUTURE_TICKS} periods: pass tick times from the clock the controller was given (clock=...)"
            )
        if not self._history and self._last_action is None:
            raise RuntimeError("no observation yet: call start_episode (or observe) before the first act")
        return t

    def _require_running(self) -> None:
        self._raise_if_failed()
        if not self.running:
            raise RuntimeError("controller is not running: call start() or use it as a context manager")

    def _raise_if_failed(self) -> None:
        with self._cond:
            error, tb = self._error, self._error_tb
        if error is not None:
            self._error_reported = True
            raise InferenceError(f"inference worker failed: {error!r}", tb) from error

    def _append_obs(self, obs: Observation, t: float) -> None:
        self._history.push(obs)  # the history keeps its own copy
        self._obs_time = t
        self._obs_seq += 1

    def _queue_end(self) -> float | None:
        """The last tick already provided for (queued or served)."""
        ends = [x for x in (self._queue[-1].t if self._queue else None, self._last_t) if x is not None]
        return max(ends) if ends else None

    def _needed_at(self, now: float) -> float:
        """When the next chunk must be ready: before the first uncovered tick has to be commanded."""
        end = self._queue_end()
        if end is None:
            return now  # nothing queued or served yet: needed now
        return end + self.dt - self.act_latency_s - self.deadline_margin_s

    def _maybe_launch(self) -> None:
        if self._obs_seq == self._launched_seq or not self._history or self.busy:
            return
        now = self.clock.now()
        needed_at = self._needed_at(now)
        # launch now if the next observation (one period away) would come too late
        if needed_at - now < self.expected_latency_s() + self.dt:
            self._submit(now, needed_at)

    def _submit(self, now: float, needed_at: float | None, rebase: bool = False) -> None:
        overshoot = max(self._overshoots, default=0.0)
        request = _Request(
            self._history.stacked(), self._obs_time, now, needed_at, self._epoch, overshoot, self._pending_reset, rebase
        )
        self._pending_reset = None
        self._launched_seq = self._obs_seq
        with self._cond:
            self._busy = True
            self._request = request
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._request is not None or self._stopping)
                if self._stopping:
                    return
                request, self._request = self._request, None
            try:
                if request.reset is not None and hasattr(self.planner, "reset"):
                    self.planner.reset(request.reset[0])
                started = self.clock.now()
                budget = None
                if request.needed_at is not None:
                    budget = max(request.needed_at - started - request.overshoot_s, self.min_budget_s)
                plan = _as_plan(self.planner(request.history, budget))
                done = _Done(request, plan, started, self.clock.now(), budget)
            except BaseException as exc:  # noqa: B036 - everything must reach the caller, then the worker ends
                with self._cond:
                    self._error = exc
                    self._error_tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                    self._busy = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._done.append(done)
                self._busy = False
                self._cond.notify_all()

    def _poll(self) -> None:
        """Merge finished inferences into the queue (caller thread); raise a worker error."""
        self._raise_if_failed()
        with self._cond:
            finished = list(self._done)
            self._done.clear()
        for done in finished:
            self._merge(done)

    def _merge(self, done: _Done) -> None:
        request, plan = done.request, done.plan
        now = self.clock.now()
        if request.epoch != self._epoch:
            self.stats.discarded += 1
            return
        self.stats.inferences += 1
        self.stats.unconverged += int(not plan.converged)
        latency = done.finished - done.started
        # An episode's first solve runs with the robot at rest, off the control clock, and is often the slowest
        # (cold: warm Newton's first solve builds exact Jacobians, ~1.5 s against ~0.2 s warm on PushT). The lead
        # is planned from on-clock solves; a start solve counts only while nothing else is known.
        if not request.rebase_to_finish or not self._latencies:
            self._latencies.append(latency)
        if done.budget_s is not None:
            self._overshoots.append(max(0.0, latency - done.budget_s))
        self.stats.max_latency_s = max(self.stats.max_latency_s, latency)
        self._chunks += 1
        chunk_id = self._chunks
        obs_time = request.obs_time
        if request.rebase_to_finish:
            obs_time = now + self.act_latency_s
        half = 0.5 * self.dt
        first_commandable = now + self.act_latency_s
        served = self._last_t
        end = self._queue_end()
        n_fresh = n_stale = n_overlap = 0
        reserve = [] if plan.reserve is None else list(plan.reserve)
        timeline = list(plan.actions) if self.chunk_steps is None else [*plan.actions, *reserve]
        for i, action in enumerate(timeline):
            t = obs_time + (self.action_offset + i) * self.dt
            if t < first_commandable - half or (served is not None and t <= served + half):
                n_stale += 1
            elif end is not None and t <= end + half:
                n_overlap += 1
            elif self.chunk_steps is None or n_fresh < self.chunk_steps:
                self._queue.append(_Queued(t, action, chunk_id, obs_time, i))
                n_fresh += 1
        n = len(plan.actions)
        self._continuation = [
            _Queued(obs_time + (self.action_offset + i) * self.dt, a, chunk_id, obs_time, i)
            for i, a in enumerate([*plan.actions, *reserve])
        ]
        self.stats.stale_dropped += n_stale
        self.stats.overlap_dropped += n_overlap
        info = InferenceInfo(
            chunk_id,
            obs_time,
            request.submitted,
            done.started,
            done.finished,
            now,
            done.budget_s,
            request.needed_at,
            plan.converged,
            n,
            n_fresh,
            n_stale,
            n_overlap,
            plan.info,
        )
        self.stats.late_chunks += int(info.late)
        if self.on_inference is not None:
            self.on_inference(info)

    def _fallback_action(self, t: float) -> ControlAction:
        if self.fallback == "continue":
            half = 0.5 * self.dt
            for q in self._continuation:
                if abs(q.t - t) <= half:
                    return ControlAction(q.action, t, "continue", q.chunk_id, q.obs_time, q.index)
        if self.hold_action is not None and self._history:
            return ControlAction(np.asarray(self.hold_action(self._history.latest)), t, "hold")
        if self._last_action is not None:
            return ControlAction(self._last_action, t, "hold")
        raise RuntimeError(
            f"act(t={t:g}): no queued action is meant for this tick and no action has been served yet to hold: pass "
            "hold_action to the controller, or let the first chunk arrive (start_episode plans it before returning)"
        )


def _finite_time(t: object, call: str, error: type[Exception]) -> float:
    """A time argument as a float: a real number (not a bool or a string), finite."""
    if isinstance(t, bool) or not isinstance(t, int | float | np.integer | np.floating):
        raise error(f"{call}(t={t!r}): t must be a number, the time in seconds on the controller's clock")
    if not np.isfinite(t):
        raise error(f"{call}(t={t!r}): t must be finite, the time in seconds on the controller's clock")
    return float(t)


def _as_plan(out: PlannedChunk | np.ndarray) -> PlannedChunk:
    """Accept a bare action array too; check shapes and finiteness where the mistake is made."""
    plan = out if isinstance(out, PlannedChunk) else PlannedChunk(np.asarray(out))
    actions = np.asarray(plan.actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[0] < 1:
        raise ValueError(f"planner must return actions of shape (n >= 1, action_dim), got {actions.shape}")
    if not np.all(np.isfinite(actions)):
        raise ValueError("planner returned non-finite actions")
    reserve = None if plan.reserve is None else np.asarray(plan.reserve, dtype=np.float64).reshape(-1, actions.shape[1])
    return PlannedChunk(actions, bool(plan.converged), reserve, dict(plan.info))
