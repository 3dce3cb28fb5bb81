"""Reader for LeRobot's diffusion policy directory, so a policy trained there can be accelerated without retraining.

The directory holds ``config.json`` (``"type": "diffusion"``) + ``model.safetensors`` (``diffusion.unet.*``,
renamed 1:1 to Diffusion Policy's keys) + the normalizer statistics, either in the processor files
(``policy_preprocessor.json`` and its ``*_normalizer_processor.safetensors``) or, in older exports, as
``normalize_inputs.buffer_*`` tensors in ``model.safetensors``. It is a module of its own because nothing in it
unpickles (JSON and safetensors only) and its config fields, key names and normalization differ from Diffusion
Policy's (:mod:`policy_accel.io.diffusion_policy_ckpt`).

Shapes, horizons and scheduler settings come from ``config.json`` (missing entries take LeRobot's own
``DiffusionConfig`` defaults, as it would when loading). Variants that our denoiser cannot reproduce (image
encoders, other policy types, other prediction types) are refused, never approximated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policy_accel.errors import CheckpointError
from policy_accel.io.assembly import (
    _DIFFUSERS_DEFAULTS,
    _as_int,
    _few,
    _schedule_config,
    assemble_policy,
    read_safetensors,
)
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.unet import UNetConfig
from policy_accel.policy import DiffusionPolicy, PolicyConfig

LEROBOT_UNET_PREFIX = "diffusion.unet."
LEROBOT_STATE = "observation.state"
LEROBOT_ENV_STATE = "observation.environment_state"
LEROBOT_LEGACY_NORM = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
# LeRobot's DiffusionConfig defaults: what LeRobot itself uses for a field its config.json leaves out.
_LEROBOT_DEFAULTS = {
    "n_obs_steps": 2,
    "horizon": 64,
    "n_action_steps": 32,
    "down_dims": [512, 1024, 2048],
    "kernel_size": 5,
    "n_groups": 8,
    "diffusion_step_embed_dim": 128,
    "use_film_scale_modulation": True,
    "noise_scheduler_type": "DDPM",
    "num_train_timesteps": 100,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "num_inference_steps": None,
}
_LEROBOT_NORM_EPS = 1e-8  # NormalizerProcessorStep's default eps, and the legacy Normalize modules' constant


def is_lerobot_config(raw: dict) -> bool:
    """A LeRobot policy config: draccus' ``"type"`` field, or the older ``input_shapes`` layout."""
    return "type" in raw or ("input_shapes" in raw and "down_dims" in raw)


def lerobot_to_dp_key(key: str) -> str:
    """``diffusion.unet.<LeRobot name>`` -> Diffusion Policy's name (the modules are the same, renamed)."""
    key = key[len(LEROBOT_UNET_PREFIX) :]
    key = key.replace(".conv1.", ".blocks.0.").replace(".conv2.", ".blocks.1.")
    # LeRobot's down/up-sampling layers are bare Conv1d / ConvTranspose1d; DP wraps them in Downsample1d.conv.
    return re.sub(r"^((?:down|up)_modules\.\d+\.2)\.(weight|bias)$", r"\1.conv.\2", key)


