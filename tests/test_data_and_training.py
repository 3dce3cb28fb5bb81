"""The committed expert data, DP's padded windows, and a tiny resumable training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from policy_accel.data import SequenceDataset, load_replay_buffer, pusht_lowdim_obs
from policy_accel.io.checkpoint import load_policy
from policy_accel.train import train

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "pusht" / "expert.zarr"


def test_committed_dataset_has_dps_layout_and_enough_episodes():
    buffer = load_replay_buffer(DATASET)
    ends = buffer["episode_ends"]
    assert len(ends) >= 200 and np.all(np.diff(ends) > 0)
    n = ends[-1]
    assert (
        buffer["state"].shape == (n, 5) and buffer["keypoint"].shape == (n, 8, 2) and buffer["action"].shape == (n, 2)
    )
    assert pusht_lowdim_obs(buffer).shape == (n, 18)
    assert np.isfinite(buffer["action"]).all() and (buffer["action"] >= 0).all() and (buffer["action"] <= 512).all()


def test_missing_dataset_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        load_replay_buffer(tmp_path / "nowhere.zarr")


def test_windows_are_padded_like_dps_sequence_sampler():
    obs = np.arange(10, dtype=np.float32)[:, None]
    action = np.arange(10, dtype=np.float32)[:, None]
    dataset = SequenceDataset(obs, action, np.array([4, 10]), horizon=4, n_obs_steps=2, n_action_steps=2)
    # Episode 0 (4 frames): starts -1..1 -> 3 windows; episode 1 (6 frames): starts -1..3 -> 5 windows.
    assert len(dataset) == 8
    o, a = dataset[0]
    assert a.flatten().tolist() == [0, 0, 1, 2] and o.flatten().tolist() == [0, 0]
    o, a = dataset[2]
    assert a.flatten().tolist() == [1, 2, 3, 3]
    batch_obs, batch_act = dataset.batch(np.arange(8))
    for i in range(8):
        assert torch.equal(batch_act[i], dataset[i][1]) and torch.equal(batch_obs[i], dataset[i][0])


def _cfg(out_dir: Path, steps: int):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(
            "train",
            overrides=[
                f"out_dir={out_dir}",
                f"steps={steps}",
                "max_episodes=3",
                "batch_size=16",
                "lr=1e-3",
                "warmup_steps=5",
                "save_every=20",
                "log_every=10",
                "denoiser.down_dims=[16,32,64]",
                "denoiser.diffusion_step_embed_dim=32",
                f"task.dataset={DATASET}",
            ],
        )


def test_tiny_training_run_learns_saves_and_resumes(tmp_path):
    policy_dir = train(_cfg(tmp_path, 60))
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30, 40, 50, 60]
    assert history[-1]["loss"] < 0.85 * history[0]["loss"]  # seeded: 1.06 -> 0.78
    policy = load_policy(policy_dir)
    assert policy.config.unet.down_dims == [16, 32, 64]
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    # Resuming continues from step 60, it does not start over.
    train(_cfg(tmp_path, 80))
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 80
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history][-2:] == [70, 80]
    after = load_policy(policy_dir).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
