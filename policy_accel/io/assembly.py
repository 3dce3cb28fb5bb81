"""What every checkpoint reader shares: the trust check before any pickle, safe tensor reads, and the policy
assembled from plain parts (config, denoiser state dict, normalizers), so each reader returns parts and none of them
builds the policy its own way (no reader imports another). The Diffusion Policy and LeRobot readers also share the
translation of diffusers' scheduler settings into a :class:`ScheduleConfig` (both projects configure diffusers'
schedulers), and with it the refusal of settings our schedule tables cannot express.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from policy_accel.errors import CheckpointError, ConfigError
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.vision import ObservationEncoder
from policy_accel.policy import DiffusionPolicy, PolicyConfig, build_denoiser
from policy_accel.schedule import ScheduleConfig
from policy_accel.schema import exact_int


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
    encoder_state: dict[str, torch.Tensor] | None = None,
) -> DiffusionPolicy:
    """Build the denoiser (and an image policy's observation encoder, from ``encoder_state`` in
    :class:`~policy_accel.model.vision.ObservationEncoder` names) that ``config`` describes and load the states into
    them strictly.

    Why strict and shape-checked first: a network with a missing, extra or reshaped tensor would load into something
    that runs and returns wrong actions; the error names both sources instead.
    """
    model = build_denoiser(config)
    _load_strictly(model, denoiser_state, "", weights_desc, config_desc)
    encoder = None
    if config.encoder is not None:
        encoder = ObservationEncoder(config.encoder)
        _load_strictly(encoder, encoder_state or {}, "encoder ", weights_desc, config_desc)
    elif encoder_state:
        raise CheckpointError(
            f"{weights_desc} holds observation-encoder tensors ({_few(sorted(encoder_state))}) but {config_desc} has "
            "no encoder section"
        )
    try:
        # also refuses non-finite weights and normalizers: they load into a policy that returns garbage "converged"
        return DiffusionPolicy(config, model, obs_normalizer, action_normalizer, encoder)
    except ValueError as err:
        raise CheckpointError(f"{weights_desc}: {err}") from None


def _load_strictly(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, weights_desc: str, config_desc: str
) -> None:
    """Load ``state`` into ``module`` when its names and shapes are exactly the module's (floats as float32)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_desc} does not match {config_desc}: missing {what}{_few(missing)}, "
            f"unexpected {what}{_few(unexpected)}"
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(f"{weights_desc} has {what}shapes that do not match {config_desc}: {bad[:3]}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)


# diffusers' constructor defaults: what DP gets for a scheduler argument its cfg leaves out.
_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "prediction_type": "epsilon",
}
# diffusers' spacing and dynamic thresholding (ScheduleConfig implements both); absent keys take these defaults.
_DIFFUSERS_OPTIONAL = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
# Settings our schedule tables hard-code (ScheduleConfig.make_scheduler): any other value is refused.
_SCHEDULER_FIXED = {
    "variance_type": ("fixed_small",),  # DDPM only
    "set_alpha_to_one": (True,),  # DDIM only
    "steps_offset": (0,),
    "clip_sample_range": (1.0,),
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
    "eta": (0, 0.0),
}


def _schedule_config(
    path: Path, where: str, kind: str, settings: dict, num_inference_steps: Any, defaults: dict | None = None
) -> ScheduleConfig:
    """A :class:`ScheduleConfig` from diffusers-style scheduler settings, refusing what our tables cannot express."""
    defaults = {**_DIFFUSERS_DEFAULTS, **(defaults or {})}
    for name, allowed in _SCHEDULER_FIXED.items():
        if name == "variance_type" and kind != "ddpm" or name == "set_alpha_to_one" and kind != "ddim":
            continue
        if name in settings and settings[name] not in allowed:
            raise CheckpointError(
                f"{path}: {where}.{name}={settings[name]!r} is not supported (only {allowed[0]!r}); "
                "the sampler would not match the one the policy was trained and evaluated with"
            )
    value = {k: settings.get(k, v) for k, v in defaults.items()}
    optional = {k: settings.get(k, v) for k, v in _DIFFUSERS_OPTIONAL.items()}
    if value["prediction_type"] != "epsilon":
        raise CheckpointError(
            f"{path}: {where}.prediction_type={value['prediction_type']!r} is not supported; only 'epsilon' "
            "(noise prediction) is"
        )
    num_train = _as_int(value["num_train_timesteps"], "num_train_timesteps")
    steps = num_train if num_inference_steps is None else _as_int(num_inference_steps, "num_inference_steps")
    try:
        config = ScheduleConfig(
            kind=kind,
            num_inference_steps=steps,
            num_train_timesteps=num_train,
            beta_start=float(value["beta_start"]),
            beta_end=float(value["beta_end"]),
            beta_schedule=str(value["beta_schedule"]),
            clip_sample=bool(value["clip_sample"]),
            prediction_type="epsilon",
            timestep_spacing=settings.get("timestep_spacing"),  # None: the kind's diffusers default (leading)
            thresholding=optional["thresholding"],
            dynamic_thresholding_ratio=float(optional["dynamic_thresholding_ratio"]),
            sample_max_value=float(optional["sample_max_value"]),
        )
        config.make_scheduler()  # e.g. an unknown beta_schedule fails here, at load time
    except (NotImplementedError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {where} is not a usable schedule: {err}") from None
    return config


def _as_int(value: Any, name: str) -> int:
    try:
        return exact_int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer (unresolved interpolation?)") from None


def _tensor_dim(tensors: dict[str, torch.Tensor], key: str, where: str) -> int:
    """``tensors[key].shape[0]``: sizes no config field records (an encoder's ResNet width), read from the weights."""
    if key not in tensors:
        raise CheckpointError(f"{where} has no {key!r}, which the observation encoder's size is read from")
    return int(tensors[key].shape[0])


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{'...' if len(keys) > n else ''}"