def load_lerobot_dir(path: Path, raw: dict) -> tuple[DiffusionPolicy, dict]:
    """Load a LeRobot diffusion policy directory; the observation is ``[environment_state, state]`` per step.

    LeRobot conditions on ``cat([observation.state, observation.environment_state])`` per observation step. The
    loaded policy takes ``[environment_state, state]`` instead, the layout of our PushT observation (gym-pusht's
    8 T vertices, then the agent's xy); the U-Net's conditioning columns and the normalizer are permuted to match,
    which is exact (a reordering of a linear layer's inputs).
    """
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    policy_type = raw.get("type", "diffusion")
    if policy_type != "diffusion":
        raise CheckpointError(
            f"{config_path}: LeRobot policy type {policy_type!r} is not supported; only LeRobot's diffusion policy "
            "(type 'diffusion', a ConditionalUnet1D denoiser) loads"
        )
    inputs, outputs, modes = _lerobot_features(config_path, raw)
    images = [k for k, (t, _) in inputs.items() if t == "VISUAL"]
    if images:
        raise CheckpointError(
            f"{config_path}: the policy conditions on camera images {images} through LeRobot's ResNet encoder; "
            "image encoders are not supported, only state / environment-state policies load"
        )
    others = [f"{k} ({t})" for k, (t, _) in inputs.items() if t not in ("STATE", "ENV")]
    if others:
        raise CheckpointError(f"{config_path}: input features {others} are not supported (only STATE and ENV)")
    if LEROBOT_STATE not in inputs or inputs[LEROBOT_STATE][0] != "STATE":
        raise CheckpointError(f"{config_path}: input_features has no {LEROBOT_STATE!r} (STATE), which LeRobot requires")
    env_keys = [k for k, (t, _) in inputs.items() if t == "ENV"]
    if len(env_keys) > 1:
        raise CheckpointError(f"{config_path}: more than one ENV input feature {env_keys}; LeRobot uses one")
    if "action" not in outputs or outputs["action"][0] != "ACTION":
        raise CheckpointError(f"{config_path}: output_features has no 'action' (ACTION)")
    layout = [*env_keys, LEROBOT_STATE]  # our observation order
    dims = {k: _feature_dim(config_path, k, inputs[k][1]) for k in layout}
    action_dim = _feature_dim(config_path, "action", outputs["action"][1])
    state_dim, env_dim = dims[LEROBOT_STATE], sum(dims[k] for k in env_keys)
    obs_dim = state_dim + env_dim

    def setting(name: str) -> Any:
        return raw.get(name, _LEROBOT_DEFAULTS[name])

    try:
        n_obs_steps = _as_int(setting("n_obs_steps"), "n_obs_steps")
        if setting("clip_sample_range") != 1.0:
            raise CheckpointError(
                f"{config_path}: clip_sample_range={setting('clip_sample_range')!r} is not supported (only 1.0)"
            )
        scheduler_type = setting("noise_scheduler_type")
        if scheduler_type not in ("DDPM", "DDIM"):
            raise CheckpointError(f"{config_path}: noise_scheduler_type={scheduler_type!r} is not supported")
        schedule = _schedule_config(
            config_path,
            "config",
            kind=scheduler_type.lower(),
            settings={k: setting(k) for k in _DIFFUSERS_DEFAULTS},
            num_inference_steps=setting("num_inference_steps"),
        )
        config = PolicyConfig(
            task=_lerobot_task(path),
            obs_dim=obs_dim,
            action_dim=action_dim,
            horizon=_as_int(setting("horizon"), "horizon"),
            n_obs_steps=n_obs_steps,
            n_action_steps=_as_int(setting("n_action_steps"), "n_action_steps"),
            unet=UNetConfig(
                input_dim=action_dim,
                global_cond_dim=obs_dim * n_obs_steps,
                diffusion_step_embed_dim=_as_int(setting("diffusion_step_embed_dim"), "diffusion_step_embed_dim"),
                down_dims=[_as_int(d, "down_dims") for d in setting("down_dims")],
                kernel_size=_as_int(setting("kernel_size"), "kernel_size"),
                n_groups=_as_int(setting("n_groups"), "n_groups"),
                cond_predict_scale=bool(setting("use_film_scale_modulation")),
            ),
            schedule=schedule,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path} does not describe a valid policy: {err}") from None

    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint file {weights_path} is missing")
    tensors = read_safetensors(weights_path)
    denoiser_state, legacy, image, unexpected = {}, {}, [], []
    for key, value in tensors.items():
        if key.startswith(LEROBOT_UNET_PREFIX):
            denoiser_state[lerobot_to_dp_key(key)] = value.float()
        elif key.startswith("diffusion.rgb_encoder"):
            image.append(key)
        elif key.startswith(LEROBOT_LEGACY_NORM):
            legacy[key] = value
        else:
            unexpected.append(key)
    if image:
        raise CheckpointError(
            f"{weights_path} holds image-encoder weights {_few(image)}; image encoders are not supported"
        )
    if unexpected:
        raise CheckpointError(
            f"{weights_path} has tensors a LeRobot diffusion policy does not have: {_few(sorted(unexpected))}; "
            f"expected {LEROBOT_UNET_PREFIX}* (and, in older exports, normalize_inputs.* / unnormalize_outputs.*)"
        )
    if env_dim:
        _reorder_condition(denoiser_state, config, n_obs_steps, state_dim, env_dim)

    obs_stats, action_stats, norm_source = _lerobot_stats(path, legacy)

    def mode(key: str, ftype: str, stats: _Stats) -> str:
        if stats.norm_map is None:  # legacy buffers: the modes in config.json
            return modes[key]
        if ftype != "ACTION" and stats.only_keys is not None and key not in stats.only_keys:
            return "IDENTITY"
        return stats.norm_map.get(ftype, "IDENTITY")  # what the processor step applies

    obs_norm = _cat_normalizer(
        [_lerobot_affine(path, k, mode(k, inputs[k][0], obs_stats), obs_stats, dims[k], False) for k in layout]
    )
    act_mode = mode("action", "ACTION", action_stats)
    act_norm = _cat_normalizer([_lerobot_affine(path, "action", act_mode, action_stats, action_dim, True)])
    policy = assemble_policy(config, denoiser_state, obs_norm, act_norm, str(weights_path), str(config_path))
    info = {
        "format": "lerobot",
        "source": str(path),
        "observation_layout": [{"key": k, "dim": dims[k]} for k in layout],
        "normalization": norm_source,
        "repo_id": raw.get("repo_id"),
    }
    return policy, info


