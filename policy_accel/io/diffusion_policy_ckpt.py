"""Reader for Diffusion Policy (``real-stanford/diffusion_policy``) workspace checkpoints, so a policy trained
there can be accelerated without retraining.

The file is ``torch.save({'cfg', 'state_dicts', 'pickles'}, pickle_module=dill)``. The policy's state dict holds the
U-Net under ``model.*`` (our :mod:`policy_accel.model.unet` uses the same names) and the normalizer under
``normalizer.params_dict.*``. The file is a pickle: unpickling can run code from it, so it is read only with
``trust_pickle=True``. This is the only reader that unpickles, which is why it is a module of its own: the
LeRobot reader (:mod:`policy_accel.io.lerobot`) and our own format never reach this code.

Shapes, horizons and scheduler settings come from the stored cfg (missing entries take Diffusion Policy's own
constructor defaults, as it would when loading). The two image workspaces load too: ``DiffusionUnetHybridImagePolicy``
(robomimic's encoder, ``obs_encoder.obs_nets.*``) and ``DiffusionUnetImagePolicy`` (``MultiImageObsEncoder``,
``obs_encoder.key_model_map.*``), their cameras and low-dim keys read from ``shape_meta`` and their normalizer kept
per key (``normalizer.params_dict.<key>.*``). Variants that our policy cannot reproduce (local conditioning, other
prediction types, resizing or random crops at evaluation, R3M backbones) are refused, never approximated.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any

import torch

from policy_accel.errors import CheckpointError, PickleRefusedError
from policy_accel.io.assembly import (
    _as_int,
    _few,
    _schedule_config,
    _tensor_dim,
    assemble_policy,
    check_trust_pickle,
)
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.transformer import TransformerConfig
from policy_accel.model.unet import UNetConfig
from policy_accel.model.vision import EncoderConfig, StateDictKeyError, convert_state_dict
from policy_accel.policy import DiffusionPolicy, PolicyConfig
from policy_accel.schedule import ScheduleConfig

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
_MISSING = object()

DP_NORMALIZER = "normalizer.params_dict."
# DP's low-dim policies that load, and the denoiser each builds (``policy.model._target_``).
DP_POLICY_DENOISERS = {
    "DiffusionUnetLowdimPolicy": ("unet", "ConditionalUnet1D"),
    "DiffusionTransformerLowdimPolicy": ("transformer", "TransformerForDiffusion"),
}
# DP's image policies that load (each builds a ConditionalUnet1D from its own arguments) and their encoder kinds
DP_IMAGE_POLICIES = {"DiffusionUnetHybridImagePolicy": "robomimic", "DiffusionUnetImagePolicy": "dp_image"}
DP_SUPPORTED = (
    "DiffusionUnetLowdimPolicy (ConditionalUnet1D), DiffusionTransformerLowdimPolicy (TransformerForDiffusion), "
    "DiffusionUnetHybridImagePolicy and DiffusionUnetImagePolicy"
)
DP_IMAGE_RANGE = (2.0, -1.0)  # get_image_range_normalizer(): scale, offset of [0, 1] -> [-1, 1]


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
    cls = _refuse_unsupported_dp(path, cfg, state)
    if cls in DP_IMAGE_POLICIES:
        config, denoiser_state, encoder_state, obs_norm, act_norm = _dp_image_parts(path, where, cfg, state, cls)
    else:
        config = _dp_policy_config(path, cfg)
        denoiser_state, obs_norm, act_norm = _dp_lowdim_parts(where, state)
        encoder_state = None
    policy = assemble_policy(
        config, denoiser_state, obs_norm, act_norm, where, f"the cfg stored in {path.name}", encoder_state
    )

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


def _dp_lowdim_parts(where: str, state: dict) -> tuple[dict, LinearNormalizer, LinearNormalizer]:
    """A low-dim policy's U-Net state and its ``obs`` / ``action`` normalizers."""
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
    return denoiser_state, obs_norm, act_norm


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


