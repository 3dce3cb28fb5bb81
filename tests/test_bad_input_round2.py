"""Bad input, second round (issue #36): the controller's clock and constructor, one observation check for every
entry path, config values on paths that bypassed the central checks, and the tools' entry points.

Function-level checks first; the few subprocess tests run the real command line only where the command line is
what is tested (one stderr line, exit status 1, no traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_errors import one_error_line

from policy_accel.control import FakeClock, PlannedChunk, RealTimeController
from policy_accel.errors import ConfigError, ObservationError

ROOT = Path(__file__).resolve().parents[1]
DT = 0.1


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "eval" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HYDRA_FULL_ERROR": ""},
    )


def _compose(config: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import policy_accel.experiment.build  # noqa: F401  (registers ${run_id:})

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config, overrides=overrides)


# -- the controller: constructor, clock, act ----------------------------------------------------------------------


def planner(history: np.ndarray, budget: float | None) -> PlannedChunk:
    return PlannedChunk(np.zeros((8, 2)))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"lead_s": float("nan")}, "lead_s"),
        ({"lead_s": float("inf")}, "lead_s"),
        ({"latency_safety": -1}, "latency_safety"),
        ({"latency_safety": float("nan")}, "latency_safety"),
        ({"chunk_steps": 2.5}, "chunk_steps"),
        ({"chunk_steps": True}, "chunk_steps"),
        ({"deadline_margin_s": -1}, "deadline_margin_s"),
        ({"deadline_margin_s": float("nan")}, "deadline_margin_s"),
        ({"dt": float("inf")}, "dt"),
        ({"dt": "0.1"}, "dt"),
        ({"dt": float("nan")}, "dt"),
        ({"n_obs_steps": 2.0}, "n_obs_steps"),
        ({"n_obs_steps": 0}, "n_obs_steps"),
        ({"act_latency_s": float("nan")}, "act_latency_s"),
        ({"act_latency_s": -0.1}, "act_latency_s"),
        ({"action_offset": -1}, "action_offset"),
        ({"action_offset": 0.5}, "action_offset"),
        ({"latency_guess_s": float("nan")}, "latency_guess_s"),
        ({"latency_guess_s": -1.0}, "latency_guess_s"),
        ({"latency_window": 0}, "latency_window"),
        ({"min_budget_s": float("inf")}, "min_budget_s"),
        ({"min_budget_s": -1.0}, "min_budget_s"),
        ({"stop_timeout_s": 0}, "stop_timeout_s"),
        ({"fallback": "freeze"}, "fallback"),
        ({"hold_action": 3}, "hold_action"),
        ({"on_inference": "print"}, "on_inference"),
        ({"planner": None}, "planner"),
    ],
)
def test_controller_arguments_are_checked_at_construction_naming_the_argument(kwargs, key):
    args = {"planner": planner, "dt": DT, "n_obs_steps": 2, **kwargs}
    with pytest.raises(ConfigError) as err:
        RealTimeController(**args)
    message = str(err.value)
    assert message.startswith(f"{key}=") and "\n" not in message, message


@pytest.fixture
def running():
    clock = FakeClock()
    ctrl = RealTimeController(planner, DT, 2, clock=clock, lead_s=0.3)
    with ctrl:
        t0 = ctrl.start_episode(np.zeros(2))
        yield ctrl, clock, t0


def test_observation_times_must_be_finite_and_non_decreasing(running):
    ctrl, clock, t0 = running
    ctrl.observe(np.zeros(2), t0 + DT)
    ctrl.observe(np.zeros(2), t0 + DT)  # the same time again is allowed (two sensors, one stamp)
    with pytest.raises(ValueError, match=rf"t={t0 - 50 + DT:g}.*before.*{t0 + DT:g}") as err:
        ctrl.observe(np.zeros(2), t0 + DT - 50)
    assert "reset" in str(err.value)
    for bad in (float("nan"), float("inf"), "soon", None):
        with pytest.raises(ValueError, match="t="):
            ctrl.observe(np.zeros(2), bad)
    assert ctrl.act(t0).source == "chunk"  # the controller still works after refused input


def test_act_says_what_is_wrong_with_its_time(running):
    ctrl, clock, t0 = running
    for bad, words in ((float("nan"), "finite"), (float("inf"), "finite"), ("now", "a number")):
        with pytest.raises(ValueError, match=words) as err:
            ctrl.act(bad)
        assert "start_episode" not in str(err.value)
    with pytest.raises(ValueError, match=r"1e\+06|1000000") as err:
        ctrl.act(t0 + 1e6)
    assert "start_episode" not in str(err.value) and "clock" in str(err.value)
    ctrl.act(t0 + DT)
    with pytest.raises(ValueError, match="before"):
        ctrl.act(t0)  # a tick earlier than the last one served


def test_act_before_start_episode_says_so():
    with RealTimeController(planner, DT, 2, clock=FakeClock()) as ctrl:
        with pytest.raises(RuntimeError, match="start_episode"):
            ctrl.act(0.0)


# -- observations: one check for every entry path ------------------------------------------------------------------

BAD_OBSERVATIONS = [
    ("bool", lambda shape: np.zeros(shape, dtype=bool), "dtype bool"),
    ("complex", lambda shape: np.zeros(shape, dtype=complex), "dtype complex"),
    ("object", lambda shape: np.zeros(shape, dtype=object), "dtype object"),
    ("string", lambda shape: np.full(shape, "250.0"), "dtype <U5"),
    ("torch bool", lambda shape: torch.zeros(shape, dtype=torch.bool), "dtype torch.bool"),
    ("torch complex", lambda shape: torch.zeros(shape, dtype=torch.complex64), "dtype torch.complex64"),
    ("nan", lambda shape: np.full(shape, np.nan), "not finite"),
    ("overflow", lambda shape: np.full(shape, 1e300), "not finite"),
    ("torch nan", lambda shape: torch.full(shape, float("nan")), "not finite"),
    ("nested strings", lambda shape: np.full(shape, "x").tolist(), "dtype <U1"),
]


@pytest.fixture(scope="module")
def pusht_policy():
    from policy_accel.io.checkpoint import load_policy

    return load_policy(ROOT / "checkpoints" / "pusht")


@pytest.fixture(scope="module")
def small_session(pusht_policy):
    from policy_accel.session import Session
    from policy_accel.solvers import make_solver

    return Session(pusht_policy, make_solver("sequential"), pusht_policy.schedule(kind="ddim", num_inference_steps=1))


@pytest.mark.parametrize("name, make, words", BAD_OBSERVATIONS, ids=[b[0] for b in BAD_OBSERVATIONS])
def test_every_observation_entry_refuses_the_same_bad_values(name, make, words, small_session):
    from policy_accel.observations import ObservationHistory

    session = small_session
    session.reset(0)
    for call, shape in (
        (session.select_action, (1, 18)),
        (session.plan, (1, 2, 18)),
        (session.policy.condition, (1, 2, 18)),
    ):
        with pytest.raises(ObservationError, match=words) as err:
            call(make(shape))
        assert ("(B, " in str(err.value) or "not finite" in str(err.value)) and "\n" not in str(err.value)
    with pytest.raises(ObservationError, match=words):
        ObservationHistory(2, obs_dim=18).push(make((18,)))
    with RealTimeController(planner, DT, 2, clock=FakeClock(), obs_dim=18) as ctrl:
        with pytest.raises(ObservationError, match=words):
            ctrl.start_episode(make((18,)))
        t0 = ctrl.start_episode(np.zeros(18))
        with pytest.raises(ObservationError, match=words):
            ctrl.observe(make((18,)), t0)


def test_observation_shape_is_named_everywhere(small_session):
    from policy_accel.observations import ObservationHistory

    with pytest.raises(ObservationError, match=r"has shape \(17,\): expected .* of shape \(18,\)"):
        ObservationHistory(2, obs_dim=18).push(np.zeros(17))
    with pytest.raises(ObservationError, match=r"has shape \(1, 17\): expected .* of shape \(B, 18\)"):
        small_session.select_action(np.zeros((1, 17)))
    with RealTimeController(planner, DT, 2, clock=FakeClock(), obs_dim=18) as ctrl:
        with pytest.raises(ObservationError, match=r"has shape \(2, 9\): expected .* of shape \(18,\)"):
            ctrl.start_episode(np.zeros((2, 9)))


def test_good_observations_of_any_real_dtype_still_plan(small_session):
    session = small_session
    for obs in (np.zeros((1, 18), dtype=np.int64), np.zeros((1, 18), dtype=np.float32), torch.zeros(1, 18)):
        session.reset(0)
        assert np.isfinite(session.select_action(obs)).all()


def test_the_episode_loop_checks_what_the_environment_returns(small_session):
    from policy_accel.experiment.episodes import run_episodes

    class Env:
        def reset(self, seed=None):
            return np.full(18, "1.0"), {}

        def close(self):
            pass

    with pytest.raises(ObservationError, match="dtype <U3"):
        run_episodes(Env, small_session, [0], progress=False)


# -- config values on paths that bypassed the central checks -----------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("+policy.schedule.clip_sample=no", "policy.schedule.clip_sample='no'"),
        ("+policy.schedule.clip_sample=1", "policy.schedule.clip_sample=1"),
        ("+policy.schedule.thresholding=yes", "policy.schedule.thresholding='yes'"),
        ("policy.schedule.num_inference_steps=2.5", "policy.schedule.num_inference_steps=2.5"),
        ("policy.schedule.num_inference_steps=true", "policy.schedule.num_inference_steps=True"),
        ("+policy.schedule.beta_start=nan", "policy.schedule.beta_start=nan"),
        ("+policy.schedule.sample_max_value=inf", "policy.schedule.sample_max_value=inf"),
        ("+policy.schedule.dynamic_thresholding_ratio=nan", "policy.schedule.dynamic_thresholding_ratio=nan"),
        ("+policy.schedule.bogus=1", "policy.schedule.bogus"),
        ("solver.options.tolerance=abc", "solver.options.tolerance='abc'"),
        ("solver.options.tolerance=nan", "solver.options.tolerance=nan"),
        ("solver.options.window=2.5", "solver.options.window=2.5"),
        ("solver.options.window=true", "solver.options.window=True"),
        ("+solver.options.check_every=inf", "solver.options.check_every=inf"),
        ("+solver.options.bogus=1", "solver.options.bogus"),
        ("solver=newton solver.options.tolerance=inf", "solver.options.tolerance=inf"),
        ("solver=newton +solver.options.step_tolerance=nan", "solver.options.step_tolerance=nan"),
        ("solver=newton +solver.options.max_rows=1e3", "solver.options.max_rows=1000.0"),
        ("solver=parataa solver.options.tol_rel=nan", "solver.options.tol_rel=nan"),
        ("solver=parataa solver.options.ridge=inf", "solver.options.ridge=inf"),
        ("solver=parataa solver.options.order=3.0", "solver.options.order=3.0"),
        ("warm_start=falcon falcon.temperature=nan", "falcon.temperature=nan"),
        ("warm_start=falcon falcon.threshold=inf", "falcon.threshold=inf"),
        ("warm_start=falcon falcon.explore=nan", "falcon.explore=nan"),
        ("warm_start=falcon falcon.buffer=2.5", "falcon.buffer=2.5"),
        ("warm_start=falcon falcon.min_steps=true", "falcon.min_steps=True"),
        ("warm_start=falcon +falcon.bogus=1", "falcon.bogus"),
        ("warm_start=rti rti.steps=2.0", "rti.steps=2.0"),
        ("warm_start=rti rti.discrete_factor=nan", "rti.discrete_factor=nan"),
        ("warm_start=rti rti.discrete_dims=[0.5]", "rti.discrete_dims=[0.5]"),
        ("warm_start=rti rti.discrete_dims=3", "rti.discrete_dims=3"),
    ],
)
def test_options_on_every_path_are_typed_and_finite_naming_the_users_key(override, key, pusht_policy):
    from policy_accel.experiment.build import build_session

    cfg = _compose("rollout.yaml", [*override.split(), "out_dir=/tmp/unused", "policy=ddim10"])
    with pytest.raises(ConfigError) as err:
        build_session(cfg, policy=pusht_policy)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message, message


def test_python_api_options_are_checked_by_the_same_schemas():
    from policy_accel.schedule import ScheduleConfig
    from policy_accel.solvers import make_solver
    from policy_accel.warm_starts import FalconConfig, RTIConfig

    for build in (
        lambda: ScheduleConfig(clip_sample="no"),
        lambda: ScheduleConfig(beta_end=float("nan")),
        lambda: FalconConfig(temperature=float("nan")),
        lambda: RTIConfig(discrete_factor=float("inf")),
        lambda: make_solver("newton", tolerance=float("nan")),
        lambda: make_solver("paradigms", window="16"),
        lambda: make_solver("parataa", tol_rel=float("nan")),
    ):
        with pytest.raises(ConfigError, match="is not allowed"):
            build()


# -- tools' entry points ------------------------------------------------------------------------------------------


def test_solver_bench_refuses_bad_counts_before_any_work(tmp_path):
    line = one_error_line(run_script("solver_bench.py", "n_obs=0", f"out_dir={tmp_path}"))
    assert line.startswith("error: n_obs=0 is not allowed")


def test_benchmark_unknown_key_and_unwritable_out_dir_are_one_line(tmp_path):
    line = one_error_line(run_script("benchmark.py", "n_episode=5"))
    assert "n_episode" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = run_script("benchmark.py", "n_episodes=1", "only=[seq_ddim_1]", f"out_dir={blocker / 'out'}")
    line = one_error_line(run)
    assert f"out_dir='{blocker / 'out'}' cannot be written" in line and "report written" not in run.stdout


def test_convert_to_an_unwritable_destination_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "convert.py"), str(ROOT / "checkpoints" / "pusht"), str(blocker / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert str(blocker / "x") in one_error_line(run)


def test_hydra_run_dir_under_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = run_script("solver_bench.py", "n_obs=1", f"hydra.run.dir={blocker / 'run'}")
    assert "hydra.run.dir" in one_error_line(run)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"check_exactness": "no"}, "check_exactness"),
        ({"seed": 1.5}, "seed"),
        ({"budget": 5}, "budget"),
        ({"noise": "same"}, "noise"),
        ({"tail_fill": "zero"}, "tail_fill"),
        ({"warm_options": [1]}, "warm_options"),
    ],
)
def test_session_arguments_are_checked_naming_the_argument(kwargs, key, pusht_policy):
    from policy_accel.session import Session
    from policy_accel.solvers import make_solver

    schedule = pusht_policy.schedule(kind="ddim", num_inference_steps=1)
    with pytest.raises(ConfigError) as err:
        Session(pusht_policy, make_solver("sequential"), schedule, **kwargs)
    assert str(err.value).startswith(f"{key}="), str(err.value)


def test_episode_loop_checks_its_batch_size(small_session):
    from policy_accel.experiment.episodes import run_episodes

    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match=rf"env_batch={bad!r} is not allowed"):
            run_episodes(object, small_session, [0], env_batch=bad, progress=False)