def _lerobot_features(config_path: Path, raw: dict) -> tuple[dict, dict, dict[str, str]]:
    """(inputs, outputs) as ``key -> (FeatureType name, shape)`` and each feature's normalization mode."""
    modes: dict[str, str] = {}
    if "input_features" in raw or "output_features" in raw:
        inputs = {k: (str(v.get("type")), v.get("shape")) for k, v in (raw.get("input_features") or {}).items()}
        outputs = {k: (str(v.get("type")), v.get("shape")) for k, v in (raw.get("output_features") or {}).items()}
        mapping = raw.get("normalization_mapping") or {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}
        for key, (ftype, _) in {**inputs, **outputs}.items():
            modes[key] = str(mapping.get(ftype, "IDENTITY")).upper()  # LeRobot: unmapped types are left as is
    elif "input_shapes" in raw:  # LeRobot before its draccus configs: per-key shapes and modes

        def ftype(key: str) -> str:
            if key.startswith("observation.image"):
                return "VISUAL"
            return {LEROBOT_STATE: "STATE", LEROBOT_ENV_STATE: "ENV", "action": "ACTION"}.get(key, "UNKNOWN")

        inputs = {k: (ftype(k), v) for k, v in raw["input_shapes"].items()}
        outputs = {k: (ftype(k), v) for k, v in (raw.get("output_shapes") or {}).items()}
        per_key = {**(raw.get("input_normalization_modes") or {}), **(raw.get("output_normalization_modes") or {})}
        modes = {k: str(per_key.get(k, "IDENTITY")).upper() for k in {**inputs, **outputs}}
    else:
        raise CheckpointError(f"{config_path} has neither input_features nor input_shapes")
    return inputs, outputs, modes


def _feature_dim(config_path: Path, key: str, shape: Any) -> int:
    if not isinstance(shape, list | tuple) or len(shape) != 1 or not isinstance(shape[0], int):
        raise CheckpointError(f"{config_path}: feature {key!r} has shape {shape!r}; a 1-D vector is expected")
    return shape[0]


def _lerobot_task(path: Path) -> str:
    """The environment it was trained for, from LeRobot's ``train_config.json`` when it is there."""
    train_config = path / "train_config.json"
    try:
        env = json.loads(train_config.read_text()).get("env") or {}
        return str(env.get("type") or env.get("task") or "lerobot")
    except (OSError, ValueError, AttributeError):
        return "lerobot"


