"""Write one of our policies in Diffusion Policy's and LeRobot's checkpoint formats (for tests and demos).

The files use the source projects' key names and config structure (see
``/work/shared/reference/diffusion-policy-ecosystem.md`` and ``visuomotor-facts.md``): a DP workspace ``.ckpt`` with a
resolved ``train_diffusion_unet_lowdim_workspace`` cfg, or for an image policy the ``train_diffusion_unet_hybrid``
(robomimic encoder) or ``train_diffusion_unet_image`` (``MultiImageObsEncoder``) cfg with ``shape_meta`` and a
normalizer per observation key, and a LeRobot ``diffusion`` directory with its processor files (cameras as
``VISUAL`` features, their mean/std in the processor's statistics). The encoders' source names are written here from
the sources' module layouts (robomimic's ``VisualCore`` with its ``nets.N`` aliases, torchvision's ResNet names,
LeRobot's ``rgb_encoder``), not with ``policy_accel.model.vision``'s converters.
:class:`LeRobotUnet` re-creates LeRobot's ``DiffusionConditionalUnet1d`` module layout; it is written from
LeRobot's source, independently of ``policy_accel.io.lerobot``' rename map, so a wrong map cannot pass a test by
agreeing with itself.

    python tests/format_builders.py checkpoints/pusht /tmp/byo   # writes /tmp/byo/{dp.ckpt,lerobot/}
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import dill
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy_accel.model.vision import ObservationEncoder  # noqa: E402
from policy_accel.policy import DiffusionPolicy  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Diffusion Policy
# ------------------------------------------------------------------------------------------------


DP_WORKSPACE = "diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace.TrainDiffusionUnetLowdimWorkspace"


def dp_scheduler_cfg(policy: DiffusionPolicy) -> dict:
    """``policy.noise_scheduler`` as DP's configs write it (a diffusers scheduler's constructor arguments)."""
    s = policy.config.schedule
    scheduler = {
        "_target_": f"diffusers.schedulers.scheduling_{s.kind}.{s.kind.upper()}Scheduler",
        "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": s.beta_schedule,
        "clip_sample": s.clip_sample,
        "prediction_type": s.prediction_type,
    }
    if s.kind == "ddpm":
        scheduler["variance_type"] = "fixed_small"
    else:
        scheduler.update(set_alpha_to_one=True, steps_offset=0)
    return scheduler


def dp_workspace_cfg(policy: DiffusionPolicy) -> dict:
    """The resolved cfg DP's ``train_diffusion_unet_lowdim_workspace`` stores, for ``policy``'s shapes."""
    c, u, s = policy.config, policy.config.unet, policy.config.schedule
    scheduler = dp_scheduler_cfg(policy)
    obs_dim = c.obs_dim
    return {
        "_target_": DP_WORKSPACE,
        "name": "train_diffusion_unet_lowdim",
        "task_name": "pusht_lowdim",
        "exp_name": "default",
        "obs_dim": obs_dim,
        "action_dim": c.action_dim,
        "keypoint_dim": 2,
        "horizon": c.horizon,
        "n_obs_steps": c.n_obs_steps,
        "n_action_steps": c.n_action_steps,
        "n_latency_steps": 0,
        "past_action_visible": False,
        "keypoint_visible_rate": 1.0,
        "obs_as_local_cond": False,
        "obs_as_global_cond": True,
        "pred_action_steps_only": False,
        "policy": {
            "_target_": "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy",
            "model": {
                "_target_": "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D",
                "input_dim": u.input_dim,
                "local_cond_dim": None,
                "global_cond_dim": u.global_cond_dim,
                "diffusion_step_embed_dim": u.diffusion_step_embed_dim,
                "down_dims": list(u.down_dims),
                "kernel_size": u.kernel_size,
                "n_groups": u.n_groups,
                "cond_predict_scale": u.cond_predict_scale,
            },
            "noise_scheduler": scheduler,
            "horizon": c.horizon,
            "obs_dim": obs_dim,
            "action_dim": c.action_dim,
            "n_action_steps": c.n_action_steps,
            "n_obs_steps": c.n_obs_steps,
            "num_inference_steps": s.num_inference_steps,
            "obs_as_local_cond": False,
            "obs_as_global_cond": True,
            "pred_action_steps_only": False,
            "oa_step_convention": True,
        },
        "ema": {
            "_target_": "diffusion_policy.model.diffusion.ema_model.EMAModel",
            "update_after_step": 0,
            "inv_gamma": 1.0,
            "power": 0.75,
            "min_value": 0.0,
            "max_value": 0.9999,
        },
        "dataloader": {"batch_size": 256, "num_workers": 1, "shuffle": True, "pin_memory": True},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4, "betas": [0.95, 0.999], "weight_decay": 1e-6},
        "training": {
            "device": "cuda:0",
            "seed": 42,
            "debug": False,
            "resume": True,
            "lr_scheduler": "cosine",
            "lr_warmup_steps": 500,
            "num_epochs": 5000,
            "gradient_accumulate_every": 1,
            "use_ema": True,
            "rollout_every": 50,
            "checkpoint_every": 50,
            "val_every": 1,
            "sample_every": 5,
        },
        "task": {
            "name": "pusht_lowdim",
            "obs_dim": obs_dim,
            "action_dim": c.action_dim,
            "keypoint_dim": 2,
            "env_runner": {
                "_target_": "diffusion_policy.env_runner.pusht_keypoints_runner.PushTKeypointsRunner",
                "n_test": 50,
                "test_start_seed": 100000,
                "max_steps": 300,
                "n_obs_steps": c.n_obs_steps,
                "n_action_steps": c.n_action_steps,
            },
        },
    }


def dp_policy_state_dict(policy: DiffusionPolicy) -> dict[str, torch.Tensor]:
    """``DiffusionUnetLowdimPolicy.state_dict()``: U-Net under ``model.``, normalizer under ``params_dict``."""
    state = {"_dummy_variable": torch.zeros(0)}
    state.update({f"model.{k}": v.detach().clone() for k, v in policy.model.state_dict().items()})
    state["mask_generator._dummy_variable"] = torch.zeros(0)
    state.update(policy.obs_normalizer.state_dict("normalizer.params_dict.obs"))
    state.update(policy.action_normalizer.state_dict("normalizer.params_dict.action"))
    return state


DP_HYBRID_WORKSPACE = (
    "diffusion_policy.workspace.train_diffusion_unet_hybrid_workspace.TrainDiffusionUnetHybridWorkspace"
)
DP_IMAGE_WORKSPACE = "diffusion_policy.workspace.train_diffusion_unet_image_workspace.TrainDiffusionUnetImageWorkspace"
DP_HYBRID_POLICY = "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"
DP_IMAGE_POLICY = "diffusion_policy.policy.diffusion_unet_image_policy.DiffusionUnetImagePolicy"


def dp_shape_meta(policy: DiffusionPolicy) -> dict:
    """``shape_meta``: obs keys in the order the encoder concatenates them (robomimic: the feature order; DP image
    sorts them itself, so cameras then low-dim keys as configured), the low-dim type left to DP's default."""
    enc = policy.config.encoder
    cameras, low_dim = dict(enc.cameras), dict(enc.low_dim)
    order = enc.feature_order if enc.kind == "robomimic" else (*cameras, *low_dim)
    obs = {k: {"shape": list(cameras[k]), "type": "rgb"} if k in cameras else {"shape": [low_dim[k]]} for k in order}
    return {"obs": obs, "action": {"shape": [policy.config.action_dim]}}


