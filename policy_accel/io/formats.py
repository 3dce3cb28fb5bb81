"""Readers for Diffusion Policies trained by other projects, so they can be accelerated without retraining.

* Diffusion Policy (``real-stanford/diffusion_policy``) workspace checkpoints: ``torch.save({'cfg', 'state_dicts',
  'pickles'}, pickle_module=dill)``. The policy's state dict holds the U-Net under ``model.*`` (our
  :mod:`policy_accel.model.unet` uses the same names) and the normalizer under ``normalizer.params_dict.*``. The file is
  a pickle: unpickling can run code from it, so it is read only with ``trust_pickle=True``.
* LeRobot's diffusion policy directory: ``config.json`` (``"type": "diffusion"``) + ``model.safetensors``
  (``diffusion.unet.*``, renamed 1:1 to Diffusion Policy's keys) + the normalizer statistics, either in the
  processor files (``policy_preprocessor.json`` and its ``*_normalizer_processor.safetensors``) or, in older
  exports, as ``normalize_inputs.buffer_*`` tensors in ``model.safetensors``.

Shapes, horizons and scheduler settings come from the file (missing entries take the source project's own
constructor defaults, as it would when loading). Variants that our denoiser cannot reproduce (image encoders,
transformer denoisers, inpainting or local conditioning, other prediction types) are refused, never approximated.
"""

from __future__ import annotations

import importlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policy_accel.errors import CheckpointError, PickleRefusedError
from policy_accel.io.assembly import assemble_policy, check_trust_pickle, read_safetensors
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.transformer import TransformerConfig
from policy_accel.model.unet import UNetConfig
from policy_accel.policy import DiffusionPolicy, PolicyConfig
from policy_accel.schedule import ScheduleConfig

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
_MISSING = object()

# ------------------------------------------------------------------------------------------------
# Diffusion Policy workspace checkpoints
# ------------------------------------------------------------------------------------------------

DP_NORMALIZER = "normalizer.params_dict."
# DP's low-dim policies that load, and the denoiser each builds (``policy.model._target_``).
DP_POLICY_DENOISERS = {
    "DiffusionUnetLowdimPolicy": ("unet", "ConditionalUnet1D"),
    "DiffusionTransformerLowdimPolicy": ("transformer", "TransformerForDiffusion"),
}
DP_SUPPORTED = (
    "DiffusionUnetLowdimPolicy (ConditionalUnet1D) and DiffusionTransformerLowdimPolicy (TransformerForDiffusion)"
)
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


def pickle_refusal(path: Path) -> str:
    """Why a ``.ckpt`` is not opened by default, and the three ways to opt in."""
    return (
        f"{path} is a Diffusion Policy workspace checkpoint, i.e. a Python pickle: unpickling it can run arbitrary "
        "code stored in the file, so it is not loaded by default. If you trust where the file came from, opt in "
        "with load_policy(path, trust_pickle=True), `trust_pickle=true` on the eval/rollout.py command line, "
        "or convert it once with `python eval/convert.py SRC DST --trust-pickle` and use the safetensors "
        "checkpoint DST from then on (it loads without unpickling)."
    )


def load_diffusion_policy_ckpt(path: Path, trust_pickle: bool = False) -> tuple[DiffusionPolicy, dict]:
    """Load a Diffusion Policy workspace ``.ckpt`` (EMA weights preferred); refused unless ``trust_pickle``."""
    path = Path(path)
    # only the boolean True opens a pickle: bool("no") is True, so anything else is refused before the file is read
    if check_trust_pickle(trust_pickle) is not True:
        _check_torch_file(path)  # cheap structural check, no unpickling: a truncated file fails here
        raise PickleRefusedError(pickle_refusal(path))
    _check_torch_file(path)
    pickle_module = _pickle_module()
    payload = _unpickle(path, pickle_module)
    if not isinstance(payload, dict) or "cfg" not in payload or "state_dicts" not in payload:
        found = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a Diffusion Policy workspace checkpoint: expected a dict with 'cfg' and 'state_dicts' "
            f"(written by BaseWorkspace.save_checkpoint), found {found}"
        )
    cfg = _cfg_container(path, payload["cfg"])
    state, which = _dp_state_dict(path, cfg, payload["state_dicts"])
    where = f"{path} (state_dicts[{which!r}])"
    _refuse_unsupported_dp(path, cfg, state)
    config = _dp_policy_config(path, cfg)

    denoiser_state, unexpected = {}, []
    for key, value in state.items():
        if key.startswith("model."):
            denoiser_state[key[len("model.") :]] = value
        elif key.startswith((DP_NORMALIZER + "obs.", DP_NORMALIZER + "action.")):
            continue  # read below
        elif key == "_dummy_variable" or key.startswith("mask_generator."):
            continue  # parameter-free helpers (ModuleAttrMixin's device probe, the inpainting mask generator)
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"{where} has keys a low-dim policy does not have: {_few(sorted(unexpected))}; expected model.*, "
            f"{DP_NORMALIZER}obs.*, {DP_NORMALIZER}action.*"
        )
    try:
        obs_norm = LinearNormalizer.from_state_dict(state, DP_NORMALIZER + "obs")
        act_norm = LinearNormalizer.from_state_dict(state, DP_NORMALIZER + "action")
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None
    policy = assemble_policy(config, denoiser_state, obs_norm, act_norm, where, f"the cfg stored in {path.name}")

    info: dict[str, Any] = {
        "format": "diffusion_policy",
        "source": str(path),
        "weights": which,
        "workspace": cfg.get("_target_"),
        "policy_target": (cfg.get("policy") or {}).get("_target_"),
        "task": config.task,
    }
    for name in ("global_step", "epoch"):
        blob = (payload.get("pickles") or {}).get(name)
        if isinstance(blob, bytes | bytearray):
            try:
                info[name] = pickle_module.loads(blob)  # the file is trusted at this point
            except Exception:  # bookkeeping only; a bad entry must not block loading
                pass
    return policy, info


