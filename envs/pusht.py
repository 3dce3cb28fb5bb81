"""PushT on gym-pusht with Diffusion Policy's low-dim observation and evaluation protocol.

Why a wrapper: gym-pusht 0.1.8's ``reset(seed)`` draws start states with gymnasium's RNG, not
Diffusion Policy's ``np.random.RandomState(seed)``, and its ``reset_to_state`` sets the block's
position before its angle, so the block does not end at the requested pose. Here start states are
drawn as Diffusion Policy's runner draws them and set angle-first, so the block lands exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gym_pusht.envs.pusht import PushTEnv as _GymPushTEnv

MAX_EPISODE_STEPS = 300
SUCCESS_COVERAGE = 0.95
TEST_START_SEED = 100_000
N_TEST_SEEDS = 50
OBS_DIM = 18  # 8 block keypoints (16) + agent xy (2)
ACTION_DIM = 2
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])


def test_seeds(n: int = N_TEST_SEEDS, start: int = TEST_START_SEED) -> list[int]:
    return list(range(start, start + n))


def draw_start_state(seed: int) -> np.ndarray:
    """Diffusion Policy's start state for ``seed``: [agent_x, agent_y, block_x, block_y, block_angle]."""
    rs = np.random.RandomState(seed)
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ],
        dtype=np.float64,
    )


@dataclass
class PhysicsState:
    """Everything needed to reproduce the simulation exactly (pymunk bodies' kinematics)."""

    agent_pos: np.ndarray
    agent_vel: np.ndarray
    block_pos: np.ndarray
    block_angle: float
    block_vel: np.ndarray
    block_angular_vel: float


class PushTEnv(gym.Env):
    """PushT with keypoint observations (18,), absolute-target actions (2,), 300-step limit.

    ``reset(seed=s)`` uses Diffusion Policy's start state for seed ``s``;
    ``reset(options={"state": [ax, ay, bx, by, theta]})`` places the bodies exactly there.
    Reward is clip(coverage / 0.95, 0, 1); ``terminated`` means success (coverage > 0.95).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, max_episode_steps: int = MAX_EPISODE_STEPS):
        self.sim = _GymPushTEnv(obs_type="state", render_mode="rgb_array")
        self.max_episode_steps = max_episode_steps
        self.observation_space = gym.spaces.Box(0.0, 512.0, (OBS_DIM,), np.float64)
        self.action_space = gym.spaces.Box(0.0, 512.0, (ACTION_DIM,), np.float32)
        self._steps = 0

    # -- state ---------------------------------------------------------------------------------
    def set_state(self, state: np.ndarray) -> None:
        """Place agent and block exactly at ``state`` (angle set before position), at rest."""
        sim = self.sim
        sim.agent.position = (float(state[0]), float(state[1]))
        sim.agent.velocity = (0.0, 0.0)
        sim.block.angle = float(state[4])
        sim.block.position = (float(state[2]), float(state[3]))
        sim.block.velocity = (0.0, 0.0)
        sim.block.angular_velocity = 0.0
        sim.space.step(sim.dt)

    def physics_state(self) -> PhysicsState:
        sim = self.sim
        return PhysicsState(
            np.array(sim.agent.position),
            np.array(sim.agent.velocity),
            np.array(sim.block.position),
            float(sim.block.angle),
            np.array(sim.block.velocity),
            float(sim.block.angular_velocity),
        )

    def state(self) -> np.ndarray:
        """[agent_x, agent_y, block_x, block_y, block_angle mod 2pi], as Diffusion Policy records it."""
        return self.sim.get_obs().astype(np.float64)

    def keypoints(self) -> np.ndarray:
        """The T's 8 polygon vertices in world coordinates, (8, 2)."""
        return np.asarray(self.sim.get_keypoints(self.sim._block_shapes), dtype=np.float64)

    def coverage(self) -> float:
        return float(self.sim._get_coverage())

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.keypoints().reshape(-1), np.asarray(self.sim.agent.position)])

    # -- gym API -------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.sim._setup()  # a fresh pymunk space, no state from gym-pusht's own RNG
        if options is not None and options.get("state") is not None:
            state = np.asarray(options["state"], dtype=np.float64)
        elif seed is not None:
            state = draw_start_state(seed)
        else:
            state = draw_start_state(int(self.np_random.integers(0, 2**31 - 1)))
        if state.shape != (5,) or not np.all(np.isfinite(state)):
            raise ValueError(f"PushT state must be 5 finite numbers, got {state!r}")
        self.set_state(state)
        self._steps = 0
        return self._obs(), {"coverage": self.coverage(), "is_success": False, "state": self.state()}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"PushT action must be 2 finite numbers, got {action!r}")
        _, reward, terminated, _, info = self.sim.step(action)
        self._steps += 1
        truncated = self._steps >= self.max_episode_steps and not terminated
        info = {"coverage": float(info["coverage"]), "is_success": bool(terminated), "state": self.state()}
        return self._obs(), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        return self.sim.render()

    def render_plan(self, plan: np.ndarray) -> np.ndarray:
        """A frame with the executed chunk's targets (n, 2) drawn as red dots."""
        from PIL import Image, ImageDraw

        frame = self.render()
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        s = frame.shape[1] / 512.0
        for x, y in plan:
            draw.ellipse([x * s - 4, y * s - 4, x * s + 4, y * s + 4], fill=(220, 30, 30))
        return np.asarray(image)

    def close(self) -> None:
        self.sim.close()


def make_env(max_episode_steps: int = MAX_EPISODE_STEPS, render_offscreen: bool = True) -> PushTEnv:
    """PushT always renders off-screen (pygame surfaces); the flag exists so every task takes the same arguments."""
    return PushTEnv(max_episode_steps=max_episode_steps)
