"""robomimic low-dim tasks (Lift, Can) on robosuite, with Diffusion Policy's observation layout.

Environments are built by robomimic's own ``EnvUtils.create_env_from_metadata`` from an ``env_meta``
dict (the ``env_args`` that robomimic stores in every hdf5 dataset), so a dataset recorded here
replays in robomimic and vice versa. Three install facts shape this module (see docs/design.md, "Dependencies and why"):

- robomimic 0.3.0 imports ``mujoco_py`` at module level only to name an exception class; robosuite
  1.5 runs on ``mujoco`` instead, so a stub module stands in for it.
- robosuite 1.5 wants composite controller configs; robomimic-era ``{"type": "OSC_POSE"}`` dicts are
  converted with robosuite's own ``refactor_composite_controller_config``.
- robosuite 1.5 draws start states from per-env ``np.random.default_rng`` generators (the env's and
  the object placement sampler's), so ``np.random.seed`` no longer makes a reset reproducible. A
  seeded reset here reseeds both generators, which makes ``reset(seed=s)`` the same start state every
  time on this simulator build (not the same as Diffusion Policy's robosuite fork).

Observation: ``object`` + ``robot0_eef_pos`` + ``robot0_eef_quat`` + ``robot0_gripper_qpos``
(Lift 10+3+4+2 = 19, Can 14+3+4+2 = 23), as Diffusion Policy's low-dim robomimic tasks. Actions are
7-D delta end-effector poses for robosuite's operational-space controller, in [-1, 1].
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
ACTION_DIM = 7
CONTROL_FREQ = 20
TEST_START_SEED = 100_000
N_TEST_SEEDS = 50


@dataclass(frozen=True)
class RobomimicTask:
    name: str  # our task name
    env_name: str  # robosuite environment
    obs_dim: int
    max_episode_steps: int  # Diffusion Policy's limit for proficient-human data


TASKS = {
    "lift": RobomimicTask("lift", "Lift", 19, 400),
    "can": RobomimicTask("can", "PickPlaceCan", 23, 400),
}


def _import_robomimic(render_offscreen: bool):
    """robomimic's env utilities, importable on robosuite 1.5 (stub for the ``mujoco_py`` it never uses).

    The first environment of a process picks MuJoCo's GL backend (``MUJOCO_GL``, unless set): none
    without rendering, EGL (on a CPU machine: Mesa's software EGL) with off-screen rendering.
    robomimic then imports ``egl_probe`` only to choose a GPU for EGL; without it (it builds from
    source with CMake) a stand-in reports no GPU, and the default EGL device renders.
    """
    os.environ.setdefault("MUJOCO_GL", "egl" if render_offscreen else "disable")
    stub = types.ModuleType("mujoco_py")
    stub.builder = types.SimpleNamespace(MujocoException=Exception)
    sys.modules.setdefault("mujoco_py", stub)
    if render_offscreen:
        try:
            import egl_probe  # noqa: F401
        except ImportError:
            sys.modules["egl_probe"] = types.SimpleNamespace(get_available_devices=lambda: [])
    try:
        import robomimic.utils.env_utils as env_utils
        import robomimic.utils.obs_utils as obs_utils
    except ImportError as exc:  # pragma: no cover - install problem, not a code path
        raise ImportError(
            f"robomimic tasks need robomimic 0.3.0 + robosuite 1.5 + mujoco 3.3.7 ({exc}); run ./scripts/setup.sh"
        ) from exc
    obs_utils.initialize_obs_modality_mapping_from_dict({"low_dim": list(OBS_KEYS)})
    return env_utils


def env_meta(task: str, render_offscreen: bool = False) -> dict:
    """robomimic's ``env_args`` for ``task``: robosuite kwargs as in robomimic's datasets, robosuite 1.5 controller."""
    import robosuite
    from robosuite.controllers import load_composite_controller_config

    spec = _spec(task)
    return {
        "env_name": spec.env_name,
        "env_version": robosuite.__version__,
        "type": 1,  # robomimic EnvType.ROBOSUITE_TYPE
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": load_composite_controller_config(robot="Panda"),
            "has_renderer": False,
            "has_offscreen_renderer": render_offscreen,
            "use_camera_obs": False,
            "use_object_obs": True,
            "reward_shaping": False,
            "control_freq": CONTROL_FREQ,
            "ignore_done": True,
            "render_gpu_device_id": -1,
        },
    }


def _spec(task: str) -> RobomimicTask:
    if task not in TASKS:
        raise ValueError(f"unknown robomimic task {task!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[task]


class RobomimicLowdimEnv(gym.Env):
    """A robomimic low-dim task as a gymnasium env: flat observation, sparse success reward.

    ``reset(seed=s)`` gives the same start state for the same ``s``; ``reset(options={"state": x})``
    starts from a flattened MuJoCo state (a recorded demo's ``states[0]``). ``terminated`` means the
    task succeeded (reward 1): the episode's max reward is then 1 whatever would follow, so running on
    would not change Diffusion Policy's score.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FREQ}

    def __init__(self, task: str, max_episode_steps: int | None = None, render_offscreen: bool = False):
        self.spec_ = _spec(task)
        self.max_episode_steps = max_episode_steps or self.spec_.max_episode_steps
        self.render_offscreen = render_offscreen
        env_utils = _import_robomimic(render_offscreen)
        self.env = env_utils.create_env_from_metadata(
            env_meta=env_meta(task, render_offscreen),
            render=False,
            render_offscreen=render_offscreen,
            use_image_obs=False,
        )
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.spec_.obs_dim,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._steps = 0

    @property
    def sim_env(self):
        """The robosuite environment under robomimic's wrapper."""
        return self.env.env

    def _flat(self, obs: dict) -> np.ndarray:
        flat = np.concatenate([np.asarray(obs[k], dtype=np.float64).reshape(-1) for k in OBS_KEYS])
        if flat.shape != (self.spec_.obs_dim,):
            got, want = flat.shape[0], self.spec_.obs_dim
            raise RuntimeError(f"{self.spec_.name}: observation has {got} values, expected {want}")
        return flat

    def obs_dict(self) -> dict[str, np.ndarray]:
        """The low-dim observation keys as robomimic records them (for datasets)."""
        obs = self.env.get_observation()
        return {k: np.asarray(obs[k], dtype=np.float64) for k in OBS_KEYS}

    def state(self) -> np.ndarray:
        """Flattened MuJoCo state (robomimic's ``states``)."""
        return np.asarray(self.env.get_state()["states"], dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options is not None and options.get("state") is not None:
            state = np.asarray(options["state"], dtype=np.float64)
            if state.ndim != 1 or not np.all(np.isfinite(state)):
                raise ValueError(f"{self.spec_.name}: start state must be a finite flat MuJoCo state")
            self.env.reset()
            self.env.reset_to({"states": state})
            # robosuite computes relative observables (object-to-gripper) from a cache that reset_to leaves
            # one update behind: read the observation again once the cache holds the new state.
            obs = self.env.get_observation()
        else:
            if seed is None:
                seed = int(self.np_random.integers(0, 2**31 - 1))
            rng = np.random.default_rng(seed)
            self.sim_env.rng = rng
            self.sim_env.placement_initializer.rng = rng
            obs = self.env.reset()
        self._steps = 0
        return self._flat(obs), {"is_success": False, "state": self.state()}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"{self.spec_.name}: action must be {ACTION_DIM} finite numbers, got {action!r}")
        obs, _, _, _ = self.env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success = bool(self.env.is_success()["task"])
        truncated = self._steps >= self.max_episode_steps and not success
        return self._flat(obs), float(success), success, truncated, {"is_success": success}

    def render(self) -> np.ndarray:
        if not self.render_offscreen:
            raise RuntimeError(f"{self.spec_.name}: rendering needs an env made with render_offscreen=True")
        return self.env.render(mode="rgb_array", height=256, width=256, camera_name="agentview")

    def render_plan(self, plan: np.ndarray) -> np.ndarray:
        """A frame (delta actions have no world position to draw)."""
        return self.render()

    def close(self) -> None:
        self.sim_env.close()


def make_env(task: str, max_episode_steps: int | None = None, render_offscreen: bool = False) -> RobomimicLowdimEnv:
    return RobomimicLowdimEnv(task, max_episode_steps, render_offscreen)