def _check_torch_file(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty (corrupt or truncated)")
    if head.startswith(b"PK"):  # torch.save's zip container (torch >= 1.6)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CheckpointError(
                f"{path} is corrupt or truncated: not a readable torch.save archive ({err})"
            ) from None
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path} is a zip file but not a torch.save archive (no data.pkl inside)")
    elif head[0] != 0x80:  # the legacy torch.save format starts with a pickle protocol opcode
        raise CheckpointError(
            f"{path} is neither a torch.save archive nor a pickle (starts with {head!r}); "
            "expected a Diffusion Policy workspace .ckpt"
        )


def _pickle_module():
    """dill, as Diffusion Policy wrote the file with it; plain pickle reads most such files if dill is absent."""
    try:
        return importlib.import_module("dill")
    except ImportError:  # pragma: no cover - dill is a dependency
        return importlib.import_module("pickle")


def _unpickle(path: Path, pickle_module) -> Any:
    try:
        return torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)
    except ModuleNotFoundError as err:
        raise CheckpointError(
            f"{path} refers to Python module {err.name!r}, which is not installed here; "
            "a Diffusion Policy workspace checkpoint needs only torch, omegaconf and dill"
        ) from None
    except Exception as err:  # unpickling fails in many ways; all mean the same to the user
        raise CheckpointError(
            f"{path} could not be unpickled (corrupt or truncated?): {type(err).__name__}: {err}"
        ) from None


