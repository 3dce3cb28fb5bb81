"""PushT with Diffusion Policy's image observations, and image demonstrations rendered from the low-dim ones.

Why: DP's image PushT policy sees ``{"image": (3, 96, 96) float32 in [0, 1], "agent_pos": (2,)}``
(DP ``diffusion_policy/env/pusht/pusht_image_env.py``); everything else (start states, 300-step limit,
reward, success) is ``task=pusht``'s, so this is a subclass of :class:`envs.pusht.PushTEnv` that only
changes the observation.

How DP renders an observation (real-stanford/diffusion_policy@5ba07ac):

* ``PushTImageEnv._get_obs``: ``img = super()._render_frame(mode='rgb_array')`` then
  ``np.moveaxis(img.astype(np.float32) / 255, -1, 0)``; ``agent_pos = np.array(self.agent.position)``
  (pusht_image_env.py l. 38-44). The image env passes ``render_action=False`` (l. 19): the red action
  cross drawn afterwards (l. 48-56) goes to ``render_cache`` (videos) only, never into the observation.
* ``PushTEnv._render_frame`` (pusht_env.py l. 191-219): a 512x512 ``pygame.Surface`` (``window_size``)
  filled white, the goal T drawn with ``pygame.draw.polygon`` in LightGreen, then ``space.debug_draw`` with
  DP's ``pymunk_override.DrawOptions``, then ``np.transpose(pixels3d, (1, 0, 2))`` and
  ``cv2.resize(img, (render_size, render_size))``: drawn at 512 and *resized* to 96 with OpenCV's default
  interpolation, ``INTER_LINEAR`` (no anti-aliasing).

gym-pusht 0.1.8 renders its observation the same way: ``_render(visualize=False)`` -> ``_draw()`` (the same
512 surface, white fill, LightGreen goal, ``debug_draw`` with a copy of DP's ``DrawOptions`` whose only
changes are formatting and three commented-out unused lines) -> ``_get_img(..., observation_width=96,
observation_height=96, render_action=False)``: the same transpose and ``cv2.resize``. Shape colours (agent
RoyalBlue, T LightSlateGray, walls LightGray), the goal pose (256, 256, pi/4) and the order the shapes are
added to the space (walls, agent, T) are DP's. So the observation here is gym-pusht's own off-screen path
(``pygame.Surface`` plus OpenCV; no display, no ``pygame.init``), no drawing code copied.

Contact marks: DP's ``DrawOptions`` keeps pymunk's default debug-draw flags, which include
``DRAW_COLLISION_POINTS``: every contact of the last physics step (agent on T, T on a wall) is drawn as a short
red (231, 76, 60) anti-aliased segment. A frame therefore depends on the last step's contacts, not on the pose
alone, and :func:`episode_frames` renders demonstrations by replaying the physics (see there).

Differences that remain:

* Library versions: DP pins pygame 2.1.2, OpenCV 4.6.0, pymunk 6.2.1; this venv has pygame 2.6.1,
  opencv-python 4.11.0.86, pymunk 6.11.1. Polygon/circle rasterisation or resize rounding could differ by a
  few pixels between versions; DP's own environment was not installed here, so this was not measured (DP's
  drawing code run in this venv gives bit-identical frames to this module's).
* ``agent_pos`` is float64, as DP actually returns it (its observation space says float32); the space here
  says float64.
* Demonstration frames show the recorded (float32) pose; DP recorded ``env.render`` live during
  teleoperation (demo_pusht.py l. 48, 103), from the float64 pose, and its contact marks come from the
  physics of that run, while here they come from a replay of the recorded actions (see
  :func:`episode_frames`).
"""

from __future__ import annotations

import argparse
import json
import time
from multiprocessing import Pool
from pathlib import Path
from typing import TYPE_CHECKING

import gymnasium as gym
import numpy as np

from envs.pusht import MAX_EPISODE_STEPS, PushTEnv

if TYPE_CHECKING:
    import zarr

RENDER_SIZE = 96
IMG_CHUNK = 100  # frames per zarr chunk of data/img (~2.8 MB raw)
COPIED_KEYS = ("state", "keypoint", "action")
MAX_DRIFT = 0.05  # px / rad: a replay further than this from the recorded states is not that episode