def dp_image_workspace_cfg(policy: DiffusionPolicy) -> dict:
    """The resolved cfg of DP's ``train_diffusion_unet_hybrid_workspace`` (robomimic encoder, as in DP's published
    ``image_pusht_diffusion_policy_cnn.yaml``) or ``train_diffusion_unet_image_workspace`` (``MultiImageObsEncoder``,
    as ``train_diffusion_unet_real_image_workspace.yaml`` without its resize)."""
    c, u, enc = policy.config, policy.config.unet, policy.config.encoder
    meta = dp_shape_meta(policy)
    crop = None if enc.crop_shape is None else list(enc.crop_shape)
    hybrid = enc.kind == "robomimic"
    policy_cfg = {
        "_target_": DP_HYBRID_POLICY if hybrid else DP_IMAGE_POLICY,
        "shape_meta": meta,
        "noise_scheduler": dp_scheduler_cfg(policy),
        "horizon": c.horizon,
        "n_action_steps": c.n_action_steps,
        "n_obs_steps": c.n_obs_steps,
        "num_inference_steps": c.schedule.num_inference_steps,
        "obs_as_global_cond": True,
        "diffusion_step_embed_dim": u.diffusion_step_embed_dim,
        "down_dims": list(u.down_dims),
        "kernel_size": u.kernel_size,
        "n_groups": u.n_groups,
        "cond_predict_scale": u.cond_predict_scale,
    }
    if hybrid:
        policy_cfg.update(crop_shape=crop, obs_encoder_group_norm=enc.norm == "group", eval_fixed_crop=True)
    else:
        policy_cfg["obs_encoder"] = {
            "_target_": "diffusion_policy.model.vision.multi_image_obs_encoder.MultiImageObsEncoder",
            "shape_meta": meta,
            "rgb_model": {
                "_target_": "diffusion_policy.model.vision.model_getter.get_resnet",
                "name": "resnet18",
                "weights": None,
            },
            "resize_shape": None,
            "crop_shape": crop,
            "random_crop": enc.random_crop,
            "use_group_norm": enc.norm == "group",
            "share_rgb_model": enc.shared,
            "imagenet_norm": enc.imagenet_norm,
        }
    task = c.task
    return {
        "_target_": DP_HYBRID_WORKSPACE if hybrid else DP_IMAGE_WORKSPACE,
        "name": "train_diffusion_unet_hybrid" if hybrid else "train_diffusion_unet_image",
        "task_name": task,
        "shape_meta": meta,
        "exp_name": "default",
        "horizon": c.horizon,
        "n_obs_steps": c.n_obs_steps,
        "n_action_steps": c.n_action_steps,
        "n_latency_steps": 0,
        "dataset_obs_steps": c.n_obs_steps,
        "past_action_visible": False,
        "keypoint_visible_rate": 1.0,
        "obs_as_global_cond": True,
        "policy": policy_cfg,
        "ema": {
            "_target_": "diffusion_policy.model.diffusion.ema_model.EMAModel",
            "update_after_step": 0,
            "inv_gamma": 1.0,
            "power": 0.75,
            "min_value": 0.0,
            "max_value": 0.9999,
        },
        "dataloader": {"batch_size": 64, "num_workers": 8, "shuffle": True, "pin_memory": True},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4, "betas": [0.95, 0.999], "weight_decay": 1e-6},
        "training": {"device": "cuda:0", "seed": 42, "use_ema": True, "num_epochs": 3050, "lr_scheduler": "cosine"},
        "task": {"name": task, "shape_meta": meta, "image_shape": list(enc.cameras[0][1])},
    }


