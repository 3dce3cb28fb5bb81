"""Demonstration datasets (Diffusion Policy's zarr replay buffer, robomimic's hdf5), padded sequence windows for
training, and a task's dataset built from its config (:func:`build_dataset`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from policy_accel.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def load_replay_buffer(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``data/*`` and ``meta/episode_ends`` of a Diffusion Policy zarr replay buffer."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"replay buffer {path} does not exist (see data/pusht/README.md to regenerate it)")
    root = zarr.open_group(str(path), mode="r")
    out = {key: np.asarray(root["data"][key]) for key in root["data"].array_keys()}
    out["episode_ends"] = np.asarray(root["meta"]["episode_ends"])
    return out


def pusht_lowdim_obs(buffer: dict[str, np.ndarray]) -> np.ndarray:
    """PushT low-dim observation per frame: 8 keypoints (16) + agent xy (2)."""
    n = len(buffer["state"])
    return np.concatenate([buffer["keypoint"].reshape(n, -1), buffer["state"][:, :2]], axis=1).astype(np.float32)


PUSHT_IMAGE_CAMERAS = {"image": (3, 96, 96)}  # DP's PushTImageDataset: data/img, stored (N, 96, 96, 3) uint8
PUSHT_IMAGE_LOW_DIM = {"agent_pos": 2}  # ... and state[:, :2]


def load_pusht_image(
    path: str | Path, cameras: Mapping[str, Sequence[int]], low_dim: Mapping[str, int]
) -> dict[str, Any]:
    """A PushT image replay buffer as DP's ``PushTImageDataset`` reads it: camera ``image`` = ``data/img`` (kept
    (N, H, W, C) uint8, 1 byte a pixel in memory), low-dim ``agent_pos`` = ``state[:, :2]``, ``action``,
    ``episode_ends``. ``cameras`` / ``low_dim``: the task's layout, which must be that one."""
    cams = {name: tuple(int(v) for v in shape) for name, shape in cameras.items()}
    lows = {name: int(dim) for name, dim in low_dim.items()}
    if cams != PUSHT_IMAGE_CAMERAS or lows != PUSHT_IMAGE_LOW_DIM:
        raise ConfigError(
            f"{path}: a PushT image replay buffer gives cameras {PUSHT_IMAGE_CAMERAS} and low-dim "
            f"{PUSHT_IMAGE_LOW_DIM}, the task asks for cameras {cams} and low-dim {lows}"
        )
    buffer = load_replay_buffer(path)
    if "img" not in buffer:
        raise ConfigError(f"{path} has no data/img (render it: see data/pusht_image/README.md)")
    return {
        "images": {"image": buffer["img"]},
        "obs": buffer["state"][:, :2].astype(np.float32),
        "action": buffer["action"].astype(np.float32),
        "episode_ends": buffer["episode_ends"],
    }


def load_robomimic_hdf5(path: str | Path, obs_keys: list[str]) -> dict[str, np.ndarray]:
    """Concatenate a robomimic hdf5 dataset's demos (in ``demo_<i>`` order): obs (keys joined), actions, ends."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist (see {path.parent}/README.md to regenerate it)")
    with h5py.File(path, "r") as f:
        demos = sorted(f["data"].keys(), key=lambda name: int(name.split("_")[-1]))
        if not demos:
            raise ValueError(f"dataset {path} holds no demos under data/")
        actions = [f[f"data/{d}/actions"][()] for d in demos]
        obs = [
            np.concatenate([f[f"data/{d}/obs/{k}"][()].reshape(len(a), -1) for k in obs_keys], axis=1)
            for d, a in zip(demos, actions, strict=True)
        ]
    return {
        "obs": np.concatenate(obs).astype(np.float32),
        "action": np.concatenate(actions).astype(np.float32),
        "episode_ends": np.cumsum([len(a) for a in actions]),
    }


def load_demonstrations(path: str | Path, obs_keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """``obs`` (N, obs_dim), ``action`` (N, action_dim) and ``episode_ends`` of a task's dataset.

    ``.zarr``: a PushT replay buffer (observation = keypoints + agent xy); ``.hdf5``: robomimic's
    layout, observation = ``obs_keys`` concatenated in order.
    """
    path = Path(path)
    if path.suffix == ".hdf5":
        if not obs_keys:
            raise ValueError(f"{path}: a robomimic dataset needs the task's obs_keys")
        return load_robomimic_hdf5(path, list(obs_keys))
    buffer = load_replay_buffer(path)
    return {
        "obs": pusht_lowdim_obs(buffer),
        "action": buffer["action"].astype(np.float32),
        "episode_ends": buffer["episode_ends"],
    }


def sequence_indices(episode_ends: np.ndarray, horizon: int, pad_before: int, pad_after: int) -> np.ndarray:
    """Window starts per episode as DP's SequenceSampler makes them: (episode_start, episode_end, start)."""
    rows = []
    start = 0
    for end in episode_ends:
        length = end - start
        for s in range(-pad_before, length - horizon + pad_after + 1):
            rows.append((start, end, start + s))
        start = end
    return np.array(rows, dtype=np.int64)