def _reorder_condition(state: dict, config: PolicyConfig, n_obs_steps: int, state_dim: int, env_dim: int) -> None:
    """Permute every FiLM encoder's conditioning columns from LeRobot's [state, env] to our [env, state] order."""
    per_step = state_dim + env_dim
    order = []
    for t in range(n_obs_steps):
        base = t * per_step
        order += [base + state_dim + j for j in range(env_dim)] + [base + j for j in range(state_dim)]
    dsed = config.unet.diffusion_step_embed_dim
    index = torch.tensor(list(range(dsed)) + [dsed + i for i in order])
    for key, weight in state.items():
        if key.endswith("cond_encoder.1.weight") and weight.ndim == 2 and weight.shape[1] == len(index):
            state[key] = weight[:, index].contiguous()  # a wrong width is reported by assemble_policy


@dataclass
class _Stats:
    """One normalizer's statistics (``key -> {stat: tensor}``) and how LeRobot applies them."""

    by_key: dict[str, dict[str, torch.Tensor]]
    eps: float
    legacy: bool  # the pre-processor Normalize modules: (x - min) / (max - min + 1e-8), no eps on the way back
    source: str
    norm_map: dict[str, str] | None = None  # FeatureType -> mode, as the processor step applies it
    only_keys: set[str] | None = None  # the processor's normalize_observation_keys


