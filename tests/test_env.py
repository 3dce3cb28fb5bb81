"""PushT follows Diffusion Policy's evaluation protocol."""

from __future__ import annotations

import numpy as np
import pytest

from envs import pusht
from envs.pusht import GOAL_POSE, MAX_EPISODE_STEPS, OBS_DIM, draw_start_state, make_env


def test_test_seeds_are_dps():
    assert pusht.test_seeds() == list(range(100000, 100050))


@pytest.mark.parametrize("seed", [0, 100000, 100049])
def test_reset_places_the_block_exactly_at_dps_start_state(seed):
    env = make_env()
    obs, info = env.reset(seed=seed)
    expected = draw_start_state(seed)
    state = info["state"]
    np.testing.assert_allclose(state[:4], expected[:4], atol=1e-6)
    assert abs(np.angle(np.exp(1j * (state[4] - expected[4])))) < 1e-6  # equal modulo 2 pi
    assert obs.shape == (OBS_DIM,)
    np.testing.assert_allclose(obs[16:], expected[:2])


def test_draw_start_state_matches_dps_runner():
    rs = np.random.RandomState(100000)
    expected = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)]
    np.testing.assert_array_equal(draw_start_state(100000)[:4], expected)


def test_goal_pose_is_success():
    env = make_env()
    env.reset(options={"state": [100.0, 100.0, *GOAL_POSE]})
    _, reward, terminated, _, info = env.step(np.array([100.0, 100.0]))
    assert info["coverage"] > 0.95 and reward == 1.0 and terminated and info["is_success"]


def test_episode_truncates_at_the_step_limit():
    env = make_env(max_episode_steps=5)
    env.reset(seed=100000)
    flags = [env.step(np.array([50.0, 50.0]))[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]
    assert MAX_EPISODE_STEPS == 300


@pytest.mark.parametrize("action", [np.array([np.nan, 1.0]), np.array([1.0, 2.0, 3.0])])
def test_bad_actions_are_rejected(action):
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="2 finite numbers"):
        env.step(action)


def test_bad_start_state_is_rejected():
    with pytest.raises(ValueError, match="5 finite numbers"):
        make_env().reset(options={"state": [1.0, 2.0, np.inf, 3.0, 0.0]})
