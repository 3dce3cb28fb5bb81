"""The policy the timing tools measure (``eval/latency.py``, ``eval/overhead.py``): one definition, so both time the
same network for the same ``model`` choice."""

from __future__ import annotations

import torch

from policy_accel.errors import ConfigError
from policy_accel.io.checkpoint import load_policy
from policy_accel.model.unet import ConditionalUnet1D, UNetConfig
from policy_accel.policy import DiffusionPolicy, PolicyConfig


def timing_policy(checkpoint: str, model: str, device: torch.device, cuda_graphs: bool) -> DiffusionPolicy:
    """The checkpoint's policy, or Diffusion Policy's original-size U-Net on it (random weights, timing only), on
    ``device`` and optionally replayed from CUDA graphs: what the timing tools (latency, overhead) measure."""
    policy = load_policy(checkpoint)
    if model == "dp_original":
        torch.manual_seed(0)
        unet = UNetConfig(
            input_dim=policy.config.action_dim,
            global_cond_dim=policy.config.unet.global_cond_dim,
            diffusion_step_embed_dim=256,
            down_dims=[256, 512, 1024],
        )
        config = PolicyConfig(**{**policy.config.to_dict(), "unet": unet})
        policy = DiffusionPolicy(config, ConditionalUnet1D(unet), policy.obs_normalizer, policy.action_normalizer)
    elif model != "checkpoint":
        raise ConfigError(f"unknown model {model!r}; valid: checkpoint, dp_original")
    policy.to(device)
    if cuda_graphs:
        policy.use_cuda_graphs()
    return policy