# torchvision resnet18's module names for ResNet18Trunk's positions (children()[:-2]: 2 relu and 3 maxpool hold none)
TORCHVISION_TRUNK = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def dp_hybrid_encoder_state(encoder: ObservationEncoder) -> dict[str, torch.Tensor]:
    """robomimic 0.2.0's ``ObservationEncoder`` names: per camera a ``VisualCore`` whose ``nets`` Sequential holds
    ``[backbone (ResNet18Conv: .nets), pool (SpatialSoftmax), Flatten, Linear]`` and which also registers the
    backbone and pool as attributes, so their tensors appear twice (``backbone.nets.*`` = ``nets.0.nets.*``,
    ``pool.*`` = ``nets.1.*``); the Linear is ``nets.3``."""
    out = {}
    for i, cam in enumerate(encoder.config.camera_names):
        core, base = encoder.cores[i], f"obs_encoder.obs_nets.{cam}."
        for k, v in core.backbone.state_dict().items():
            out[f"{base}backbone.nets.{k}"] = out[f"{base}nets.0.nets.{k}"] = v.detach().clone()
        for k, v in core.pool.state_dict().items():
            out[f"{base}pool.{k}"] = out[f"{base}nets.1.{k}"] = v.detach().clone()
        for k, v in core.out.state_dict().items():
            out[f"{base}nets.3.{k}"] = v.detach().clone()
    return out


