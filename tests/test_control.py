"""The real-time controller on a fake clock: hand-over, stale actions, deadlines, worker errors, shutdown."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from policy_accel.control import (
    FakeClock,
    InferenceError,
    PlannedChunk,
    RealTimeController,
    SessionPlanner,
)

DT = 0.1
WORKER = "policy-accel-inference"


class GatedPlanner:
    """Chunk c (1-based) holds actions [100 c + i, c]; while ``gated`` each call waits for ``release()``."""

    def __init__(self, n: int = 8, reserve: int = 0):
        self.n, self.reserve = n, reserve
        self.calls: list[tuple[np.ndarray, float | None]] = []
        self.resets: list[int | None] = []
        self.gated = False
        self._gate = threading.Semaphore(0)
        self._called = threading.Condition()

    def __call__(self, history: np.ndarray, budget: float | None) -> PlannedChunk:
        with self._called:
            self.calls.append((history.copy(), budget))
            c = len(self.calls)
            self._called.notify_all()
        if self.gated and not self._gate.acquire(timeout=10):
            raise TimeoutError("test planner was never released")
        actions = np.array([[100.0 * c + i, c] for i in range(self.n + self.reserve)])
        return PlannedChunk(actions[: self.n], True, actions[self.n :] if self.reserve else None, {"chunk": c})

    def wait_calls(self, n: int) -> list[tuple[np.ndarray, float | None]]:
        """The calls so far, once there are ``n`` (the worker picks a request up asynchronously)."""
        with self._called:
            assert self._called.wait_for(lambda: len(self.calls) >= n, timeout=10), f"planner never called {n}x"
            return list(self.calls)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._gate.release()

    def reset(self, seed: int | None) -> None:
        self.resets.append(seed)


def obs_at(k: int) -> np.ndarray:
    return np.array([float(k), 10.0 + k])


def controller(planner, clock, **kwargs) -> RealTimeController:
    kwargs.setdefault("lead_s", 0.3)  # deterministic launch rule: launch when < 0.3 + DT is left
    return RealTimeController(planner, DT, n_obs_steps=2, clock=clock, **kwargs)


def tick(ctrl: RealTimeController, clock: FakeClock, k: int, t0: float = 0.0):
    t = t0 + k * DT
    clock.sleep_until(t)
    ctrl.observe(obs_at(k), t)
    return ctrl.act(t)


def arrive(ctrl: RealTimeController, planner: GatedPlanner, clock: FakeClock, at: float) -> None:
    """Let the gated inference finish at fake time ``at`` and merge it."""
    clock.sleep_until(at)
    planner.release()
    assert ctrl.wait_for_inference(timeout=10)


@pytest.fixture
def gated():
    planner = GatedPlanner()
    yield planner
    planner.release(10)  # never leave a worker blocked


def test_queue_hands_over_at_the_chunk_boundary(gated):
    clock = FakeClock()
    with controller(gated, clock) as ctrl:
        t0 = ctrl.start_episode(obs_at(0), seed=7)
        assert t0 == 0.0 and gated.resets == [7]
        np.testing.assert_array_equal(gated.calls[0][0], [obs_at(0), obs_at(0)])  # first observation padded
        assert gated.calls[0][1] is None  # the episode's first chunk is unbounded
        gated.gated = True
        served = [ctrl.act(0.0)] + [tick(ctrl, clock, k) for k in range(1, 5)]
        # needed by tick 8 (0.8 - margin 0.01): launched at tick 4, the first with < lead + DT left
        assert len(gated.wait_calls(2)) == 2
        history, budget = gated.calls[1]
        np.testing.assert_array_equal(history, [obs_at(3), obs_at(4)])
        assert budget == pytest.approx(0.39)
        arrive(ctrl, gated, clock, at=0.45)
        served += [tick(ctrl, clock, k) for k in range(5, 9)]
        calls = gated.wait_calls(3)  # chunk 3 launched at tick 8 for the boundary at tick 12
        np.testing.assert_array_equal(calls[2][0], [obs_at(7), obs_at(8)])
        assert calls[2][1] == pytest.approx(0.39)
        served += [tick(ctrl, clock, k) for k in range(9, 12)]
        assert [a.source for a in served] == ["chunk"] * 12
        assert [(a.chunk_id, a.index) for a in served] == [(1, i) for i in range(8)] + [(2, i) for i in range(4, 8)]
        np.testing.assert_array_equal(served[8].action, [204.0, 2.0])
        assert served[8].obs_time == pytest.approx(0.4)
        # chunk 2: action 0 (tick 4) had been served, 1-3 were covered by chunk 1, 4-7 taken over
        assert ctrl.stats.stale_dropped == 1 and ctrl.stats.overlap_dropped == 3
        assert ctrl.stats.misses == 0 and ctrl.stats.late_chunks == 0 and ctrl.stats.inferences == 2
        assert len(gated.calls) == 3
        gated.release()


def test_chunk_steps_executes_a_full_chunk_from_the_reserve():
    """chunk_steps=8: the next chunk covers 8 ticks after the hand-over, reaching into its reserve."""
    clock = FakeClock()
    planner = GatedPlanner(reserve=7)
    with controller(planner, clock, chunk_steps=8) as ctrl:
        ctrl.start_episode(obs_at(0))
        planner.gated = True
        served = [ctrl.act(0.0)] + [tick(ctrl, clock, k) for k in range(1, 5)]
        arrive(ctrl, planner, clock, at=0.45)
        served += [tick(ctrl, clock, k) for k in range(5, 12)]  # chunk 3 would be launched at tick 12
        assert len(planner.calls) == 2 and ctrl.queue_length == 4
        served += [tick(ctrl, clock, k) for k in range(12, 16)]
        planner.release()
    assert [(a.chunk_id, a.index) for a in served] == [(1, i) for i in range(8)] + [(2, i) for i in range(4, 12)]


def test_budget_leaves_room_for_a_solver_that_ran_past_its_last_one():
    """Solvers check their budget between iterations; the controller plans for the overrun it saw."""
    clock = FakeClock()
    budgets = []

    def planner(history, budget):
        budgets.append(budget)
        if budget is not None and len(budgets) == 2:
            clock.advance(budget + 0.02)  # stopped one 20 ms iteration after its budget
        return np.zeros((8, 2))

    with controller(planner, clock) as ctrl:
        ctrl.start_episode(obs_at(0))
        for k in range(1, 5):
            tick(ctrl, clock, k)  # launched at tick 4 with 0.39 s; done at 0.81
        assert ctrl.wait_for_inference(timeout=10) and clock.now() == pytest.approx(0.81)
        ctrl.observe(obs_at(5), 0.5)  # queue now ends at tick 11: needed by 1.19, launched at once
        assert ctrl.wait_for_inference(timeout=10)
    assert budgets[1:] == [pytest.approx(0.39), pytest.approx(1.19 - 0.81 - 0.02)]


def test_episode_start_solves_set_the_lead_only_until_on_clock_latencies_are_known():
    """An episode's first solve runs with the robot at rest and may be far slower (cold); it must not stretch the
    lead of the next episode's on-clock solves."""
    clock = FakeClock()

    def planner(history, budget):
        clock.advance(1.0 if budget is None else 0.05)  # start solves are unbounded (budget None)
        return np.zeros((8, 2))

    with controller(planner, clock, lead_s=None, latency_safety=1.0, latency_window=2) as ctrl:
        t0 = ctrl.start_episode(obs_at(0))
        assert ctrl.expected_latency_s() == pytest.approx(1.0)  # the only evidence so far
        for k in range(1, 12):
            tick(ctrl, clock, k, t0)
            assert ctrl.wait_for_inference(timeout=10)
        assert ctrl.stats.inferences >= 3
        assert ctrl.expected_latency_s() == pytest.approx(0.05)  # two on-clock solves fill the window
        ctrl.start_episode(obs_at(0))
        assert ctrl.expected_latency_s() == pytest.approx(0.05)