class PushTImageEnv(PushTEnv):
    """``task=pusht`` with DP's image observation ``{"image": (3, 96, 96) float32 in [0, 1], "agent_pos": (2,)}``.

    Start states, step limit, reward and success are the parent's; only ``_obs`` changes.
    """

    def __init__(self, max_episode_steps: int = MAX_EPISODE_STEPS, render_size: int = RENDER_SIZE):
        super().__init__(max_episode_steps=max_episode_steps)
        self.render_size = render_size
        self.sim.observation_width = self.sim.observation_height = render_size
        self.sim._setup()  # bodies exist before the first reset, so render_state works on a new env
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0.0, 1.0, (3, render_size, render_size), np.float32),
                "agent_pos": gym.spaces.Box(0.0, 512.0, (2,), np.float64),
            }
        )

    def render_frame(self) -> np.ndarray:
        """The observation image as DP stores it: (H, W, 3) uint8 (drawn at 512, ``cv2.resize`` INTER_LINEAR)."""
        return self.sim._render(visualize=False)

    def _obs(self) -> dict[str, np.ndarray]:
        img = self.render_frame()
        return {
            "image": np.ascontiguousarray(np.moveaxis(img.astype(np.float32) / 255, -1, 0)),
            "agent_pos": np.array(self.sim.agent.position),
        }

    def place_state(self, state: np.ndarray, at_rest: bool = True) -> None:
        """Put agent and block exactly at ``state`` [ax, ay, bx, by, theta] without a physics step.

        Why: ``set_state`` steps the space once, which pushes the block out of the agent when they touch (it
        moves 12 % of the recorded PushT frames, by up to 0.8 px); a recorded frame must show the recorded pose.
        The shapes' cached world geometry (what ``debug_draw`` draws) is refreshed by reindexing; the last
        step's contacts (drawn as red marks) are kept. ``at_rest=False`` keeps the bodies' velocities.
        """
        sim = self.sim
        sim.agent.position = (float(state[0]), float(state[1]))
        sim.block.angle = float(state[4])  # angle first: pymunk rotates about the centre of gravity
        sim.block.position = (float(state[2]), float(state[3]))
        if at_rest:
            sim.agent.velocity = (0.0, 0.0)
            sim.block.velocity = (0.0, 0.0)
            sim.block.angular_velocity = 0.0
        sim.space.reindex_shapes_for_body(sim.agent)
        sim.space.reindex_shapes_for_body(sim.block)

    def render_state(self, state: np.ndarray) -> np.ndarray:
        """The (H, W, 3) uint8 observation image of the pose ``state`` (see :meth:`place_state`); it shows the
        contacts of the env's last physics step, none on a fresh env."""
        self.place_state(state)
        return self.render_frame()


def make_env(max_episode_steps: int = MAX_EPISODE_STEPS, render_offscreen: bool = True) -> PushTImageEnv:
    """Image PushT always renders off-screen; the flag exists so every task takes the same arguments."""
    return PushTImageEnv(max_episode_steps=max_episode_steps)


