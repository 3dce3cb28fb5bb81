"""What every checkpoint reader shares: the trust check before any pickle, safe tensor reads, and the policy
assembled from plain parts (config, denoiser state dict, normalizers), so each reader returns parts and none of them
builds the policy its own way (no reader imports another).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from policy_accel.errors import CheckpointError, ConfigError
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.policy import DiffusionPolicy, PolicyConfig, build_denoiser


def check_trust_pickle(trust_pickle: object, name: str = "trust_pickle") -> bool:
    """``trust_pickle`` as a real boolean: whether a pickle may be opened must not depend on how "no" is spelled."""
    if not isinstance(trust_pickle, bool):
        raise ConfigError(
            f"{name}={trust_pickle!r} is not a boolean: pass true to allow unpickling a file you trust, false to "
            "refuse it"
        )
    return trust_pickle


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU); a truncated or corrupt file is a :class:`CheckpointError`."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt or truncated: {err}") from None


def assemble_policy(
    config: PolicyConfig,
    denoiser_state: dict[str, torch.Tensor],
    obs_normalizer: LinearNormalizer,
    action_normalizer: LinearNormalizer,
    weights_desc: str,
    config_desc: str,
) -> DiffusionPolicy:
    """Build the denoiser that ``config`` describes and load ``denoiser_state`` into it strictly.

    Why strict and shape-checked first: a denoiser with a missing, extra or reshaped tensor would load
    into something that runs and returns wrong actions; the error names both sources instead.
    """
    model = build_denoiser(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(denoiser_state))
    unexpected = sorted(set(denoiser_state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_desc} does not match {config_desc}: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    bad = [
        f"{k}: file {tuple(denoiser_state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if denoiser_state[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(f"{weights_desc} has shapes that do not match {config_desc}: {bad[:3]}")
    model.load_state_dict({k: v.float() for k, v in denoiser_state.items()}, strict=True)
    try:
        # also refuses non-finite weights and normalizers: they load into a policy that returns garbage "converged"
        return DiffusionPolicy(config, model, obs_normalizer, action_normalizer)
    except ValueError as err:
        raise CheckpointError(f"{weights_desc}: {err}") from None


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{'...' if len(keys) > n else ''}"
