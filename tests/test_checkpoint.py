"""Checkpoint save/load round trip, and clear errors for missing, corrupt or mismatched files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policy_accel.io.checkpoint import CheckpointError, load_policy, save_policy
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.unet import ConditionalUnet1D, UNetConfig
from policy_accel.policy import DiffusionPolicy, PolicyConfig
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver


@pytest.fixture
def small_policy() -> DiffusionPolicy:
    torch.manual_seed(0)
    config = PolicyConfig(unet=UNetConfig(down_dims=[16, 32, 64], diffusion_step_embed_dim=32))
    obs = LinearNormalizer.fit(torch.rand(100, 18) * 512)
    act = LinearNormalizer.fit(torch.rand(100, 2) * 512)
    return DiffusionPolicy(config, ConditionalUnet1D(config.unet), obs, act)


def _actions(policy: DiffusionPolicy) -> np.ndarray:
    obs = np.random.default_rng(0).uniform(0, 512, (2, 2, 18))
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=4))
    actions, _ = policy.predict_action(obs, make_solver("sequential"), schedule, torch.Generator().manual_seed(0))
    return actions


def test_round_trip_preserves_config_weights_normalizers_and_actions(small_policy, tmp_path):
    save_policy(small_policy, tmp_path / "ckpt", extra={"note": "test"})
    loaded = load_policy(tmp_path / "ckpt", engine="torch")  # the format, bit for bit (engines: test_engine.py)
    assert loaded.config == small_policy.config
    for (k, a), (k2, b) in zip(small_policy.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    np.testing.assert_array_equal(_actions(loaded), _actions(small_policy))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["extra"] == {"note": "test"}


def test_missing_directory_and_files(small_policy, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nowhere")
    path = save_policy(small_policy, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_policy(path)


def test_truncated_weights(small_policy, tmp_path):
    path = save_policy(small_policy, tmp_path / "ckpt")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_policy(path)


def test_garbage_weights_and_config(small_policy, tmp_path):
    path = save_policy(small_policy, tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_policy(path)
    (path / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_policy(path)
    (path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="is not a policy_accel config"):
        load_policy(path)


def test_weights_that_do_not_match_the_config(small_policy, tmp_path):
    path = save_policy(small_policy, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["policy"]["unet"]["down_dims"] = [16, 32, 128]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        load_policy(path)
    config["policy"]["unet"]["down_dims"] = [16, 32]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_policy(path)
    config["policy"]["horizon"] = 15
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="invalid policy config"):
        load_policy(path)


def test_committed_checkpoint_loads_and_describes_its_training(trained_policy):
    assert trained_policy.config.task == "pusht"
    assert trained_policy.config.horizon == 16 and trained_policy.config.n_obs_steps == 2
    assert sum(p.numel() for p in trained_policy.model.parameters()) > 1e6


def test_half_precision_storage_loads_as_float32(small_policy, tmp_path):
    path = save_policy(small_policy, tmp_path / "ckpt16", weights_dtype=torch.float16)
    loaded = load_policy(path)
    for key, value in loaded.model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, small_policy.model.state_dict()[key], rtol=1e-3, atol=1e-4)
    assert (path / "model.safetensors").stat().st_size < 0.6 * (
        save_policy(small_policy, tmp_path / "c32") / "model.safetensors"
    ).stat().st_size