def dp_image_encoder_state(encoder: ObservationEncoder) -> dict[str, torch.Tensor]:
    """``MultiImageObsEncoder``'s names: ``key_model_map.<camera>`` (``.rgb`` when shared) is a torchvision resnet18
    with ``fc = Identity`` (``conv1, bn1, layer1..4``), plus ModuleAttrMixin's ``_dummy_variable``."""
    enc = encoder.config
    out = {"obs_encoder._dummy_variable": torch.zeros(0)}
    for i, key in enumerate(["rgb"] if enc.shared else enc.camera_names):
        for k, v in encoder.cores[i].backbone.state_dict().items():
            index, rest = k.split(".", 1)
            out[f"obs_encoder.key_model_map.{key}.{TORCHVISION_TRUNK[index]}.{rest}"] = v.detach().clone()
    return out


def dp_image_policy_state_dict(policy: DiffusionPolicy) -> dict[str, torch.Tensor]:
    """An image policy's ``state_dict()``: U-Net under ``model.``, the encoder under ``obs_encoder.``, and DP's
    ``LinearNormalizer`` with one entry per key: each camera ``get_image_range_normalizer()`` (scale 2, offset -1,
    shape (1,)), each low-dim key its slice of the fitted limits."""
    enc = policy.config.encoder
    state = {"_dummy_variable": torch.zeros(0), "mask_generator._dummy_variable": torch.zeros(0)}
    state.update({f"model.{k}": v.detach().clone() for k, v in policy.model.state_dict().items()})
    encoder_state = dp_hybrid_encoder_state if enc.kind == "robomimic" else dp_image_encoder_state
    state.update(encoder_state(policy.encoder))
    for cam in enc.camera_names:
        image_range = {
            "scale": [2.0],
            "offset": [-1.0],
            "input_stats.min": [0.0],
            "input_stats.max": [1.0],
            "input_stats.mean": [0.5],
            "input_stats.std": [math.sqrt(1 / 12)],
        }
        state.update({f"normalizer.params_dict.{cam}.{k}": torch.tensor(v) for k, v in image_range.items()})
    start = 0
    norm = policy.obs_normalizer.state_dict("")
    for name, dim in enc.low_dim:
        for k, v in norm.items():
            state[f"normalizer.params_dict.{name}{k}"] = v[start : start + dim].clone()
        start += dim
    state.update(policy.action_normalizer.state_dict("normalizer.params_dict.action"))
    return state


