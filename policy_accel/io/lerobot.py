"""Reader for LeRobot's diffusion policy directory, so a policy trained there can be accelerated without retraining.

The directory holds ``config.json`` (``"type": "diffusion"``) + ``model.safetensors`` (``diffusion.unet.*``,
renamed 1:1 to Diffusion Policy's keys) + the normalizer statistics, either in the processor files
(``policy_preprocessor.json`` and its ``*_normalizer_processor.safetensors``) or, in older exports, as
``normalize_inputs.buffer_*`` tensors in ``model.safetensors``. It is a module of its own because nothing in it
unpickles (JSON and safetensors only) and its config fields, key names and normalization differ from Diffusion
Policy's (:mod:`policy_accel.io.diffusion_policy_ckpt`).

Shapes, horizons and scheduler settings come from ``config.json`` (missing entries take LeRobot's own
``DiffusionConfig`` defaults, as it would when loading). Cameras (``VISUAL`` features) load with LeRobot's
``DiffusionRgbEncoder`` (``diffusion.rgb_encoder[.i].*``) and each camera's mean/std from the processor files.
Variants that our policy cannot reproduce (other policy types or backbones, other prediction types, ``resize_shape``)
are refused, never approximated.
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
from policy_accel.model.vision import LEROBOT_EPS, EncoderConfig, StateDictKeyError, convert_lerobot_state_dict
from policy_accel.policy import DiffusionPolicy, PolicyConfig

LEROBOT_UNET_PREFIX = "diffusion.unet."
LEROBOT_RGB_PREFIX = "diffusion.rgb_encoder."
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
_LEROBOT_NORM_EPS = LEROBOT_EPS  # NormalizerProcessorStep's default eps, and the legacy Normalize modules' constant


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
    """Load a LeRobot diffusion policy directory.

    Without cameras the observation is ``[environment_state, state]`` per step: LeRobot conditions on
    ``cat([observation.state, observation.environment_state])``, and the loaded policy takes the layout of our PushT
    observation (gym-pusht's 8 T vertices, then the agent's xy) instead; the U-Net's conditioning columns and the
    normalizer are permuted to match, which is exact (a reordering of a linear layer's inputs). With cameras
    (``VISUAL`` features) the observation is a dict of the camera images (float, [0, 1]) and the low-dim keys
    ``[state, environment_state]``, and the condition is LeRobot's own ``[state, camera features..., env state]``.
    """
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    policy_type = raw.get("type", "diffusion")
    if policy_type != "diffusion":
        raise CheckpointError(
            f"{config_path}: LeRobot policy type {policy_type!r} is not supported; only LeRobot's diffusion policy "
            "(type 'diffusion', a ConditionalUnet1D denoiser) loads"
        )
    inputs, outputs, modes = _lerobot_features(config_path, raw)
    cameras = [k for k, (t, _) in inputs.items() if t == "VISUAL"]
    others = [f"{k} ({t})" for k, (t, _) in inputs.items() if t not in ("STATE", "ENV", "VISUAL")]
    if others:
        raise CheckpointError(f"{config_path}: input features {others} are not supported (only STATE, ENV and VISUAL)")
    if LEROBOT_STATE not in inputs or inputs[LEROBOT_STATE][0] != "STATE":
        raise CheckpointError(f"{config_path}: input_features has no {LEROBOT_STATE!r} (STATE), which LeRobot requires")
    env_keys = [k for k, (t, _) in inputs.items() if t == "ENV"]
    if len(env_keys) > 1:
        raise CheckpointError(f"{config_path}: more than one ENV input feature {env_keys}; LeRobot uses one")
    if "action" not in outputs or outputs["action"][0] != "ACTION":
        raise CheckpointError(f"{config_path}: output_features has no 'action' (ACTION)")
    # our low-dim vector: LeRobot's own [state, env] beside cameras, PushT's [env, state] without
    layout = [LEROBOT_STATE, *env_keys] if cameras else [*env_keys, LEROBOT_STATE]
    dims = {k: _feature_dim(config_path, k, inputs[k][1]) for k in layout}
    action_dim = _feature_dim(config_path, "action", outputs["action"][1])
    state_dim, env_dim = dims[LEROBOT_STATE], sum(dims[k] for k in env_keys)

    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint file {weights_path} is missing")
    tensors = read_safetensors(weights_path)
    denoiser_state, encoder_tensors, legacy, unexpected = {}, {}, {}, []
    for key, value in tensors.items():
        if key.startswith(LEROBOT_UNET_PREFIX):
            denoiser_state[lerobot_to_dp_key(key)] = value.float()
        elif key.startswith(LEROBOT_RGB_PREFIX):
            encoder_tensors[key] = value
        elif key.startswith(LEROBOT_LEGACY_NORM):
            legacy[key] = value
        else:
            unexpected.append(key)
    if encoder_tensors and not cameras:
        raise CheckpointError(
            f"{weights_path} holds image-encoder weights {_few(sorted(encoder_tensors))} but {config_path} has no "
            "VISUAL input feature"
        )
    if unexpected:
        raise CheckpointError(
            f"{weights_path} has tensors a LeRobot diffusion policy does not have: {_few(sorted(unexpected))}; "
            f"expected {LEROBOT_UNET_PREFIX}*, {LEROBOT_RGB_PREFIX}* with cameras (and, in older exports, "
            "normalize_inputs.* / unnormalize_outputs.*)"
        )
    obs_stats, action_stats, norm_source = _lerobot_stats(path, legacy, [*inputs, *outputs])

    def mode(key: str, ftype: str, stats: _Stats) -> str:
        if stats.norm_map is None:  # legacy buffers: the modes in config.json
            return modes[key]
        if ftype != "ACTION" and stats.only_keys is not None and key not in stats.only_keys:
            return "IDENTITY"
        return stats.norm_map.get(ftype, "IDENTITY")  # what the processor step applies

    encoder, encoder_state = None, None
    if cameras:
        low_dim = [(k, dims[k]) for k in layout]
        image_modes = {cam: mode(cam, "VISUAL", obs_stats) for cam in cameras}
        encoder = _lerobot_encoder(config_path, raw, inputs, low_dim, encoder_tensors, image_modes, obs_stats)
        try:
            encoder_state = convert_lerobot_state_dict(encoder_tensors, encoder)
        except StateDictKeyError as err:
            raise CheckpointError(f"{weights_path}: {err}") from None
    config = _lerobot_policy_config(path, raw, state_dim + env_dim, action_dim, encoder)
    if env_dim and not cameras:
        _reorder_condition(denoiser_state, config, config.n_obs_steps, state_dim, env_dim)

    obs_norm = LinearNormalizer.concat(
        [_lerobot_affine(path, k, mode(k, inputs[k][0], obs_stats), obs_stats, dims[k], False) for k in layout]
    )
    act_mode = mode("action", "ACTION", action_stats)
    act_norm = _lerobot_affine(path, "action", act_mode, action_stats, action_dim, True)
    policy = assemble_policy(
        config, denoiser_state, obs_norm, act_norm, str(weights_path), str(config_path), encoder_state
    )
    info = {
        "format": "lerobot",
        "source": str(path),
        "observation_layout": [{"key": k, "dim": dims[k]} for k in layout],
        "normalization": norm_source,
        "repo_id": raw.get("repo_id"),
        **({"cameras": cameras} if cameras else {}),
    }
    return policy, info


def _lerobot_policy_config(
    path: Path, raw: dict, obs_dim: int, action_dim: int, encoder: EncoderConfig | None
) -> PolicyConfig:
    """Shapes, U-Net and schedule from ``config.json`` (LeRobot's defaults for what it leaves out)."""
    config_path = path / "config.json"

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
        step_cond = obs_dim if encoder is None else encoder.step_feature_dim()
        return PolicyConfig(
            task=_lerobot_task(path),
            obs_dim=obs_dim,
            action_dim=action_dim,
            horizon=_as_int(setting("horizon"), "horizon"),
            n_obs_steps=n_obs_steps,
            n_action_steps=_as_int(setting("n_action_steps"), "n_action_steps"),
            unet=UNetConfig(
                input_dim=action_dim,
                global_cond_dim=step_cond * n_obs_steps,
                diffusion_step_embed_dim=_as_int(setting("diffusion_step_embed_dim"), "diffusion_step_embed_dim"),
                down_dims=[_as_int(d, "down_dims") for d in setting("down_dims")],
                kernel_size=_as_int(setting("kernel_size"), "kernel_size"),
                n_groups=_as_int(setting("n_groups"), "n_groups"),
                cond_predict_scale=bool(setting("use_film_scale_modulation")),
            ),
            schedule=schedule,
            encoder=encoder,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path} does not describe a valid policy: {err}") from None


def _lerobot_encoder(
    config_path: Path,
    raw: dict,
    inputs: dict,
    low_dim: list[tuple[str, int]],
    tensors: dict[str, torch.Tensor],
    image_modes: dict[str, str],
    stats: _Stats,
) -> EncoderConfig:
    """``DiffusionRgbEncoder``'s architecture from ``config.json`` (width and, where the file leaves them out,
    per-camera encoders and GroupNorm read from the weights: LeRobot 0.6.0 flipped both defaults), and each camera's
    MEAN_STD statistics from the processor (IDENTITY: mean 0, std 1, exact since ``1 + 1e-8`` is 1 in float32).
    ``pretrained_backbone_weights`` is never refused: it only initialised training, the trained weights are in the
    file."""
    cameras = [k for k, (t, _) in inputs.items() if t == "VISUAL"]
    if not tensors:
        raise CheckpointError(
            f"{config_path} has camera inputs {cameras} but {config_path.parent / 'model.safetensors'} holds no "
            f"image-encoder weights ({LEROBOT_RGB_PREFIX}*)"
        )
    separate = raw.get("use_separate_rgb_encoder_per_camera")
    if separate is None:
        separate = any(re.match(rf"{re.escape(LEROBOT_RGB_PREFIX)}\d+\.", k) for k in tensors)
    group_norm = raw.get("use_group_norm")
    if group_norm is None:
        group_norm = not any(k.endswith("running_mean") for k in tensors)
    trunk = f"{LEROBOT_RGB_PREFIX}{'0.' if separate else ''}backbone.0.weight"
    if trunk not in tensors:
        raise CheckpointError(
            f"{config_path.parent / 'model.safetensors'} has no {trunk!r}: its encoder weights "
            f"{_few(sorted(tensors))} do not match use_separate_rgb_encoder_per_camera={separate}"
        )
    backbone = raw.get("vision_backbone", "resnet18")
    if backbone != "resnet18":
        raise CheckpointError(
            f"{config_path}: vision_backbone={backbone!r} is not supported; only resnet18, the ResNet this toolkit "
            "re-implements"
        )
    if raw.get("resize_shape") is not None:
        raise CheckpointError(
            f"{config_path}: resize_shape={raw['resize_shape']!r} is not supported: LeRobot resizes inside its "
            "encoder with torchvision's Resize, whose interpolation this toolkit does not reproduce"
        )
    if stats.eps != LEROBOT_EPS and "MEAN_STD" in image_modes.values():
        raise CheckpointError(
            f"{config_path.parent / stats.source}: the normalizer's eps={stats.eps!r} is not supported for camera "
            f"images (only LeRobot's default {LEROBOT_EPS})"
        )
    mean, std = {}, {}
    for cam in cameras:
        channels = _camera_shape(config_path, cam, inputs[cam][1])[0]
        if image_modes[cam] == "IDENTITY":
            mean[cam], std[cam] = (0.0,) * channels, (1.0,) * channels
            continue
        if image_modes[cam] != "MEAN_STD":
            raise CheckpointError(
                f"{config_path}: normalization_mapping VISUAL={image_modes[cam]!r} (camera {cam!r}) is not "
                "supported; only MEAN_STD and IDENTITY"
            )
        found = stats.by_key.get(cam) or {}
        for name, out in (("mean", mean), ("std", std)):
            value = found.get(name)
            if value is None or value.numel() != channels:
                got = "none" if value is None else f"shape {tuple(value.shape)}"
                raise CheckpointError(
                    f"{config_path.parent / stats.source}: camera {cam!r} needs a per-channel {name} "
                    f"({channels} values) for MEAN_STD, found {got}"
                )
            out[cam] = tuple(float(v) for v in value.reshape(-1).float())
    try:
        keypoints = _as_int(raw.get("spatial_softmax_num_keypoints", 32), "spatial_softmax_num_keypoints")
        return EncoderConfig(
            kind="lerobot",
            cameras=[(cam, _camera_shape(config_path, cam, inputs[cam][1])) for cam in cameras],
            low_dim=low_dim,
            crop_shape=raw.get("crop_shape"),
            random_crop=bool(raw.get("crop_is_random", True)),  # training only: LeRobot center-crops at evaluation
            width=int(tensors[trunk].shape[0]),
            norm="group" if group_norm else "batch",
            num_keypoints=keypoints,
            feature_dim=2 * keypoints,
            shared=not separate,
            image_mean=[(cam, mean[cam]) for cam in cameras],
            image_std=[(cam, std[cam]) for cam in cameras],
        )
    except ValueError as err:
        raise CheckpointError(f"{config_path}: the camera settings are not a valid encoder: {err}") from None


def _camera_shape(config_path: Path, key: str, shape: Any) -> tuple[int, int, int]:
    if not isinstance(shape, list | tuple) or len(shape) != 3 or not all(isinstance(d, int) for d in shape):
        raise CheckpointError(f"{config_path}: camera {key!r} has shape {shape!r}; (C, H, W) is expected")
    return (shape[0], shape[1], shape[2])


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


def _lerobot_stats(path: Path, legacy: dict, keys: list[str]) -> tuple[_Stats, _Stats, dict]:
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
        obs = _Stats(_legacy_stats(legacy, "normalize_inputs.", keys), _LEROBOT_NORM_EPS, True, "model.safetensors")
        action_stats = _legacy_stats(legacy, "unnormalize_outputs.", keys) or _legacy_stats(
            legacy, "normalize_targets.", keys
        )
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


def _legacy_stats(tensors: dict, prefix: str, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``normalize_inputs.buffer_observation_state.min`` -> ``{"observation.state": {"min": ...}}`` for the
    feature ``keys`` (buffer names replaced "." by "_")."""
    by_buffer = {key.replace(".", "_"): key for key in keys}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        if flat.startswith(prefix + "buffer_"):
            name, stat = flat[len(prefix + "buffer_") :].rsplit(".", 1)
            out.setdefault(by_buffer.get(name, name), {})[stat] = value.double()
    return out


_STAT_PAIRS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


def _lerobot_affine(path: Path, key: str, mode: str, stats: _Stats, dim: int, inverse: bool) -> LinearNormalizer:
    """LeRobot's (un)normalization of one feature as ``x * scale + offset`` (computed in float64).

    MIN_MAX-like modes map [lo, hi] to [-1, 1] as LeRobot's processor does (a zero range uses eps);
    MEAN_STD is ``(x - mean) / (std + eps)``. LeRobot inverts MEAN_STD with ``std`` rather than ``std + eps``,
    a difference of 1e-8 relative. ``inverse`` says the statistics are used to unnormalize (the action).
    """
    if mode == "IDENTITY":
        return LinearNormalizer(torch.ones(dim), torch.zeros(dim))
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
    return LinearNormalizer(scale, offset, keep)


__all__ = ["is_lerobot_config", "lerobot_to_dp_key", "load_lerobot_dir"]