def _refuse_unsupported_dp(path: Path, cfg: dict, state: dict) -> str:
    """Refuse what no reader here reproduces; returns the policy's class name."""
    policy_cfg = cfg.get("policy") or {}
    target = str(policy_cfg.get("_target_") or "")
    cls = target.rsplit(".", 1)[-1]
    latency = _dp_get(cfg, "n_latency_steps", default=0) or 0
    if latency:
        raise CheckpointError(
            f"{path}: n_latency_steps={latency}: DP's runner drops the first {latency} predicted actions, which this "
            "toolkit's session does not do; refusing rather than executing stale actions"
        )
    if cls in DP_IMAGE_POLICIES:
        return cls
    if cls not in DP_POLICY_DENOISERS:
        raise CheckpointError(f"{path}: policy {target or '(no _target_)'} is not supported; only {DP_SUPPORTED} load")
    image_keys = [k for k in state if k.startswith("obs_encoder.")]
    if image_keys:
        raise CheckpointError(
            f"{path}: {cls} is a low-dim policy, but its weights hold observation-encoder tensors "
            f"{_few(sorted(image_keys))}; the file's cfg does not match its weights"
        )
    model_target = str((policy_cfg.get("model") or {}).get("_target_") or "")
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
    return cls


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
    denoiser = DP_POLICY_DENOISERS[str(policy_cfg["_target_"]).rsplit(".", 1)[-1]][0]
    if not model_cfg:
        raise CheckpointError(f"{path}: cfg has no policy.model section (the denoiser's constructor arguments)")
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
            # ConditionalUnet1D's constructor defaults (not ours) for anything the cfg leaves out.
            nets["unet"] = _dp_unet_config(
                model_cfg,
                "",
                input_dim=_as_int(model_cfg.get("input_dim", chunk_dim), "policy.model.input_dim"),
                global_cond_dim=0 if global_cond is None else _as_int(global_cond, "policy.model.global_cond_dim"),
                kernel_size=3,
                cond_predict_scale=False,
            )
        else:
            nets["transformer"] = _dp_transformer_config(model_cfg, chunk_dim, horizon)
        return PolicyConfig(
            task=_dp_task(cfg),
            obs_dim=obs_dim,
            action_dim=action_dim,
            horizon=horizon,
            n_obs_steps=n_obs_steps,
            n_action_steps=_as_int(_dp_get(cfg, "n_action_steps"), "n_action_steps"),
            schedule=_dp_schedule(path, cfg),
            denoiser=denoiser,
            inpainting=not obs_as_cond,
            **nets,
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: cfg has no {err.args[0]!r} (looked in policy.* and the top level)") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the stored cfg does not describe a valid policy: {err}") from None


def _dp_schedule(path: Path, cfg: dict) -> ScheduleConfig:
    """The policy's ``noise_scheduler`` and ``num_inference_steps`` (the sampler DP evaluates with)."""
    policy_cfg = cfg["policy"]
    sched_cfg = policy_cfg.get("noise_scheduler") or {}
    if not sched_cfg:
        raise CheckpointError(f"{path}: cfg has no policy.noise_scheduler section")
    return _schedule_config(
        path,
        "policy.noise_scheduler",
        kind=_dp_scheduler_kind(path, sched_cfg),
        # DP passes the policy's extra kwargs (e.g. DDIM's eta) to scheduler.step
        settings={**sched_cfg, **({"eta": policy_cfg["eta"]} if "eta" in policy_cfg else {})},
        num_inference_steps=_dp_get(cfg, "num_inference_steps", default=None),
    )


def _dp_task(cfg: dict) -> str:
    return str((cfg.get("task") or {}).get("name") or cfg.get("task_name") or "diffusion_policy")