def write_dp_ckpt(
    policy: DiffusionPolicy,
    path: str | Path,
    cfg: dict | None = None,
    ema_state: dict | None = None,
    model_state: dict | None = None,
    include_ema: bool = True,
) -> Path:
    """``BaseWorkspace.save_checkpoint``'s payload, pickled with dill. ``model`` gets perturbed weights by default,
    so a reader that took ``model`` instead of ``ema_model`` would give different actions. An image policy gets its
    image workspace's cfg and state dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = policy.config.encoder is not None
    if ema_state is None:
        ema_state = dp_image_policy_state_dict(policy) if image else dp_policy_state_dict(policy)
    if cfg is None:
        cfg = dp_image_workspace_cfg(policy) if image else dp_workspace_cfg(policy)
    if model_state is None:
        model_state = {k: (v + 0.05 if k.startswith("model.") else v.clone()) for k, v in ema_state.items()}
    n_params = sum(1 for k in model_state if k.startswith("model."))
    payload = {
        "cfg": OmegaConf.create(cfg),
        "state_dicts": {
            "model": model_state,
            **({"ema_model": ema_state} if include_ema else {}),
            "optimizer": {
                "state": {},
                "param_groups": [
                    {
                        "lr": 1e-4,
                        "betas": (0.95, 0.999),
                        "eps": 1e-8,
                        "weight_decay": 1e-6,
                        "params": list(range(n_params)),
                    }
                ],
            },
        },
        "pickles": {
            "global_step": dill.dumps(1234),
            "epoch": dill.dumps(55),
            "_output_dir": dill.dumps("data/outputs/2023.01.01/00.00.00_train_diffusion_unet_lowdim_pusht_lowdim"),
        },
    }
    with open(path, "wb") as f:
        torch.save(payload, f, pickle_module=dill)
    return path


# ------------------------------------------------------------------------------------------------
# LeRobot
# ------------------------------------------------------------------------------------------------


def _lerobot_name(dp_key: str) -> str:
    """DP's U-Net key -> LeRobot's ``diffusion.unet.*`` key."""
    parts = dp_key.split(".")
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "blocks" and i + 1 < len(parts) and parts[i + 1] in ("0", "1"):
            out.append("conv1" if parts[i + 1] == "0" else "conv2")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    if out[0] in ("down_modules", "up_modules") and out[2] == "2" and out[3] == "conv":
        del out[3]  # LeRobot's sampling layers are bare Conv1d / ConvTranspose1d
    return "diffusion.unet." + ".".join(out)


def lerobot_unet_state_dict(policy: DiffusionPolicy, state_dim: int) -> dict[str, torch.Tensor]:
    """Our U-Net in LeRobot's names; a low-dim policy's conditioning columns reordered from our ``[env, state]`` to
    LeRobot's ``[state, env]`` (an image policy's condition is already LeRobot's ``[state, cameras, env]``)."""
    c = policy.config
    env_dim = c.obs_dim - state_dim
    dsed = c.unet.diffusion_step_embed_dim
    ours = []  # LeRobot column p of step t reads our column ours[t * obs_dim + p]
    for t in range(c.n_obs_steps):
        ours += [t * c.obs_dim + env_dim + j for j in range(state_dim)] + [t * c.obs_dim + j for j in range(env_dim)]
    index = torch.tensor(list(range(dsed)) + [dsed + i for i in ours])
    out = {}
    for key, value in policy.model.state_dict().items():
        value = value.detach().clone()
        if key.endswith("cond_encoder.1.weight") and c.encoder is None:
            value = value[:, index].contiguous()
        out[_lerobot_name(key)] = value
    return out


def lerobot_rgb_encoder_state_dict(encoder: ObservationEncoder) -> dict[str, torch.Tensor]:
    """``DiffusionModel.rgb_encoder``: a ModuleList of ``DiffusionRgbEncoder`` (``rgb_encoder.<i>.``) with separate
    encoders per camera, one module (``rgb_encoder.``) when shared; inside, ``backbone`` (resnet18
    ``children()[:-2]``, so positions 0..7), ``pool.nets`` / ``pool.pos_grid`` and ``out``."""
    out = {}
    for i, core in enumerate(encoder.cores):
        base = "diffusion.rgb_encoder." + ("" if encoder.config.shared else f"{i}.")
        for module in ("backbone", "pool", "out"):
            for k, v in getattr(core, module).state_dict().items():
                out[f"{base}{module}.{k}"] = v.detach().clone()
    return out


