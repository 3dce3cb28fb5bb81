"""Image PushT (envs/pusht_image.py): DP's image observation on task=pusht's protocol, and the rendered demos."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numcodecs
import numpy as np
import pygame
import pymunk.pygame_util
import pytest
import zarr
from gym_pusht.envs.pymunk_override import DrawOptions  # DP's pymunk_override.DrawOptions, reformatted

from envs.pusht import PushTEnv
from envs.pusht_image import PushTImageEnv, main, make_env
from policy_accel.experiment.tasks import env_factory

ROOT = Path(__file__).resolve().parents[1]
LOWDIM_DEMOS = ROOT / "data" / "pusht" / "expert.zarr"
TINY_EPISODES, TINY_LEN = 2, 50  # the first 50 frames of the first two recorded episodes (both have contacts)


def as_frame(image: np.ndarray) -> np.ndarray:
    """The observation's (3, H, W) float32 in [0, 1] back to the (H, W, 3) uint8 DP stores (exact)."""
    return np.rint(image * 255).astype(np.uint8).transpose(1, 2, 0)


def n_contacts(env: PushTImageEnv) -> int:
    """Contacts of the last physics step (every contact involves the T: agent-T or T-wall)."""
    found = []
    env.sim.block.each_arbiter(found.append)
    return len(found)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Two short recorded episodes as a low-dim replay buffer, rendered with the command into a temp dir."""
    src = zarr.open_group(str(LOWDIM_DEMOS), mode="r")
    first = np.concatenate([[0], src["meta/episode_ends"][: TINY_EPISODES - 1]])
    rows = np.concatenate([np.arange(s, s + TINY_LEN) for s in first])
    tmp = tmp_path_factory.mktemp("pusht_image")
    lowdim = zarr.open_group(str(tmp / "lowdim.zarr"), mode="w")
    for key in ("state", "keypoint", "action"):
        lowdim.create_dataset(f"data/{key}", data=src["data"][key][:][rows])
    lowdim.create_dataset("meta/episode_ends", data=np.arange(1, TINY_EPISODES + 1) * TINY_LEN)
    lowdim.attrs["seeds"] = list(src.attrs["seeds"][:TINY_EPISODES])
    out = tmp / "image.zarr"
    main(["--render-demos", str(tmp / "lowdim.zarr"), "--out", str(out)])
    return {"src": tmp / "lowdim.zarr", "out": out, "seeds": lowdim.attrs["seeds"]}


def test_observation_shapes_dtypes_and_range():
    env = make_env()
    obs, info = env.reset(seed=100_000)
    for o in (obs, env.step(info["state"][:2] + 20.0)[0]):
        assert set(o) == {"image", "agent_pos"}
        assert o["image"].shape == (3, 96, 96) and o["image"].dtype == np.float32
        assert 0.0 <= o["image"].min() < 0.5 < o["image"].max() <= 1.0
        assert o["agent_pos"].shape == (2,)
        assert env.observation_space.contains(o)
    assert not pygame.display.get_init()  # rendered on a Surface only: works headless, never opens a window


def test_registered_as_a_task():
    env = env_factory("pusht_image")(max_episode_steps=5, render_offscreen=True)
    assert isinstance(env, PushTImageEnv) and env.max_episode_steps == 5


@pytest.mark.parametrize("seed", [0, 1, 100_000, 100_049])
def test_start_state_is_the_lowdim_envs(seed):
    image_env, lowdim_env = PushTImageEnv(), PushTEnv()
    obs, info = image_env.reset(seed=seed)
    low_obs, low_info = lowdim_env.reset(seed=seed)
    np.testing.assert_array_equal(info["state"], low_info["state"])
    np.testing.assert_array_equal(obs["agent_pos"], low_obs[-2:])
    np.testing.assert_array_equal(image_env.keypoints().reshape(-1), low_obs[:16])


def test_reward_and_success_match_the_lowdim_env():
    actions = zarr.open_group(str(LOWDIM_DEMOS), mode="r")["data/action"][:40]  # episode 0 (seed 0): pushes the T
    image_env, lowdim_env = PushTImageEnv(), PushTEnv()
    image_env.reset(seed=0), lowdim_env.reset(seed=0)
    for action in actions:
        _, r, term, trunc, info = image_env.step(action)
        _, r_low, term_low, trunc_low, info_low = lowdim_env.step(action)
        # coverage is a shapely area over ``body.shapes``, a set iterated in object-id order (gym-pusht and DP
        # alike), so two instances of either env can differ in the last bit: compare to 1e-12
        assert (term, trunc, info["is_success"]) == (term_low, trunc_low, info_low["is_success"])
        assert r == pytest.approx(r_low, abs=1e-12) and info["coverage"] == pytest.approx(
            info_low["coverage"], abs=1e-12
        )
        np.testing.assert_array_equal(info["state"], info_low["state"])
    at_goal = {"state": [100.0, 400.0, 256.0, 256.0, np.pi / 4]}  # the T on its goal: success on the first step
    short_image, short_lowdim = PushTImageEnv(max_episode_steps=1), PushTEnv(max_episode_steps=1)
    for options, want in ((at_goal, (1.0, True, False)), (None, (None, False, True))):
        short_image.reset(seed=3, options=options), short_lowdim.reset(seed=3, options=options)
        got, got_low = short_image.step([100.0, 400.0])[1:4], short_lowdim.step([100.0, 400.0])[1:4]
        assert got[0] == pytest.approx(got_low[0], abs=1e-12) and got[1:] == got_low[1:] == want[1:]
        assert want[0] is None or got[0] == want[0]


def test_render_of_a_known_state_is_deterministic_and_oriented():
    state = np.array([100.0, 400.0, 400.0, 100.0, 0.0])  # agent bottom-left, T top-right, goal T at the centre
    frames = [PushTImageEnv().render_state(state) for _ in range(2)]
    busy = PushTImageEnv()
    busy.reset(seed=7)
    busy.step([300.0, 300.0])
    busy.reset(seed=11)  # the same frame after another episode (seed 11 starts without contacts)
    assert n_contacts(busy) == 0
    frames.append(busy.render_state(state))
    for frame in frames[1:]:
        np.testing.assert_array_equal(frame, frames[0])
    frame = frames[0].astype(int)
    assert frame.shape == (96, 96, 3) and frames[0].dtype == np.uint8
    row, col = int(400 * 96 / 512), int(100 * 96 / 512)  # rows are y, columns x (pygame's screen layout)
    r, g, b = frame[row, col]
    assert b > r + 60 and b > g + 60  # the agent (RoyalBlue)
    r, g, b = frame[48, 48]
    assert g > r + 60 and g > b + 60  # the goal (LightGreen)
    assert (frame[30, 10] == 255).all()  # white background


def dp_render_frame(env: PushTImageEnv, render_size: int = 96) -> np.ndarray:
    """DP's ``PushTEnv._render_frame(mode="rgb_array")`` (pusht_env.py l. 191-219) on our simulation."""
    sim = env.sim
    canvas = pygame.Surface((512, 512))
    canvas.fill((255, 255, 255))
    draw_options = DrawOptions(canvas)
    goal_body = sim.get_goal_pose_body(sim.goal_pose)
    for shape in sim.block.shapes:
        points = [pymunk.pygame_util.to_pygame(goal_body.local_to_world(v), canvas) for v in shape.get_vertices()]
        pygame.draw.polygon(canvas, pygame.Color("LightGreen"), [*points, points[0]])
    sim.space.debug_draw(draw_options)
    img = np.transpose(np.array(pygame.surfarray.pixels3d(canvas)), axes=(1, 0, 2))
    return cv2.resize(img, (render_size, render_size))