def _dp_unet_config(
    section: dict, prefix: str, input_dim: int, global_cond_dim: int, kernel_size: int, cond_predict_scale: bool
) -> UNetConfig:
    """The U-Net of a DP config ``section`` (the low-dim ``policy.model`` or an image policy's ``policy``), with the
    source constructor's defaults where the section is silent (they differ: kernel size and FiLM scale); errors
    name the field as ``prefix + name``."""
    return UNetConfig(
        input_dim=input_dim,
        global_cond_dim=global_cond_dim,
        diffusion_step_embed_dim=_as_int(
            section.get("diffusion_step_embed_dim", 256), f"{prefix}diffusion_step_embed_dim"
        ),
        down_dims=[_as_int(d, f"{prefix}down_dims") for d in section.get("down_dims", [256, 512, 1024])],
        kernel_size=_as_int(section.get("kernel_size", kernel_size), f"{prefix}kernel_size"),
        n_groups=_as_int(section.get("n_groups", 8), f"{prefix}n_groups"),
        cond_predict_scale=bool(section.get("cond_predict_scale", cond_predict_scale)),
    )


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


# ------------------------------------------------------------------------------------------------------------------
# Image policies: DiffusionUnetHybridImagePolicy (robomimic encoder) and DiffusionUnetImagePolicy (MultiImageObsEncoder)
# ------------------------------------------------------------------------------------------------------------------


def _dp_image_parts(
    path: Path, where: str, cfg: dict, state: dict, cls: str
) -> tuple[PolicyConfig, dict, dict, LinearNormalizer, LinearNormalizer]:
    """An image policy's config (U-Net arguments are the policy's own), U-Net and encoder states, and its per-key
    normalizers joined in the encoder's low-dim order (camera keys must be DP's [0, 1] -> [-1, 1] range map)."""
    policy_cfg = cfg["policy"]
    if not _dp_get(cfg, "obs_as_global_cond", default=True):
        raise CheckpointError(
            f"{path}: obs_as_global_cond=False (image features inpainted into the denoised chunk) is not supported "
            f"for {cls}; only obs_as_global_cond=True loads"
        )
    meta = policy_cfg.get("shape_meta") or cfg.get("shape_meta") or (cfg.get("task") or {}).get("shape_meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: cfg has no shape_meta (the policy's cameras and low-dim keys)")
    cameras, low_dim, order, action_dim = _dp_shape_meta(path, meta)
    if DP_IMAGE_POLICIES[cls] == "robomimic":
        encoder = _dp_hybrid_encoder(path, where, policy_cfg, cameras, low_dim, order, state)
    else:
        encoder = _dp_image_encoder(path, where, policy_cfg, cameras, low_dim, state)
    try:
        encoder_state = convert_state_dict(state, encoder)
    except StateDictKeyError as err:
        raise CheckpointError(f"{where}: {err}") from None

    keys = [*order, "action"]
    normalizer_keys = tuple(f"{DP_NORMALIZER}{k}." for k in keys)
    denoiser_state, unexpected = {}, []
    for key, value in state.items():
        if key.startswith("model."):
            denoiser_state[key[len("model.") :]] = value
        elif not key.startswith(("obs_encoder.", "mask_generator.", *normalizer_keys)) and key != "_dummy_variable":
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"{where} has keys {cls} with this shape_meta does not have: {_few(sorted(unexpected))}; expected "
            f"model.*, obs_encoder.*, {DP_NORMALIZER}<key>.* for {keys}"
        )
    norms = {k: _dp_key_normalizer(where, state, k) for k in keys}
    for cam, _ in cameras:
        scale, offset = norms[cam].scale, norms[cam].offset
        if not (bool((scale == DP_IMAGE_RANGE[0]).all()) and bool((offset == DP_IMAGE_RANGE[1]).all())):
            raise CheckpointError(
                f"{where}: {DP_NORMALIZER}{cam} is not DP's image range normalizer (scale 2, offset -1: [0, 1] -> "
                f"[-1, 1]) but scale {scale.tolist()}, offset {offset.tolist()}; only that map is supported for cameras"
            )
    for name, dim in [*low_dim, ("action", action_dim)]:
        if norms[name].dim != dim:
            raise CheckpointError(
                f"{where}: {DP_NORMALIZER}{name}.scale has {norms[name].dim} entries, shape_meta gives {name!r} {dim}"
            )
    obs_norm = LinearNormalizer.concat([norms[name] for name, _ in low_dim]) if low_dim else _empty_normalizer()
    try:
        n_obs_steps = _as_int(_dp_get(cfg, "n_obs_steps"), "n_obs_steps")
        config = PolicyConfig(
            task=_dp_task(cfg),
            obs_dim=encoder.low_dim_total,
            action_dim=action_dim,
            horizon=_as_int(_dp_get(cfg, "horizon"), "horizon"),
            n_obs_steps=n_obs_steps,
            n_action_steps=_as_int(_dp_get(cfg, "n_action_steps"), "n_action_steps"),
            # the image policies' constructor defaults for what the cfg leaves out
            unet=_dp_unet_config(
                policy_cfg,
                "policy.",
                input_dim=action_dim,
                global_cond_dim=encoder.step_feature_dim() * n_obs_steps,
                kernel_size=5,
                cond_predict_scale=True,
            ),
            schedule=_dp_schedule(path, cfg),
            encoder=encoder,
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: cfg has no {err.args[0]!r} (looked in policy.* and the top level)") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the stored cfg does not describe a valid policy: {err}") from None
    return config, denoiser_state, encoder_state, obs_norm, norms["action"]