class SequenceDataset(torch.utils.data.Dataset):
    """Windows of ``horizon`` frames, edges padded by repeating the first/last frame."""

    def __init__(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        episode_ends: np.ndarray,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
    ):
        self.obs = torch.as_tensor(obs, dtype=torch.float32)
        self.action = torch.as_tensor(action, dtype=torch.float32)
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.indices = sequence_indices(episode_ends, horizon, n_obs_steps - 1, n_action_steps - 1)

    def __len__(self) -> int:
        return len(self.indices)

    def window(self, i: int) -> torch.Tensor:
        ep_start, ep_end, start = self.indices[i]
        idx = np.clip(np.arange(start, start + self.horizon), ep_start, ep_end - 1)
        return torch.as_tensor(idx)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.window(i)
        return self.obs[idx[: self.n_obs_steps]], self.action[idx]

    def frames(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), horizon) frame indices of many windows, edges padded."""
        ep_start, ep_end, start = (torch.as_tensor(c) for c in self.indices[rows].T)
        idx = start[:, None] + torch.arange(self.horizon)[None]
        return torch.maximum(torch.minimum(idx, ep_end[:, None] - 1), ep_start[:, None])

    def batch(self, rows: np.ndarray, obs_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised gather of many windows (faster than a DataLoader on 2 cores): the first ``obs_steps``
        observations (default ``n_obs_steps``; an inpainting policy denoises them over the whole horizon) and the
        actions of each window."""
        idx = self.frames(rows)
        return self.obs[idx[:, : obs_steps or self.n_obs_steps]], self.action[idx]


class ImageSequenceDataset(SequenceDataset):
    """:class:`SequenceDataset` (its windows and padding; ``obs`` = the low-dim keys) plus camera images per frame,
    kept as stored, (N, H, W, C) uint8, and converted per batch (the whole PushT set is 0.9 GB as uint8)."""

    def __init__(
        self,
        images: dict[str, np.ndarray],
        obs: np.ndarray,
        action: np.ndarray,
        episode_ends: np.ndarray,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
    ):
        super().__init__(obs, action, episode_ends, horizon, n_obs_steps, n_action_steps)
        self.images = {name: torch.as_tensor(frames) for name, frames in images.items()}

    def batch_images(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Each camera's first ``n_obs_steps`` images of the windows ``rows`` (the windows :meth:`batch` gives), as
        DP's image datasets give them: (B, n_obs_steps, C, H, W) float32 in [0, 1]."""
        idx = self.frames(rows)[:, : self.n_obs_steps]
        return {name: frames[idx].permute(0, 1, 4, 2, 3).float() / 255 for name, frames in self.images.items()}


def build_dataset(task: DictConfig, max_episodes: int | None) -> tuple[SequenceDataset, np.ndarray, np.ndarray]:
    """A task config's (``configs/task/``) training windows and its raw observations and actions, from its first
    ``max_episodes`` episodes (all when None): training and the offline solver benchmark read the same data. A task
    with ``cameras`` gives an :class:`ImageSequenceDataset` whose observations are its ``low_dim`` keys."""
    windows = (task.horizon, task.n_obs_steps, task.n_action_steps)
    if "cameras" in task:
        demos = load_pusht_image(task.dataset, task.cameras, task.low_dim)
    else:
        demos = load_demonstrations(task.dataset, task.get("obs_keys"))
    obs, action, ends = demos["obs"], demos["action"], demos["episode_ends"]
    if max_episodes is not None:
        ends = ends[:max_episodes]
        obs, action = obs[: ends[-1]], action[: ends[-1]]
    if "cameras" in task:
        images = {name: frames[: len(obs)] for name, frames in demos["images"].items()}
        return ImageSequenceDataset(images, obs, action, ends, *windows), obs, action
    return SequenceDataset(obs, action, ends, *windows), obs, action