def _cfg_container(path: Path, cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # e.g. DP's ${eval:...} resolver is not registered here
            return OmegaConf.to_container(cfg, resolve=False)  # unresolved values are caught where they are read
    if isinstance(cfg, dict):
        return cfg
    raise CheckpointError(f"{path}: 'cfg' is a {type(cfg).__name__}, expected the workspace's OmegaConf config")


def _dp_state_dict(path: Path, cfg: dict, state_dicts: Any) -> tuple[dict, str]:
    """``ema_model`` when present (what DP evaluates when ``training.use_ema``), else ``model``."""
    if not isinstance(state_dicts, dict):
        raise CheckpointError(f"{path}: 'state_dicts' is a {type(state_dicts).__name__}, expected a dict")
    use_ema = (cfg.get("training") or {}).get("use_ema", True)
    order = ("ema_model", "model") if use_ema is not False else ("model",)
    for name in order:
        state = state_dicts.get(name)
        if isinstance(state, dict) and state:
            bad = [k for k, v in state.items() if not torch.is_tensor(v)]
            if bad:
                raise CheckpointError(f"{path}: state_dicts[{name!r}] has non-tensor entries {_few(bad)}")
            return state, name
    raise CheckpointError(
        f"{path}: state_dicts has no policy weights (looked for {list(order)}, found {sorted(state_dicts)})"
    )


def _refuse_unsupported_dp(path: Path, cfg: dict, state: dict) -> None:
    policy_cfg = cfg.get("policy") or {}
    target = str(policy_cfg.get("_target_") or "")
    cls = target.rsplit(".", 1)[-1]
    model_target = str((policy_cfg.get("model") or {}).get("_target_") or "")
    image_keys = [k for k in state if k.startswith("obs_encoder.")]
    if image_keys or any(word in cls for word in ("Image", "Hybrid", "Video")):
        raise CheckpointError(
            f"{path}: {cls or 'this policy'} conditions on camera images through an observation encoder "
            f"({_few(image_keys) if image_keys else target}); image encoders are not supported, only the low-dim "
            f"policies {DP_SUPPORTED} load"
        )
    if cls not in DP_POLICY_DENOISERS:
        raise CheckpointError(f"{path}: policy {target or '(no _target_)'} is not supported; only {DP_SUPPORTED} load")
    denoiser_cls = DP_POLICY_DENOISERS[cls][1]
    if model_target and model_target.rsplit(".", 1)[-1] != denoiser_cls:
        raise CheckpointError(f"{path}: denoiser {model_target} is not supported in {cls}; only {denoiser_cls} is")

    if _dp_get(cfg, "obs_as_local_cond", default=False):
        raise CheckpointError(
            f"{path}: obs_as_local_cond=True (observations as local conditioning) is not supported; only global "
            "conditioning (obs_as_global_cond=True) and inpainting (both False) are"
        )
    if _dp_get(cfg, "pred_action_steps_only", default=False):
        raise CheckpointError(
            f"{path}: pred_action_steps_only=True (the network predicts only the executed actions) is not supported; "
            "the policy must predict the whole horizon"
        )
    # DP's transformer policy always executes from index n_obs_steps - 1; the U-Net's follows oa_step_convention
    if cls == "DiffusionUnetLowdimPolicy" and not _dp_get(cfg, "oa_step_convention", default=False):
        raise CheckpointError(
            f"{path}: oa_step_convention=False (executed actions start at index n_obs_steps) is not supported; "
            "this toolkit executes actions from index n_obs_steps - 1, as every shipped DP config does"
        )
    latency = _dp_get(cfg, "n_latency_steps", default=0) or 0
    if latency:
        raise CheckpointError(
            f"{path}: n_latency_steps={latency}: DP's runner drops the first {latency} predicted actions, which this "
            "toolkit's session does not do; refusing rather than executing stale actions"
        )


def _dp_get(cfg: dict, name: str, default: Any = _MISSING) -> Any:
    """``cfg.policy.<name>`` (the policy's constructor arguments), else the workspace's top-level ``<name>``."""
    for section in (cfg.get("policy") or {}, cfg):
        if name in section:
            return section[name]
    if default is _MISSING:
        raise KeyError(name)
    return default


def _dp_policy_config(path: Path, cfg: dict) -> PolicyConfig:
    policy_cfg = cfg["policy"]
    model_cfg = policy_cfg.get("model") or {}
    sched_cfg = policy_cfg.get("noise_scheduler") or {}
    denoiser = DP_POLICY_DENOISERS[str(policy_cfg["_target_"]).rsplit(".", 1)[-1]][0]
    if not model_cfg:
        raise CheckpointError(f"{path}: cfg has no policy.model section (the denoiser's constructor arguments)")
    if not sched_cfg:
        raise CheckpointError(f"{path}: cfg has no policy.noise_scheduler section")
    if model_cfg.get("local_cond_dim") is not None:
        raise CheckpointError(f"{path}: local conditioning (policy.model.local_cond_dim) is not supported")
    try:
        obs_dim = _as_int(_dp_lookup(cfg, "obs_dim"), "obs_dim")
        action_dim = _as_int(_dp_lookup(cfg, "action_dim"), "action_dim")
        n_obs_steps = _as_int(_dp_get(cfg, "n_obs_steps"), "n_obs_steps")
        horizon = _as_int(_dp_get(cfg, "horizon"), "horizon")
        # the policies' constructor defaults (False) when the cfg leaves the switch out
        obs_as_cond = bool(_dp_get(cfg, "obs_as_global_cond" if denoiser == "unet" else "obs_as_cond", default=False))
        chunk_dim = action_dim if obs_as_cond else action_dim + obs_dim
        nets: dict[str, Any] = {"unet": None}
        if denoiser == "unet":
            global_cond = model_cfg.get("global_cond_dim", obs_dim * n_obs_steps if obs_as_cond else None)
            nets["unet"] = UNetConfig(
                input_dim=_as_int(model_cfg.get("input_dim", chunk_dim), "policy.model.input_dim"),
                global_cond_dim=0 if global_cond is None else _as_int(global_cond, "policy.model.global_cond_dim"),
                # ConditionalUnet1D's constructor defaults (not ours) for anything the cfg leaves out.
                diffusion_step_embed_dim=_as_int(
                    model_cfg.get("diffusion_step_embed_dim", 256), "diffusion_step_embed_dim"
                ),
                down_dims=[_as_int(d, "down_dims") for d in model_cfg.get("down_dims", [256, 512, 1024])],
                kernel_size=_as_int(model_cfg.get("kernel_size", 3), "kernel_size"),
                n_groups=_as_int(model_cfg.get("n_groups", 8), "n_groups"),
                cond_predict_scale=bool(model_cfg.get("cond_predict_scale", False)),
            )
        else:
            nets["transformer"] = _dp_transformer_config(model_cfg, chunk_dim, horizon)
        schedule = _schedule_config(
            path,
            "policy.noise_scheduler",
            kind=_dp_scheduler_kind(path, sched_cfg),
            # DP passes the policy's extra kwargs (e.g. DDIM's eta) to scheduler.step
            settings={**sched_cfg, **({"eta": policy_cfg["eta"]} if "eta" in policy_cfg else {})},
            num_inference_steps=_dp_get(cfg, "num_inference_steps", default=None),
        )
        task = (cfg.get("task") or {}).get("name") or cfg.get("task_name") or "diffusion_policy"
        return PolicyConfig(
            task=str(task),
            obs_dim=obs_dim,
            action_dim=action_dim,
            horizon=horizon,
            n_obs_steps=n_obs_steps,
            n_action_steps=_as_int(_dp_get(cfg, "n_action_steps"), "n_action_steps"),
            schedule=schedule,
            denoiser=denoiser,
            inpainting=not obs_as_cond,
            **nets,
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: cfg has no {err.args[0]!r} (looked in policy.* and the top level)") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the stored cfg does not describe a valid policy: {err}") from None


def _dp_transformer_config(model_cfg: dict, chunk_dim: int, horizon: int) -> TransformerConfig:
    """``TransformerForDiffusion``'s arguments, with its constructor defaults for what the cfg leaves out (DP
    derives ``obs_as_cond`` from ``cond_dim > 0`` and takes ``n_obs_steps = horizon`` when it is None)."""
    cond_dim = _as_int(model_cfg.get("cond_dim", 0), "policy.model.cond_dim")
    n_obs_steps = model_cfg.get("n_obs_steps")
    return TransformerConfig(
        input_dim=_as_int(model_cfg.get("input_dim", chunk_dim), "policy.model.input_dim"),
        output_dim=_as_int(model_cfg.get("output_dim", chunk_dim), "policy.model.output_dim"),
        horizon=_as_int(model_cfg.get("horizon", horizon), "policy.model.horizon"),
        n_obs_steps=_as_int(horizon if n_obs_steps is None else n_obs_steps, "policy.model.n_obs_steps"),
        cond_dim=cond_dim,
        n_layer=_as_int(model_cfg.get("n_layer", 12), "policy.model.n_layer"),
        n_head=_as_int(model_cfg.get("n_head", 12), "policy.model.n_head"),
        n_emb=_as_int(model_cfg.get("n_emb", 768), "policy.model.n_emb"),
        p_drop_emb=float(model_cfg.get("p_drop_emb", 0.1)),
        p_drop_attn=float(model_cfg.get("p_drop_attn", 0.1)),
        causal_attn=bool(model_cfg.get("causal_attn", False)),
        time_as_cond=bool(model_cfg.get("time_as_cond", True)),
        obs_as_cond=cond_dim > 0,
        n_cond_layers=_as_int(model_cfg.get("n_cond_layers", 0), "policy.model.n_cond_layers"),
    )


def _dp_lookup(cfg: dict, name: str) -> Any:
    try:
        return _dp_get(cfg, name)
    except KeyError:
        task = cfg.get("task") or {}
        if name in task:
            return task[name]
        raise


def _dp_scheduler_kind(path: Path, sched_cfg: dict) -> str:
    target = str(sched_cfg.get("_target_") or "")
    cls = target.rsplit(".", 1)[-1]
    kinds = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
    if cls not in kinds:
        raise CheckpointError(
            f"{path}: noise scheduler {target or '(no _target_)'} is not supported; only diffusers' DDPMScheduler "
            "and DDIMScheduler are"
        )
    return kinds[cls]


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
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{name}={value!r} is not an integer (unresolved interpolation?)")
    return int(value)


# ------------------------------------------------------------------------------------------------
# LeRobot diffusion policy directories
# ------------------------------------------------------------------------------------------------

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


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{'...' if len(keys) > n else ''}"


__all__ = [
    "PICKLE_SUFFIXES",
    "is_lerobot_config",
    "lerobot_to_dp_key",
    "load_diffusion_policy_ckpt",
    "load_lerobot_dir",
    "pickle_refusal",
]