def _dp_shape_meta(
    path: Path, meta: dict
) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[str, int]], list[str], int]:
    """(cameras, low-dim keys, every obs key in shape_meta order, action_dim) from DP's ``shape_meta``."""
    obs = meta.get("obs")
    if not isinstance(obs, dict) or not obs:
        raise CheckpointError(f"{path}: shape_meta.obs is missing or empty")
    cameras, low_dim = [], []
    for key, attr in obs.items():
        shape = (attr or {}).get("shape")
        kind = (attr or {}).get("type", "low_dim")  # DP's default
        if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise CheckpointError(f"{path}: shape_meta.obs.{key}.shape={shape!r} is not a list of positive integers")
        if kind == "rgb" and len(shape) == 3:
            cameras.append((str(key), tuple(shape)))
        elif kind == "low_dim" and len(shape) == 1:
            low_dim.append((str(key), shape[0]))
        elif kind in ("rgb", "low_dim"):
            raise CheckpointError(
                f"{path}: shape_meta.obs.{key}.shape={list(shape)} does not fit type {kind!r} (rgb: C, H, W; "
                "low_dim: one dimension)"
            )
        else:
            raise CheckpointError(f"{path}: shape_meta.obs.{key}.type={kind!r} is not supported (only rgb, low_dim)")
    if not cameras:
        raise CheckpointError(f"{path}: shape_meta.obs has no rgb key, so the image policy has no camera")
    action = (meta.get("action") or {}).get("shape")
    if not isinstance(action, list | tuple) or len(action) != 1 or not isinstance(action[0], int):
        raise CheckpointError(f"{path}: shape_meta.action.shape={action!r}; one dimension is expected")
    return cameras, low_dim, [str(k) for k in obs], action[0]