def _min_max(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min/max whose MIN_MAX map ``2 (x - min) / (max - min) - 1`` is ``x * scale + offset``."""
    scale, offset = scale.double(), offset.double()
    lo = (-1.0 - offset) / scale
    return lo.float(), (lo + 2.0 / scale).float()


def lerobot_stats(policy: DiffusionPolicy, state_dim: int) -> dict[str, dict[str, torch.Tensor]]:
    """Dataset statistics: min/max whose MIN_MAX map is the policy's normalizer (low-dim: our ``[env, state]``; image
    policy: ``[state, env]``), and each camera's mean/std ``(C, 1, 1)`` (as LeRobot's image statistics are shaped)."""
    enc = policy.config.encoder
    env_dim = policy.config.obs_dim - state_dim
    obs_lo, obs_hi = _min_max(policy.obs_normalizer.scale, policy.obs_normalizer.offset)
    act_lo, act_hi = _min_max(policy.action_normalizer.scale, policy.action_normalizer.offset)
    state, env = (
        (slice(env_dim, None), slice(0, env_dim)) if enc is None else (slice(0, state_dim), slice(state_dim, None))
    )
    stats = {
        "observation.state": {"min": obs_lo[state], "max": obs_hi[state]},
        "action": {"min": act_lo, "max": act_hi},
    }
    if env_dim:
        stats["observation.environment_state"] = {"min": obs_lo[env], "max": obs_hi[env]}
    for value in stats.values():  # LeRobot's dataset stats always carry all four
        value["mean"] = (value["min"] + value["max"]) / 2
        value["std"] = (value["max"] - value["min"]) / 4
    for cam, (channels, _, _) in enc.cameras if enc is not None else ():
        stats[cam] = {
            "mean": torch.tensor(dict(enc.image_mean)[cam]).view(channels, 1, 1),
            "std": torch.tensor(dict(enc.image_std)[cam]).view(channels, 1, 1),
            "min": torch.zeros(channels, 1, 1),
            "max": torch.ones(channels, 1, 1),
        }
    return stats


def lerobot_config(policy: DiffusionPolicy, state_dim: int) -> dict:
    """``DiffusionConfig`` as draccus writes ``config.json`` (every field, ``"type": "diffusion"``)."""
    c, u, s = policy.config, policy.config.unet, policy.config.schedule
    enc = c.encoder
    inputs = {"observation.state": {"type": "STATE", "shape": [state_dim]}}
    for cam, shape in enc.cameras if enc is not None else ():
        inputs[cam] = {"type": "VISUAL", "shape": list(shape)}
    if c.obs_dim > state_dim:
        inputs["observation.environment_state"] = {"type": "ENV", "shape": [c.obs_dim - state_dim]}
    return {
        "type": "diffusion",
        "n_obs_steps": c.n_obs_steps,
        "normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"},
        "input_features": inputs,
        "output_features": {"action": {"type": "ACTION", "shape": [c.action_dim]}},
        "device": "cpu",
        "use_amp": False,
        "push_to_hub": False,
        "repo_id": None,
        "private": None,
        "tags": None,
        "license": None,
        "horizon": c.horizon,
        "n_action_steps": c.n_action_steps,
        "drop_n_last_frames": c.horizon - c.n_action_steps - c.n_obs_steps + 1,
        "vision_backbone": "resnet18",
        "resize_shape": None,
        "crop_ratio": 1.0,
        "crop_shape": None if enc is None or enc.crop_shape is None else list(enc.crop_shape),
        "crop_is_random": True,
        "pretrained_backbone_weights": None,
        "use_group_norm": enc is None or enc.norm == "group",
        "spatial_softmax_num_keypoints": 32 if enc is None else enc.num_keypoints,
        "use_separate_rgb_encoder_per_camera": enc is not None and not enc.shared,
        "down_dims": list(u.down_dims),
        "kernel_size": u.kernel_size,
        "n_groups": u.n_groups,
        "diffusion_step_embed_dim": u.diffusion_step_embed_dim,
        "use_film_scale_modulation": u.cond_predict_scale,
        "gradient_checkpointing": False,
        "noise_scheduler_type": s.kind.upper(),
        "num_train_timesteps": s.num_train_timesteps,
        "beta_schedule": s.beta_schedule,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "prediction_type": s.prediction_type,
        "clip_sample": s.clip_sample,
        "clip_sample_range": 1.0,
        "num_inference_steps": s.num_inference_steps,
        "compile_model": False,
        "compile_mode": "reduce-overhead",
        "do_mask_loss_for_padding": False,
        "optimizer_lr": 1e-4,
        "optimizer_betas": [0.95, 0.999],
        "optimizer_eps": 1e-8,
        "optimizer_weight_decay": 1e-6,
        "scheduler_name": "cosine",
        "scheduler_warmup_steps": 500,
    }


def write_lerobot_dir(policy: DiffusionPolicy, path: str | Path, state_dim: int = 2, layout: str = "processor") -> Path:
    """A LeRobot diffusion policy directory (an image policy's cameras as VISUAL features). ``layout``:
    ``"processor"`` (LeRobot >= 0.4: statistics in the processor files), ``"legacy"`` (statistics as
    ``normalize_inputs.buffer_*`` tensors in model.safetensors) or ``"legacy_shapes"`` (legacy tensors and the
    pre-draccus ``input_shapes`` config)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = lerobot_config(policy, state_dim)
    tensors = lerobot_unet_state_dict(policy, state_dim)
    if policy.encoder is not None:
        tensors.update(lerobot_rgb_encoder_state_dict(policy.encoder))
    stats = lerobot_stats(policy, state_dim)
    cameras = policy.config.encoder.camera_names if policy.config.encoder is not None else ()
    features = {**config["input_features"], **config["output_features"]}
    if layout == "processor":
        flat = {f"{k}.{s}": v for k, d in stats.items() for s, v in d.items()}
        flat["episode_index.min"] = torch.zeros(1)  # dataset stats carry unrelated keys too
        pre_state = "policy_preprocessor_step_3_normalizer_processor.safetensors"
        post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
        save_file(flat, str(path / pre_state))
        save_file({k: v for k, v in flat.items() if k.startswith("action.")}, str(path / post_state))
        norm = {"eps": 1e-8, "features": features, "norm_map": config["normalization_mapping"]}
        pre = {
            "name": "policy_preprocessor",
            "steps": [
                {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
                {"registry_name": "to_batch_processor", "config": {}},
                {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
                {"registry_name": "normalizer_processor", "config": norm, "state_file": pre_state},
            ],
        }
        post = {
            "name": "policy_postprocessor",
            "steps": [
                {
                    "registry_name": "unnormalizer_processor",
                    "config": {**norm, "features": {"action": features["action"]}},
                    "state_file": post_state,
                },
                {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
            ],
        }
        (path / "policy_preprocessor.json").write_text(json.dumps(pre, indent=4))
        (path / "policy_postprocessor.json").write_text(json.dumps(post, indent=4))
    else:
        for key, d in stats.items():
            buffer = "buffer_" + key.replace(".", "_")
            prefixes = ["normalize_targets.", "unnormalize_outputs."] if key == "action" else ["normalize_inputs."]
            for prefix in prefixes:
                for s in ("mean", "std") if key in cameras else ("min", "max"):
                    tensors[f"{prefix}{buffer}.{s}"] = d[s].clone()
        if layout == "legacy_shapes":
            shapes = {k: v["shape"] for k, v in config.pop("input_features").items()}
            config.pop("normalization_mapping")
            config["input_shapes"] = shapes
            config["output_shapes"] = {k: v["shape"] for k, v in config.pop("output_features").items()}
            config["input_normalization_modes"] = {k: "mean_std" if k in cameras else "min_max" for k in shapes}
            config["output_normalization_modes"] = {"action": "min_max"}
            del config["type"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=4))
    (path / "train_config.json").write_text(json.dumps({"env": {"type": "pusht", "task": "PushT-v0"}}))
    return path


class _SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        emb = torch.exp(torch.arange(half, device=x.device) * -(math.log(10000) / (half - 1)))
        emb = x.unsqueeze(-1) * emb.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class _Conv1dBlock(nn.Module):
    def __init__(self, inp: int, out: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(inp, out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, out), nn.Mish()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _ResBlock(nn.Module):
    def __init__(self, inp: int, out: int, cond_dim: int, kernel_size: int, n_groups: int, film_scale: bool):
        super().__init__()
        self.film_scale, self.out_channels = film_scale, out
        self.conv1 = _Conv1dBlock(inp, out, kernel_size, n_groups)
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, out * 2 if film_scale else out))
        self.conv2 = _Conv1dBlock(out, out, kernel_size, n_groups)
        self.residual_conv = nn.Conv1d(inp, out, 1) if inp != out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        embed = self.cond_encoder(cond).unsqueeze(-1)
        if self.film_scale:
            out = embed[:, : self.out_channels] * out + embed[:, self.out_channels :]
        else:
            out = out + embed
        return self.conv2(out) + self.residual_conv(x)


class LeRobotUnet(nn.Module):
    """LeRobot's ``DiffusionConditionalUnet1d`` (module names and forward), built from a LeRobot config.json."""

    def __init__(self, config: dict):
        super().__init__()
        dsed = config["diffusion_step_embed_dim"]
        action_dim = config["output_features"]["action"]["shape"][0]
        features = config["input_features"].values()
        per_step = sum(f["shape"][0] for f in features if f["type"] in ("STATE", "ENV"))
        per_step += 2 * config["spatial_softmax_num_keypoints"] * sum(f["type"] == "VISUAL" for f in features)
        global_cond_dim = per_step * config["n_obs_steps"]
        self.diffusion_step_encoder = nn.Sequential(
            _SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        kw = dict(
            cond_dim=dsed + global_cond_dim,
            kernel_size=config["kernel_size"],
            n_groups=config["n_groups"],
            film_scale=config["use_film_scale_modulation"],
        )
        dims = config["down_dims"]
        in_out = [(action_dim, dims[0])] + list(zip(dims[:-1], dims[1:], strict=True))
        self.down_modules = nn.ModuleList(
            nn.ModuleList(
                [
                    _ResBlock(a, b, **kw),
                    _ResBlock(b, b, **kw),
                    nn.Conv1d(b, b, 3, 2, 1) if i < len(in_out) - 1 else nn.Identity(),
                ]
            )
            for i, (a, b) in enumerate(in_out)
        )
        self.mid_modules = nn.ModuleList([_ResBlock(dims[-1], dims[-1], **kw), _ResBlock(dims[-1], dims[-1], **kw)])
        self.up_modules = nn.ModuleList(
            nn.ModuleList([_ResBlock(b * 2, a, **kw), _ResBlock(a, a, **kw), nn.ConvTranspose1d(a, a, 4, 2, 1)])
            for a, b in reversed(in_out[1:])
        )
        self.final_conv = nn.Sequential(
            _Conv1dBlock(dims[0], dims[0], kernel_size=config["kernel_size"]), nn.Conv1d(dims[0], action_dim, 1)
        )

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        feature = torch.cat([self.diffusion_step_encoder(timestep), global_cond], dim=-1)
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, feature), feature)
            skips.append(x)
            x = down(x)
        for mid in self.mid_modules:
            x = mid(x, feature)
        for res1, res2, up in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = up(res2(res1(x, feature), feature))
        return self.final_conv(x).transpose(1, 2)


def main(argv: list[str] | None = None) -> None:
    """Write ``OUT/dp.ckpt`` and ``OUT/lerobot/`` from one of our checkpoints (to try the loaders end to end)."""
    from policy_accel.io.checkpoint import load_policy

    src, out = (argv if argv is not None else sys.argv[1:])[:2]
    policy = load_policy(src)
    print(write_dp_ckpt(policy, Path(out) / "dp.ckpt"))
    print(write_lerobot_dir(policy, Path(out) / "lerobot"))


if __name__ == "__main__":
    main()