@pytest.mark.parametrize("fallback", ["hold", "continue"])
def test_late_chunk_drops_stale_actions_and_fallback_fills_the_gap(fallback):
    clock = FakeClock()
    planner = GatedPlanner(reserve=7)
    hold = lambda obs: obs * 0 - 1.0  # noqa: E731
    with controller(planner, clock, fallback=fallback, hold_action=hold) as ctrl:
        ctrl.start_episode(obs_at(0))
        planner.gated = True
        served = [ctrl.act(0.0)] + [tick(ctrl, clock, k) for k in range(1, 10)]  # launched at tick 4, never done
        arrive(ctrl, planner, clock, at=0.95)
        served += [tick(ctrl, clock, k) for k in range(10, 12)]
        planner.release()
    sources = [a.source for a in served]
    assert sources == ["chunk"] * 8 + [fallback] * 2 + ["chunk"] * 2
    if fallback == "continue":  # chunk 1's own predictions past its executed part
        assert [(a.chunk_id, a.index) for a in served[8:10]] == [(1, 8), (1, 9)]
    else:
        np.testing.assert_array_equal(served[8].action, [-1.0, -1.0])
    assert all(a.missed for a in served[8:10]) and ctrl.stats.misses == 2
    # chunk 2 (obs at tick 4) arrived at 0.95: its ticks 4..9 had passed, 10 and 11 are used
    assert [(a.chunk_id, a.index) for a in served[10:]] == [(2, 6), (2, 7)]
    assert ctrl.stats.stale_dropped == 6 and ctrl.stats.overlap_dropped == 0 and ctrl.stats.late_chunks == 1


