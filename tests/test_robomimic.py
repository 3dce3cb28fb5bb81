"""robomimic Lift / Can: the environment, the recorded demonstrations, and a short rollout."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest

from envs.robomimic import OBS_KEYS, TASKS, make_env
from policy_accel.data import load_demonstrations
from policy_accel.experiment.tasks import env_factory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lift_env():
    env = make_env("lift")
    yield env
    env.close()


def test_lift_env_builds_steps_and_reports_shapes(lift_env):
    obs, info = lift_env.reset(seed=3)
    assert obs.shape == (TASKS["lift"].obs_dim,) and np.all(np.isfinite(obs))
    assert info["is_success"] is False
    obs2, reward, terminated, truncated, _ = lift_env.step(np.zeros(7))
    assert obs2.shape == obs.shape and reward == 0.0 and not terminated and not truncated
    assert not np.allclose(obs, obs2)  # the robot settles under gravity compensation: the state moves


def test_seeded_reset_is_reproducible_and_seeds_differ(lift_env):
    a, _ = lift_env.reset(seed=11)
    state_a = lift_env.state()
    lift_env.reset(seed=12)
    b, _ = lift_env.reset(seed=11)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(state_a, lift_env.state())
    c, _ = lift_env.reset(seed=12)
    assert not np.allclose(a[:3], c[:3])  # the cube starts elsewhere


def test_bad_actions_and_tasks_fail_clearly(lift_env):
    lift_env.reset(seed=0)
    with pytest.raises(ValueError, match="7 finite numbers"):
        lift_env.step(np.array([0.0, np.nan, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="7 finite numbers"):
        lift_env.step(np.zeros(2))
    with pytest.raises(ValueError, match="unknown robomimic task 'stack'"):
        make_env("stack")
    with pytest.raises(ValueError, match="unknown task 'lifft'"):
        env_factory("lifft")


def test_episode_truncates_at_its_step_limit():
    env = make_env("lift", max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step(np.zeros(7))[3] for _ in range(3)]
    env.close()
    assert flags == [False, False, True]


@pytest.mark.parametrize("task", ["lift", "can"])
def test_recorded_demo_replays_to_success(task):
    """A recorded demo's actions from its recorded start state succeed again: the data and env agree."""
    path = ROOT / "data" / task / "demos.hdf5"
    with h5py.File(path, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        demo = f["data/demo_0"]
        states, actions = demo["states"][()], demo["actions"][()]
        first_obs = np.concatenate([demo[f"obs/{k}"][0].reshape(-1) for k in OBS_KEYS])
    assert env_args["env_name"] == TASKS[task].env_name
    env = make_env(task)
    obs, _ = env.reset(options={"state": states[0]})
    np.testing.assert_allclose(obs, first_obs, atol=1e-5)
    success = False
    for action in actions:
        _, _, success, _, _ = env.step(action)
        if success:
            break
    env.close()
    assert success


@pytest.mark.parametrize("task", ["lift", "can"])
def test_dataset_loads_as_training_windows(task):
    demos = load_demonstrations(ROOT / "data" / task / "demos.hdf5", list(OBS_KEYS))
    assert demos["obs"].shape == (demos["episode_ends"][-1], TASKS[task].obs_dim)
    assert demos["action"].shape == (demos["episode_ends"][-1], 7)
    assert len(demos["episode_ends"]) >= 100
    assert np.all(np.abs(demos["action"]) <= 1.0)


def test_hdf5_dataset_needs_obs_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_demonstrations(tmp_path / "missing.hdf5", list(OBS_KEYS))
    with pytest.raises(ValueError, match="obs_keys"):
        load_demonstrations(ROOT / "data" / "lift" / "demos.hdf5")


def test_lift_rollout_cli_runs_a_short_episode(run_rollout, tmp_path):
    """``rollout.py task=lift`` works unchanged: the committed checkpoint, a parallel warm solver, one episode."""
    proc = run_rollout(
        "task=lift",
        "+experiment=newton_broyden_warm",
        "policy=ddim10",
        "n_episodes=1",
        "task.max_episode_steps=24",
        "check_exactness=true",
        f"out_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "lift" and results["n_episodes"] == 1
    assert results["episodes"][0]["steps"] <= 24 and results["episodes"][0]["inferences"] == 3
    assert results["max_abs_dev"] is not None and results["max_abs_dev"] < 1e-3


def test_env_factory_accepts_the_step_limit():
    env = partial(env_factory("lift"), max_episode_steps=2)()
    env.reset(seed=0)
    assert env.max_episode_steps == 2
    env.close()


@pytest.mark.skipif(ctypes.util.find_library("EGL") is None, reason="no EGL library for off-screen rendering")
def test_offscreen_render_gives_frames(tmp_path):
    """Rendering is opt-in: a fresh process (MuJoCo's GL backend is chosen once per process) renders frames."""
    code = (
        "from envs.robomimic import make_env\n"
        "env = make_env('lift', render_offscreen=True)\n"
        "env.reset(seed=0)\n"
        "frame = env.render()\n"
        "assert frame.shape == (256, 256, 3) and frame.std() > 1, (frame.shape, frame.std())\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_render_without_offscreen_renderer_fails_clearly(lift_env):
    with pytest.raises(RuntimeError, match="render_offscreen=True"):
        lift_env.render()