def _lerobot_stats(path: Path, legacy: dict) -> tuple[_Stats, _Stats, dict]:
    """Normalizer statistics for the observations and for the action, and where they came from."""
    pre_json, post_json = path / "policy_preprocessor.json", path / "policy_postprocessor.json"
    if pre_json.is_file():
        obs = _processor_stats(path, pre_json, "normalizer_processor")
        action = _processor_stats(path, post_json, "unnormalizer_processor") if post_json.is_file() else obs
        return obs, action, {"kind": "processor", "files": sorted({obs.source, action.source})}
    state_files = sorted(path.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    if len(state_files) == 1:  # the pipeline JSON is gone but its statistics file is there
        stats = _Stats(_flat_stats(read_safetensors(state_files[0])), _LEROBOT_NORM_EPS, False, state_files[0].name)
        return stats, stats, {"kind": "processor", "files": [state_files[0].name]}
    if legacy:
        obs = _Stats(_legacy_stats(legacy, "normalize_inputs."), _LEROBOT_NORM_EPS, True, "model.safetensors")
        action_stats = _legacy_stats(legacy, "unnormalize_outputs.") or _legacy_stats(legacy, "normalize_targets.")
        action = _Stats(action_stats, _LEROBOT_NORM_EPS, True, "model.safetensors")
        return obs, action, {"kind": "legacy normalize_inputs / unnormalize_outputs buffers in model.safetensors"}
    raise CheckpointError(
        f"{path} has no normalization statistics: expected policy_preprocessor.json with its "
        "*_normalizer_processor.safetensors (LeRobot >= 0.4), or normalize_inputs.* tensors in model.safetensors"
    )


def _processor_stats(path: Path, pipeline_json: Path, registry_name: str) -> _Stats:
    """The statistics a LeRobot processor pipeline's (un)normalizer step loads, with the step's own settings."""
    try:
        raw = json.loads(pipeline_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pipeline_json} is not valid JSON: {err}") from None
    steps = raw.get("steps") if isinstance(raw, dict) else None
    if not isinstance(steps, list):
        raise CheckpointError(f"{pipeline_json} is not a LeRobot processor pipeline (no 'steps' list)")
    for step in steps:
        if isinstance(step, dict) and step.get("registry_name") == registry_name:
            state_file = step.get("state_file")
            if not state_file:
                raise CheckpointError(f"{pipeline_json}: the {registry_name} step names no state_file")
            stats_path = path / state_file
            if not stats_path.is_file():
                raise CheckpointError(f"checkpoint file {stats_path} is missing (named by {pipeline_json.name})")
            config = step.get("config") or {}
            norm_map = config.get("norm_map")
            only = config.get("normalize_observation_keys")
            return _Stats(
                _flat_stats(read_safetensors(stats_path)),
                float(config.get("eps", _LEROBOT_NORM_EPS)),
                False,
                state_file,
                {str(k).upper(): str(v).upper() for k, v in norm_map.items()} if isinstance(norm_map, dict) else None,
                set(only) if only is not None else None,
            )
    raise CheckpointError(f"{pipeline_json} has no {registry_name} step, so no normalization statistics")


def _flat_stats(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``"observation.state.min"`` -> ``{"observation.state": {"min": ...}}`` (LeRobot's flat state dict)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        key, stat = flat.rsplit(".", 1)
        out.setdefault(key, {})[stat] = value.double()
    return out


def _legacy_stats(tensors: dict, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``normalize_inputs.buffer_observation_state.min`` -> ``{"observation.state": {"min": ...}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        if flat.startswith(prefix + "buffer_"):
            name, stat = flat[len(prefix + "buffer_") :].rsplit(".", 1)
            out.setdefault(_legacy_key(name), {})[stat] = value.double()
    return out


def _legacy_key(name: str) -> str:
    # buffer names replaced "." by "_": observation_state -> observation.state, action -> action
    for key in (LEROBOT_ENV_STATE, LEROBOT_STATE, "action"):
        if name == key.replace(".", "_"):
            return key
    return name


_STAT_PAIRS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


def _lerobot_affine(
    path: Path, key: str, mode: str, stats: _Stats, dim: int, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """LeRobot's (un)normalization of one feature as ``x * scale + offset`` (float64).

    MIN_MAX-like modes map [lo, hi] to [-1, 1] as LeRobot's processor does (a zero range uses eps);
    MEAN_STD is ``(x - mean) / (std + eps)``. LeRobot inverts MEAN_STD with ``std`` rather than ``std + eps``,
    a difference of 1e-8 relative. ``inverse`` says the statistics are used to unnormalize (the action).
    """
    if mode == "IDENTITY":
        return torch.ones(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), {}
    needed = _STAT_PAIRS.get(mode, ("mean", "std") if mode == "MEAN_STD" else None)
    if needed is None:
        raise CheckpointError(f"{path}: normalization mode {mode!r} of {key!r} is not supported")
    feature_stats = stats.by_key.get(key) or {}
    if any(s not in feature_stats for s in needed):
        raise CheckpointError(
            f"{path / stats.source}: no {'/'.join(needed)} statistics for {key!r} (normalization {mode}); found "
            f"{sorted(feature_stats)} for it, and statistics for {sorted(stats.by_key)}"
        )
    a, b = (feature_stats[s].reshape(-1) for s in needed)
    if a.shape != (dim,) or b.shape != (dim,):
        raise CheckpointError(
            f"{path / stats.source}: statistics of {key!r} have shape {tuple(a.shape)}, the feature has ({dim},)"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise CheckpointError(f"{path / stats.source}: statistics of {key!r} are not finite (never set?)")
    if mode == "MEAN_STD":
        scale = 1.0 / (b + stats.eps)
        offset = -a * scale
    else:
        span = b - a
        if stats.legacy and not inverse:
            span = span + stats.eps
        else:
            span = torch.where(span == 0, torch.full_like(span, stats.eps), span)
        scale = 2.0 / span
        offset = -1.0 - scale * a
    keep = {s: feature_stats[s].reshape(-1).float() for s in ("min", "max", "mean", "std") if s in feature_stats}
    return scale, offset, keep


def _cat_normalizer(parts: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> LinearNormalizer:
    scale = torch.cat([p[0] for p in parts]).float()
    offset = torch.cat([p[1] for p in parts]).float()
    names = set.intersection(*(set(p[2]) for p in parts)) if parts else set()
    stats = {name: torch.cat([p[2][name] for p in parts]) for name in sorted(names)}
    return LinearNormalizer(scale, offset, stats)


__all__ = ["is_lerobot_config", "lerobot_to_dp_key", "load_lerobot_dir"]