def test_actuation_latency_moves_the_deadline_and_the_first_tick():
    """Actions are sent act_latency before their tick: the chunk is needed that much earlier."""
    clock = FakeClock()
    planner = GatedPlanner()
    lat = 0.15
    with controller(planner, clock, act_latency_s=lat, hold_action=lambda obs: obs) as ctrl:
        t0 = ctrl.start_episode(obs_at(0))
        assert t0 == pytest.approx(lat)  # the first tick that can still be commanded
        planner.gated = True
        for k in range(9):  # tick k's action is sent at t_k - lat; observation k-1 arrives at t_{k-1}
            clock.sleep_until(t0 + k * DT - lat)
            ctrl.act(t0 + k * DT)
            if k == 4:  # needed by tick 8's send time (t8 - lat - margin): launched at tick 4's send
                history, budget = planner.wait_calls(2)[1]
                np.testing.assert_array_equal(history, [obs_at(1), obs_at(2)])
                assert budget == pytest.approx(t0 + 8 * DT - lat - 0.01 - (t0 + 4 * DT - lat))
            if k >= 1:
                clock.sleep_until(t0 + (k - 1) * DT)
                ctrl.observe(obs_at(k - 1), t0 + (k - 1) * DT)
        arrive(ctrl, planner, clock, at=t0 + 7 * DT + 0.01)
        a = ctrl.act(t0 + 9 * DT)
        planner.release()
    assert ctrl.stats.misses == 1  # tick 8
    # chunk 2 (observation 2) arrived at t7 + 0.01: its ticks 2..8 can no longer be commanded, tick 9 is used
    assert ctrl.stats.stale_dropped == 7 and (a.source, a.chunk_id, a.index) == ("chunk", 2, 7)


def test_stale_queue_entries_are_dropped_when_ticks_are_skipped(gated):
    """A loop that overran skips ticks: their actions are dropped, not executed late."""
    clock = FakeClock()
    with controller(gated, clock) as ctrl:
        ctrl.start_episode(obs_at(0))
        clock.sleep_until(0.3)
        a = ctrl.act(0.3)
    assert (a.source, a.index) == ("chunk", 3) and ctrl.stats.stale_dropped == 3


def test_deadline_expiry_returns_a_valid_chunk(trained_policy):
    """A parallel solver that runs out of the controller's deadline returns its estimate: a usable chunk."""
    from policy_accel.session import Session
    from policy_accel.solvers import make_solver

    session = Session(trained_policy, make_solver("paradigms"), trained_policy.schedule())
    infos = []
    clock = FakeClock()
    # the chunk is needed 15 ms (fake, handed to the solver as real seconds) after tick 7's observation
    planner = SessionPlanner(session)
    ctrl = controller(planner, clock, lead_s=0.0, deadline_margin_s=0.085, min_budget_s=1e-3, on_inference=infos.append)
    obs = np.random.default_rng(0).uniform(150, 350, 18)
    with ctrl:
        ctrl.start_episode(obs)
        served = [ctrl.act(0.0)]
        for k in range(1, 8):
            clock.sleep_until(k * DT)
            ctrl.observe(obs + k, k * DT)
            served.append(ctrl.act(k * DT))
        assert ctrl.wait_for_inference(timeout=60)
        clock.sleep_until(0.8)
        served.append(ctrl.act(0.8))
    first, second = infos
    assert first.converged and first.budget_s is None
    assert second.budget_s == pytest.approx(0.015)
    assert not second.converged and second.info["stop_reason"] == "time_budget"
    assert ctrl.stats.unconverged == 1 and ctrl.stats.misses == 0
    assert second.n_actions == 8 and second.n_fresh == 7  # its tick-7 action had been served
    assert (served[-1].source, served[-1].chunk_id, served[-1].index) == ("chunk", 2, 1)
    assert served[-1].action.shape == (2,) and np.isfinite(served[-1].action).all()


