"""Our checkpoint format: a directory with ``config.json`` and ``model.safetensors``.

``model.safetensors`` holds the denoiser under ``model.<Diffusion Policy key>`` and the normalizers
under ``normalizer.{obs,action}.*``; safetensors never executes code on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from policy_accel.normalizer import LinearNormalizer
from policy_accel.policy import DiffusionPolicy, PolicyConfig
from policy_accel.unet import ConditionalUnet1D

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "policy_accel"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match its config."""


def save_policy(
    policy: DiffusionPolicy, path: str | Path, extra: dict | None = None, weights_dtype: torch.dtype = torch.float32
) -> Path:
    """Write ``policy`` to directory ``path``; ``extra`` (e.g. training info) goes into config.json.

    ``weights_dtype=torch.float16`` halves the file (for committing); loading always yields float32.
    Normalizers are stored in float32 whatever the choice.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"model.{k}": v.detach().cpu().to(weights_dtype).contiguous() for k, v in policy.model.state_dict().items()
    }
    normalizers = {
        **policy.obs_normalizer.state_dict("normalizer.obs"),
        **policy.action_normalizer.state_dict("normalizer.action"),
    }
    tensors.update({k: v.detach().cpu().float().contiguous() for k, v in normalizers.items()})
    config = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "policy": policy.config.to_dict()}
    if extra:
        config["extra"] = extra
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def load_policy(path: str | Path, device: torch.device | str = "cpu") -> DiffusionPolicy:
    """Load a policy saved by :func:`save_policy`; every failure names the file and the problem."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    for f in (config_path, weights_path):
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if raw.get("format") != FORMAT_NAME or "policy" not in raw:
        raise CheckpointError(f"{config_path} is not a {FORMAT_NAME} config (format={raw.get('format')!r})")
    try:
        config = PolicyConfig(**raw["policy"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path} has an invalid policy config: {err}") from None
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is corrupt or truncated: {err}") from None

    model = ConditionalUnet1D(config.unet)
    state = {k[len("model.") :]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match {config_path}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(f"{weights_path} has shapes that do not match {config_path}: {bad[:3]}")
    model.load_state_dict(state, strict=True)
    try:
        obs_norm = LinearNormalizer.from_state_dict(tensors, "normalizer.obs")
        act_norm = LinearNormalizer.from_state_dict(tensors, "normalizer.action")
        policy = DiffusionPolicy(config, model, obs_norm, act_norm)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: {err}") from None
    return policy.to(device)


def checkpoint_info(path: str | Path) -> dict:
    """The ``extra`` block of a checkpoint's config (training info), or {}."""
    return json.loads((Path(path) / CONFIG_FILE).read_text()).get("extra", {})


__all__ = ["CheckpointError", "load_policy", "save_policy", "checkpoint_info"]
