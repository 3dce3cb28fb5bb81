"""Training an image Diffusion Policy with DP's hybrid recipe (``task=pusht_image``) on a tiny rendered dataset: the
windows, the training-time random crop, resuming, the EMA of the encoder, and the exported policy in closed loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir

from envs.pusht_image import render_demos
from policy_accel.data import ImageSequenceDataset, build_dataset
from policy_accel.errors import ConfigError
from policy_accel.experiment.build import check_task_dims
from policy_accel.io.checkpoint import load_policy
from policy_accel.model.vision import EncoderConfig, ObservationEncoder, random_crop
from policy_accel.train import train

ROOT = Path(__file__).resolve().parents[1]
LOWDIM_DEMOS = ROOT / "data" / "pusht" / "expert.zarr"
EPISODES, FRAMES = 2, 30  # the first 30 frames of the first two recorded episodes


@pytest.fixture(scope="module")
def image_demos(tmp_path_factory) -> Path:
    """Two short recorded PushT episodes rendered into a DP image replay buffer by envs.pusht_image."""
    src = zarr.open_group(str(LOWDIM_DEMOS), mode="r")
    starts = np.concatenate([[0], src["meta/episode_ends"][: EPISODES - 1]])
    rows = np.concatenate([np.arange(s, s + FRAMES) for s in starts])
    tmp = tmp_path_factory.mktemp("pusht_image")
    lowdim = zarr.open_group(str(tmp / "lowdim.zarr"), mode="w")
    for key in ("state", "keypoint", "action"):
        lowdim.create_dataset(f"data/{key}", data=src["data"][key][:][rows])
    lowdim.create_dataset("meta/episode_ends", data=np.arange(1, EPISODES + 1) * FRAMES)
    lowdim.attrs["seeds"] = list(src.attrs["seeds"][:EPISODES])
    render_demos(tmp / "lowdim.zarr", tmp / "image.zarr")
    return tmp / "image.zarr"


def _cfg(demos: Path, out_dir: Path, steps: int, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(
            "train",
            overrides=[
                "task=pusht_image",
                f"task.dataset={demos}",
                f"out_dir={out_dir}",
                f"steps={steps}",
                "batch_size=4",
                "lr=1e-3",
                "warmup_steps=2",
                "save_every=3",
                "log_every=3",
                "denoiser.down_dims=[16,32,64]",
                "denoiser.diffusion_step_embed_dim=32",
                "encoder.width=16",  # the smallest trunk GroupNorm(C // 16) can split
                "encoder.num_keypoints=8",
                "encoder.feature_dim=16",
                *extra,
            ],
        )


def test_pusht_image_composes_dps_hybrid_recipe():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=["task=pusht_image"])
        lowdim = compose("train", overrides=["task=pusht"])
    assert dict(cfg.encoder) == {
        "kind": "robomimic",
        "crop_shape": [84, 84],
        "width": 16,
        "norm": "group",
        "num_keypoints": 32,
        "feature_dim": 64,
    }
    assert (cfg.batch_size, cfg.lr, list(cfg.betas), cfg.warmup_steps, cfg.weight_decay) == (
        64,
        3e-4,
        [0.95, 0.999],
        500,
        1e-6,
    )
    assert "encoder" not in lowdim and lowdim.batch_size == 128  # the low-dim recipe is untouched


def test_a_lerobot_encoder_is_refused_for_training_before_the_data_loads(tmp_path):
    cfg = _cfg(tmp_path / "missing.zarr", tmp_path / "run", 3, "encoder.kind=lerobot")
    with pytest.raises(ConfigError, match=r"^encoder.kind=lerobot: .*evaluation only"):
        train(cfg)
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_image_windows_pad_like_the_lowdim_ones(image_demos):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        task = compose("train", overrides=["task=pusht_image", f"task.dataset={image_demos}"]).task
    dataset, obs, _ = build_dataset(task, None)
    assert isinstance(dataset, ImageSequenceDataset)
    root = zarr.open_group(str(image_demos), mode="r")
    img, state = root["data/img"][:], root["data/state"][:]
    assert np.array_equal(obs, state[:, :2])
    rows = np.array([0, 1, len(dataset) - 1])  # padded starts of episode 0, the last (padded) window of episode 1
    low, action = dataset.batch(rows)
    images = dataset.batch_images(rows)["image"]
    frames = dataset.frames(rows)[:, :2].numpy()
    last = FRAMES + FRAMES - 16 + 7  # DP's SequenceSampler: the last window starts pad_after = 7 before the end
    assert frames.tolist() == [[0, 0], [0, 1], [last, last + 1]]
    assert torch.equal(action[2, -1], action[2, -2])  # its actions repeat the episode's last one
    assert images.shape == (3, 2, 3, 96, 96) and images.dtype == torch.float32
    expected = torch.as_tensor(img[frames]).permute(0, 1, 4, 2, 3).float() / 255
    assert torch.equal(images, expected)
    assert torch.equal(low, torch.as_tensor(state[frames][..., :2]))


def test_random_crop_in_training_differs_per_image_and_center_crop_is_deterministic():
    n, h, w = 64, 96, 96
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).expand(n, 3, h, w)
    crops = random_crop(x, (84, 84))
    top, left = crops[:, 0, 0, 0] // w, crops[:, 0, 0, 0] % w
    assert crops.shape == (n, 3, 84, 84)
    assert 0 <= top.min() and top.max() <= 11 and 0 <= left.min() and left.max() <= 11  # DP: floor(12 * U[0, 1))
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > n // 2  # each image its own offset
    for i in range(n):
        t, l_ = int(top[i]), int(left[i])
        assert torch.equal(crops[i], x[i, :, t : t + 84, l_ : l_ + 84])

    cfg = EncoderConfig(kind="robomimic", cameras={"image": (3, 96, 96)}, crop_shape=(84, 84), width=16)
    torch.manual_seed(0)
    encoder = ObservationEncoder(cfg)
    image = torch.rand(1, 1, 3, 96, 96).expand(8, 2, 3, 96, 96) * 2 - 1  # one image in every row and step
    with torch.no_grad():
        train_features = encoder({"image": image}).view(16, -1)
        encoder.eval()
        eval_features = encoder({"image": image}).view(16, -1)
        again = encoder({"image": image}).view(16, -1)
    assert len({tuple(f.tolist()) for f in train_features}) > 8  # the crops differ per image (and step)
    assert torch.equal(eval_features, again) and torch.equal(eval_features, eval_features[:1].expand(16, -1))


def test_image_training_resumes_keeps_the_encoder_in_the_ema_and_runs_closed_loop(image_demos, tmp_path, run_rollout):
    out = tmp_path / "run"
    policy_dir = train(_cfg(image_demos, out, 6))
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and {"encoder", "ema_encoder"} <= set(state)
    policy = load_policy(policy_dir, engine="torch")
    enc = policy.config.encoder
    assert (enc.kind, enc.crop_shape, enc.width, enc.norm, enc.num_keypoints) == ("robomimic", (84, 84), 16, "group", 8)
    assert policy.config.obs_dim == 2 and policy.config.unet.global_cond_dim == 2 * (16 + 2)
    # the exported encoder is the EMA's, which averages (differs from) the trained weights
    exported = policy.encoder.state_dict()
    assert all(torch.equal(exported[k], state["ema_encoder"][k]) for k in exported)
    assert any(not torch.equal(state["ema_encoder"][k], state["encoder"][k]) for k in state["encoder"])

    train(_cfg(image_demos, out, 9))  # resumes at step 6, does not start over
    resumed = torch.load(out / "train_state.pt", weights_only=True)
    assert resumed["step"] == 9
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [3, 6, 9]
    assert any(not torch.equal(resumed["ema_encoder"][k], state["ema_encoder"][k]) for k in state["ema_encoder"])

    proc = run_rollout(
        "task=pusht_image",
        f"checkpoint={policy_dir}",
        "policy=ddim4",
        "solver=sequential",
        "engine=torch",
        "n_episodes=1",
        "task.max_episode_steps=10",
        f"out_dir={tmp_path / 'rollout'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "rollout" / "results.json").read_text())
    assert results["task"] == "pusht_image" and results["episodes"][0]["steps"] == 10
    # the real-time controller takes the same dict observations (the image task holds at the agent's position)
    realtime = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "realtime.py"), "threads=1", "task=pusht_image"]
        + [f"checkpoint={policy_dir}", "policy=ddim4", "solver=sequential", "engine=torch", "seeds=[100000]"]
        + ["max_steps=12", f"out_dir={tmp_path / 'realtime'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert realtime.returncode == 0, realtime.stderr[-3000:]
    online = json.loads((tmp_path / "realtime" / "results.json").read_text())
    assert online["task"] == "pusht_image" and online["episodes"][0]["steps"] == 12

    lowdim_state = {k: v for k, v in resumed.items() if k not in ("encoder", "ema_encoder")}
    torch.save(lowdim_state, out / "train_state.pt")  # another kind of run in the same out_dir: refused
    with pytest.raises(ConfigError, match="written by a low-dim policy's training"):
        train(_cfg(image_demos, out, 12))


def test_a_checkpoint_for_the_other_observation_kind_is_one_line(image_demos, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        image_task = compose("rollout", overrides=["task=pusht_image"]).task
        lowdim_task = compose("rollout", overrides=["task=pusht"]).task
    lowdim = load_policy(ROOT / "checkpoints" / "pusht", engine="torch")
    with pytest.raises(ConfigError, match=r"observes a low-dim vector \(obs_dim=18\).*task 'pusht_image' observes cam"):
        check_task_dims(lowdim, image_task, "checkpoints/pusht")
    image = load_policy(train(_cfg(image_demos, tmp_path, 1)), engine="torch")
    with pytest.raises(ConfigError, match=r"observes cameras .*task 'pusht' observes a low-dim vector \(obs_dim=18\)"):
        check_task_dims(image, lowdim_task, "image")
    check_task_dims(image, image_task, "image")