def _dp_hybrid_encoder(
    path: Path, where: str, policy_cfg: dict, cameras: list, low_dim: list, order: list[str], state: dict
) -> EncoderConfig:
    """robomimic's encoder as DP builds it: sizes from the weights (DP fixes 32 keypoints and 64 features through
    robomimic's config, not the cfg), features in shape_meta order."""
    crop = policy_cfg.get("crop_shape", [76, 76])  # the policy's constructor default
    if crop is not None and not policy_cfg.get("eval_fixed_crop", False):
        raise CheckpointError(
            f"{path}: policy.eval_fixed_crop=False with crop_shape={list(crop)}: robomimic 0.2.0's CropRandomizer "
            "takes a random crop at evaluation too, so the source's actions are random in the crop; only "
            "eval_fixed_crop=True (center crop at evaluation, as DP's configs set) loads"
        )
    prefix = f"obs_encoder.obs_nets.{cameras[0][0]}."
    try:
        return EncoderConfig(
            kind="robomimic",
            cameras=cameras,
            low_dim=low_dim,
            feature_order=order,
            crop_shape=crop,
            width=_tensor_dim(state, prefix + "backbone.nets.0.weight", where),
            norm="group" if policy_cfg.get("obs_encoder_group_norm", False) else "batch",
            num_keypoints=_tensor_dim(state, prefix + "pool.nets.weight", where),
            feature_dim=_tensor_dim(state, prefix + "nets.3.weight", where),
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: the policy's camera settings are not a valid encoder: {err}") from None


def _dp_image_encoder(
    path: Path, where: str, policy_cfg: dict, cameras: list, low_dim: list, state: dict
) -> EncoderConfig:
    """``MultiImageObsEncoder`` from ``policy.obs_encoder`` (its constructor defaults for what the cfg leaves out)."""
    enc = policy_cfg.get("obs_encoder")
    if not isinstance(enc, dict) or not str(enc.get("_target_", "")).endswith("MultiImageObsEncoder"):
        raise CheckpointError(f"{path}: policy.obs_encoder is not a MultiImageObsEncoder section")
    rgb = enc.get("rgb_model") or {}
    if not str(rgb.get("_target_", "")).endswith("get_resnet") or rgb.get("name") != "resnet18":
        raise CheckpointError(
            f"{path}: policy.obs_encoder.rgb_model is {rgb.get('_target_')}(name={rgb.get('name')!r}); only "
            "get_resnet(name='resnet18') is supported"
        )
    if str(rgb.get("weights")).lower() == "r3m":
        raise CheckpointError(
            f"{path}: policy.obs_encoder.rgb_model.weights='r3m' (an R3M backbone) is not supported; only "
            "torchvision ResNet-18 backbones (random or ImageNet initialised) load"
        )
    if enc.get("resize_shape") is not None:
        raise CheckpointError(
            f"{path}: policy.obs_encoder.resize_shape={enc['resize_shape']!r} is not supported: DP resizes inside its "
            "encoder with torchvision's Resize, whose interpolation this toolkit does not reproduce"
        )
    crop = enc.get("crop_shape")
    if isinstance(crop, dict):
        raise CheckpointError(
            f"{path}: policy.obs_encoder.crop_shape is per camera {crop!r}; only one crop for every camera is supported"
        )
    shared = bool(enc.get("share_rgb_model", False))
    trunk = f"obs_encoder.key_model_map.{'rgb' if shared else sorted(c for c, _ in cameras)[0]}.conv1.weight"
    width = _tensor_dim(state, trunk, where)
    try:
        return EncoderConfig(
            kind="dp_image",
            cameras=cameras,
            low_dim=low_dim,
            crop_shape=crop,
            random_crop=bool(enc.get("random_crop", True)),
            width=width,
            # DP swaps BatchNorm for GroupNorm only in the per-camera copies, never in a shared model
            norm="group" if enc.get("use_group_norm", False) and not shared else "batch",
            feature_dim=8 * width,
            shared=shared,
            imagenet_norm=bool(enc.get("imagenet_norm", False)),
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: policy.obs_encoder is not a valid encoder: {err}") from None


def _dp_key_normalizer(where: str, state: dict, key: str) -> LinearNormalizer:
    """One key's ``SingleFieldLinearNormalizer`` (``normalizer.params_dict.<key>.{scale, offset, input_stats.*}``)."""
    try:
        return LinearNormalizer.from_state_dict(state, DP_NORMALIZER + key)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None


def _empty_normalizer() -> LinearNormalizer:
    """The normalizer of an image policy without low-dim keys (nothing to normalize)."""
    return LinearNormalizer(torch.zeros(0), torch.zeros(0))


__all__ = ["PICKLE_SUFFIXES", "load_diffusion_policy_ckpt", "pickle_refusal"]