def test_observation_is_dps_render():
    """DP's image obs: drawn at 512, cv2.resize (INTER_LINEAR) to 96, moveaxis to CHW, / 255; contacts shown."""
    env = PushTImageEnv()
    obs, _ = env.reset(seed=0)
    actions = zarr.open_group(str(LOWDIM_DEMOS), mode="r")["data/action"][:20]  # contacts from frame 16 on
    for action in actions:
        np.testing.assert_array_equal(obs["image"], np.moveaxis(dp_render_frame(env).astype(np.float32) / 255, -1, 0))
        obs = env.step(action)[0]


def test_render_command_writes_a_dp_replay_buffer(tiny):
    src = zarr.open_group(str(tiny["src"]), mode="r")
    out = zarr.open_group(str(tiny["out"]), mode="r")
    img = out["data/img"]
    n = TINY_EPISODES * TINY_LEN
    assert img.shape == (n, 96, 96, 3) and img.dtype == np.uint8 and img.chunks == (100, 96, 96, 3)
    assert img.compressor == numcodecs.Blosc("zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    for key in ("state", "keypoint", "action"):
        np.testing.assert_array_equal(out["data"][key][:], src["data"][key][:])
    np.testing.assert_array_equal(out["meta/episode_ends"][:], src["meta/episode_ends"][:])
    assert out.attrs["seeds"] == tiny["seeds"] and out.attrs["rendered_from"]["episodes_done"] == TINY_EPISODES
    assert out.attrs["rendered_from"]["max_drift"] < 1e-2


def test_render_command_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "copy.zarr"
    main(["--render-demos", str(tiny["src"]), "--out", str(out)])
    full = zarr.open_group(str(out), mode="r")["data/img"][:]
    root = zarr.open_group(str(out), mode="a")
    root["data/img"][TINY_LEN:] = 0  # as if stopped after the first episode
    root.attrs["rendered_from"] = {**root.attrs["rendered_from"], "episodes_done": 1}
    capsys.readouterr()
    main(["--render-demos", str(tiny["src"]), "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["episodes_rendered_this_run"] == TINY_EPISODES - 1
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["data/img"][:], full)


def test_demo_frames_are_the_env_at_that_state(tiny):
    """Each frame is what the image env observes at that recorded state, contact marks included: the live env
    stepping the recorded actions from the seed's start state; a contact-free frame is the pose alone."""
    src = zarr.open_group(str(tiny["src"]), mode="r")
    states, actions = src["data/state"][:], src["data/action"][:]
    frames = zarr.open_group(str(tiny["out"]), mode="r")["data/img"][:]
    live, fresh = PushTImageEnv(), PushTImageEnv()
    marked = 0
    for k, seed in enumerate(tiny["seeds"]):
        obs, _ = live.reset(seed=seed)
        for i in range(k * TINY_LEN, (k + 1) * TINY_LEN):
            np.testing.assert_array_equal(frames[i], as_frame(obs["image"]), err_msg=f"frame {i}")
            pose_only = fresh.render_state(states[i])
            if n_contacts(live) == 0:
                np.testing.assert_array_equal(frames[i], pose_only, err_msg=f"frame {i}")
            else:
                marked += not np.array_equal(frames[i], pose_only)
            obs = live.step(actions[i])[0]
    assert marked > 0  # DP draws the last step's contact points (red): the demos show them too