# -- image demonstrations from the low-dim replay buffer ---------------------------------------------------------
def angle_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| on the circle (recorded angles are taken mod 2 pi)."""
    d = np.abs(np.asarray(a) - np.asarray(b)) % (2 * np.pi)
    return np.minimum(d, 2 * np.pi - d)


def episode_frames(env: PushTImageEnv, seed: int, states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, float]:
    """One recorded episode's observation images (n, 96, 96, 3) uint8, and the replay's largest drift in px/rad.

    Why a replay and not a pose-only render: a DP frame also shows the last physics step's contacts. The
    episode is reset from DP's start state for ``seed`` (one physics step, as DP's reset); then for every
    frame the recorded state (taken before that frame's action, like its keypoints and low-dim observation)
    is placed exactly, keeping the velocities and contacts of the replay, rendered, and the recorded action
    is stepped. The drift is how far the replay had moved from the recorded state before each placement
    (recorded actions are float32, so it is not zero; it never accumulates).
    """
    env.reset(seed=int(seed))
    frames = np.empty((len(states), RENDER_SIZE, RENDER_SIZE, 3), np.uint8)
    drift = 0.0
    for i, (state, action) in enumerate(zip(states.astype(np.float64), actions.astype(np.float64), strict=True)):
        now = env.state()
        drift = max(drift, float(np.abs(now[:4] - state[:4]).max()), float(angle_error(now[4], state[4])))
        env.place_state(state, at_rest=False)
        frames[i] = env.render_frame()
        env.sim.step(action)  # physics only: the next observation is rendered from the next recorded state
    return frames, drift


_worker_env: PushTImageEnv | None = None


def _render_episode(args: tuple[int, np.ndarray, np.ndarray]) -> tuple[np.ndarray, float]:
    global _worker_env
    if _worker_env is None:
        _worker_env = PushTImageEnv()
    return episode_frames(_worker_env, *args)


def _open_output(src: zarr.Group, out: Path, chunk: int) -> zarr.Group:
    """The output group, resumed when it was started from the same source with the same size, else created."""
    import numcodecs
    import zarr

    n = src["data/state"].shape[0]
    if out.exists():
        root = zarr.open_group(str(out), mode="a")
        made = root.attrs.get("rendered_from", {})
        if made.get("frames") == n and made.get("chunk") == chunk and "episodes_done" in made and "data/img" in root:
            return root
    root = zarr.open_group(str(out), mode="w")
    data = root.create_group("data")
    for key in COPIED_KEYS:
        arr = src["data"][key]
        data.create_dataset(key, data=arr[:], chunks=arr.chunks, compressor=arr.compressor)
    root.create_group("meta").create_dataset("episode_ends", data=src["meta/episode_ends"][:])
    # DP's ReplayBuffer "disk" compressor (replay_buffer.py resolve_compressor): Blosc zstd 5, bit shuffle
    data.create_dataset(
        "img",
        shape=(n, RENDER_SIZE, RENDER_SIZE, 3),
        chunks=(chunk, RENDER_SIZE, RENDER_SIZE, 3),
        dtype=np.uint8,
        compressor=numcodecs.Blosc("zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),
    )
    root.attrs.update(dict(src.attrs))
    root.attrs["rendered_from"] = {"frames": n, "chunk": chunk, "episodes_done": 0, "max_drift": 0.0}
    return root


def render_demos(src: str | Path, out: str | Path, workers: int = 1, chunk: int = IMG_CHUNK) -> dict:
    """Render every recorded frame of a low-dim PushT replay buffer into a DP-style image replay buffer.

    Frames come from :func:`episode_frames` (the recorded states placed exactly, contacts from a replay of the
    recorded actions); the source's root attribute ``seeds`` gives each episode's start state. Episodes are
    written in order with progress in the root attributes, so an interrupted run resumes where it stopped.
    Returns the figures the README quotes.
    """
    import zarr

    src, out = Path(src), Path(out)
    t0 = time.perf_counter()
    source = zarr.open_group(str(src), mode="r")
    states, actions = source["data/state"][:], source["data/action"][:]
    ends = np.asarray(source["meta/episode_ends"][:])
    seeds = list(source.attrs.get("seeds", []))
    if len(seeds) != len(ends):
        raise ValueError(f"{src}: root attribute 'seeds' must give one seed per episode ({len(ends)})")
    starts = np.concatenate([[0], ends[:-1]])
    root = _open_output(source, out, chunk)
    progress = dict(root.attrs["rendered_from"])
    img = root["data/img"]
    todo = range(progress["episodes_done"], len(ends))
    jobs = ((seeds[k], states[starts[k] : ends[k]], actions[starts[k] : ends[k]]) for k in todo)
    pool = Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render_episode, jobs) if pool else map(_render_episode, jobs)
        for k, (frames, drift) in zip(todo, results, strict=True):
            if drift > MAX_DRIFT:
                raise RuntimeError(f"episode {k} (seed {seeds[k]}): the replay left the recorded states by {drift}")
            img[starts[k] : ends[k]] = frames
            progress.update(episodes_done=k + 1, max_drift=max(progress["max_drift"], drift))
            root.attrs["rendered_from"] = progress
    finally:
        if pool:
            pool.close()
            pool.join()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "source": str(src),
        "out": str(out),
        "episodes": len(ends),
        "frames": int(ends[-1]),
        "episodes_rendered_this_run": len(todo),
        "seconds": round(time.perf_counter() - t0, 1),
        "bytes": size,
        "max_replay_drift": progress["max_drift"],
        "workers": workers,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-demos", type=Path, required=True, help="low-dim replay buffer to render")
    parser.add_argument("--out", type=Path, default=Path("data/pusht_image/expert.zarr"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=IMG_CHUNK, help="frames per data/img chunk")
    args = parser.parse_args(argv)
    print(json.dumps(render_demos(args.render_demos, args.out, args.workers, args.chunk), indent=1))


if __name__ == "__main__":
    main()