def _explode(history, budget):
    raise ValueError("boom in the planner")


class FailingPlanner(GatedPlanner):
    def __call__(self, history, budget):
        if self.calls:
            _explode(history, budget)
        return super().__call__(history, budget)


def test_worker_exception_surfaces_in_the_caller_with_its_traceback():
    clock = FakeClock()
    planner = FailingPlanner()
    with pytest.raises(InferenceError) as info:
        with controller(planner, clock) as ctrl:
            ctrl.start_episode(obs_at(0))
            for k in range(1, 5):
                tick(ctrl, clock, k)  # tick 4 launches the failing inference
            ctrl.wait_for_inference(timeout=10)
    err = info.value
    assert isinstance(err.__cause__, ValueError) and "boom in the planner" in str(err)
    frames = []
    tb = err.__cause__.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "_explode" in frames and "_explode" in err.worker_traceback
    assert not ctrl.running and WORKER not in [t.name for t in threading.enumerate()]
    with pytest.raises(InferenceError):  # a failed controller stays failed
        ctrl.act(0.6)


def test_unseen_worker_error_is_raised_on_exit():
    planner = FailingPlanner()
    ctrl = controller(planner, FakeClock())
    with pytest.raises(InferenceError, match="boom"):
        with ctrl:
            ctrl.start_episode(obs_at(0))
            ctrl._submit(0.0, needed_at=1.0)  # an inference the loop never looks at again
            ctrl._thread.join(10)


def test_stop_joins_the_worker_and_discards_inflight_work(gated):
    clock = FakeClock()
    ctrl = controller(gated, clock)
    assert WORKER not in [t.name for t in threading.enumerate()]
    with pytest.raises(RuntimeError, match="not running"):
        ctrl.act(0.0)
    with ctrl:
        assert ctrl.running and WORKER in [t.name for t in threading.enumerate()]
        ctrl.start_episode(obs_at(0))
        gated.gated = True
        for k in range(1, 5):
            tick(ctrl, clock, k)
        assert ctrl.busy  # an inference is in flight when the block ends
        threading.Timer(0.2, gated.release).start()
    assert not ctrl.running and WORKER not in [t.name for t in threading.enumerate()]
    assert not ctrl.busy and ctrl.stats.inferences == 1


def test_stop_reports_a_planner_that_never_returns(gated):
    ctrl = controller(gated, FakeClock())
    ctrl.start()
    ctrl.start_episode(obs_at(0))
    gated.gated = True
    ctrl._submit(0.0, needed_at=1.0)
    gated.wait_calls(2)
    with pytest.raises(RuntimeError, match="did not stop"):
        ctrl.stop(timeout=0.1)
    gated.release()
    ctrl.stop()
    assert not ctrl.running


def test_reset_discards_the_previous_episodes_chunk(gated):
    clock = FakeClock()
    with controller(gated, clock) as ctrl:
        ctrl.start_episode(obs_at(0), seed=1)
        gated.gated = True
        for k in range(1, 5):
            tick(ctrl, clock, k)  # chunk 2 in flight
        ctrl.reset(seed=2)  # does not block on it
        assert ctrl.busy and ctrl.queue_length == 0
        gated.release(2)
        t0 = ctrl.start_episode(obs_at(50), seed=2)
        a = ctrl.act(t0)
    assert ctrl.stats.discarded == 1 and gated.resets == [1, 2]
    assert (a.chunk_id, a.index) == (2, 0) and a.action[1] == 3.0  # the third planner call, merged as chunk 2


def test_bad_planner_output_is_an_inference_error():
    with pytest.raises(InferenceError, match="shape"):
        with controller(lambda history, budget: np.zeros(3), FakeClock()) as ctrl:
            ctrl.start_episode(obs_at(0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="fallback"):
        RealTimeController(GatedPlanner(), DT, 2, fallback="freeze")
    with pytest.raises(ValueError, match="dt"):
        RealTimeController(GatedPlanner(), 0.0, 2)
