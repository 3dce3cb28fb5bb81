"""Checkpoints: our own format, and the entry point that also reads other projects' Diffusion Policies.

Our format is a directory with ``config.json`` and ``model.safetensors``: the denoiser under
``model.<Diffusion Policy key>``, an image policy's observation encoder under ``encoder.<ObservationEncoder key>``
(its architecture is config.json's ``policy.encoder``), the normalizers under ``normalizer.{obs,action}.*``;
safetensors never executes code on load. :func:`load_policy` also reads Diffusion Policy's workspace ``.ckpt``
(a pickle, so only with ``trust_pickle=True``) and LeRobot's diffusion policy directory; the readers
for those live in :mod:`policy_accel.io.diffusion_policy_ckpt` and :mod:`policy_accel.io.lerobot`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from policy_accel.errors import CheckpointError, ConfigError
from policy_accel.io.assembly import assemble_policy, check_trust_pickle, read_safetensors
from policy_accel.io.diffusion_policy_ckpt import PICKLE_SUFFIXES, load_diffusion_policy_ckpt
from policy_accel.io.lerobot import is_lerobot_config, load_lerobot_dir
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.policy import DiffusionPolicy, PolicyConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "policy_accel"
FORMAT_VERSION = 1
SUPPORTED_FORMATS = (
    f"a {FORMAT_NAME} directory (config.json with format={FORMAT_NAME!r} + model.safetensors), "
    "a Diffusion Policy workspace .ckpt file, or a LeRobot diffusion policy directory "
    '(config.json with type="diffusion" + model.safetensors)'
)


@dataclass
class LoadedCheckpoint:
    """A loaded policy and where it came from (``info`` goes into a converted checkpoint's config)."""

    policy: DiffusionPolicy
    format: str  # "policy_accel" | "diffusion_policy" | "lerobot"
    info: dict = field(default_factory=dict)


def save_policy(
    policy: DiffusionPolicy, path: str | Path, extra: dict | None = None, weights_dtype: torch.dtype = torch.float32
) -> Path:
    """Write ``policy`` to directory ``path``; ``extra`` (e.g. training info) goes into config.json.

    ``weights_dtype=torch.float16`` halves the file (for committing); loading always yields float32.
    Buffers (BatchNorm statistics, spatial-softmax grids, attention masks) and normalizers keep their own dtype
    whatever the choice: they are small, and a keypoint grid rounded to float16 would move every feature.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _module_tensors(policy.model, "model.", weights_dtype)
    if policy.encoder is not None:
        tensors.update(_module_tensors(policy.encoder, "encoder.", weights_dtype))
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


def _module_tensors(module: torch.nn.Module, prefix: str, weights_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``module``'s state dict under ``prefix``: parameters in ``weights_dtype``, buffers as they are."""
    parameters = {name for name, _ in module.named_parameters()}
    return {
        prefix + k: (v.to(weights_dtype) if k in parameters else v).detach().cpu().contiguous()
        for k, v in module.state_dict().items()
    }


def load_policy(
    path: str | Path, device: torch.device | str = "cpu", trust_pickle: bool = False, engine: str = "auto"
) -> DiffusionPolicy:
    """Load a policy in any supported format; every failure is a :class:`CheckpointError` naming the file.

    ``trust_pickle=True`` is needed for Diffusion Policy's ``.ckpt`` files only: they are pickles, and
    unpickling a file can run code from it, so they are refused unless the caller vouches for the file with the
    boolean ``True`` (a string such as ``"no"`` is an error, never a yes).

    ``engine``: what serves the denoiser (:meth:`DiffusionPolicy.use_engine`); ``auto`` compiles it for the
    fastest exact engine of ``device`` now, once, outside any control loop; ``torch`` keeps the eager module.
    """
    policy = read_checkpoint(path, trust_pickle=trust_pickle).policy.to(device)
    return policy if engine == "torch" else policy.use_engine(engine)


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Detect the format of ``path`` and load it on the CPU, keeping what is known about its origin."""
    check_trust_pickle(trust_pickle)
    if not isinstance(path, str | Path) or not str(path):
        raise ConfigError(f"checkpoint path {path!r} is not a file or directory name")
    path = Path(path)
    if not path.exists():
        kind = "file" if path.suffix in PICKLE_SUFFIXES else "directory"
        raise CheckpointError(f"checkpoint {kind} {path} does not exist")
    if path.is_file():
        if path.name in (CONFIG_FILE, WEIGHTS_FILE) or path.suffix in (".json", ".safetensors"):
            raise CheckpointError(
                f"{path} is a single file of a checkpoint directory: pass the directory {path.parent} instead"
            )
        policy, info = load_diffusion_policy_ckpt(path, trust_pickle=trust_pickle)
        return LoadedCheckpoint(policy, "diffusion_policy", info)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        hint = ""
        ckpts = sorted(p.name for p in path.glob("*.ckpt"))
        if ckpts:
            hint = f"; for a Diffusion Policy checkpoint pass the .ckpt file itself, e.g. {path / ckpts[0]}"
        raise CheckpointError(f"checkpoint file {config_path} is missing{hint}")
    raw = _read_json(config_path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} is not a {FORMAT_NAME} config (a JSON object is expected)")
    if "format" not in raw and is_lerobot_config(raw):
        policy, info = load_lerobot_dir(path, raw)
        return LoadedCheckpoint(policy, "lerobot", info)
    return LoadedCheckpoint(_load_own(path, raw), FORMAT_NAME, {"extra": raw.get("extra", {})})


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _load_own(path: Path, raw: dict) -> DiffusionPolicy:
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if raw.get("format") != FORMAT_NAME or "policy" not in raw:
        raise CheckpointError(
            f"{config_path} is not a {FORMAT_NAME} config (format={raw.get('format')!r}); "
            f"supported checkpoints: {SUPPORTED_FORMATS}"
        )
    version = raw.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format version {version!r} is not one this toolkit reads (only {FORMAT_VERSION}); "
            "a newer toolkit wrote it, or the file was edited"
        )
    if not isinstance(raw["policy"], dict):
        raise CheckpointError(f"{config_path}: 'policy' is a {type(raw['policy']).__name__}, expected an object")
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint file {weights_path} is missing")
    try:
        config = PolicyConfig(**raw["policy"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path} has an invalid policy config: {err}") from None
    tensors = read_safetensors(weights_path)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    encoder_state = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
    try:
        obs_norm = LinearNormalizer.from_state_dict(tensors, "normalizer.obs")
        act_norm = LinearNormalizer.from_state_dict(tensors, "normalizer.action")
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: {err}") from None
    return assemble_policy(config, state, obs_norm, act_norm, str(weights_path), str(config_path), encoder_state)


def checkpoint_info(path: str | Path) -> dict:
    """The ``extra`` block of one of our checkpoints' config (training info, conversion source), or {}."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return {}
    raw = json.loads(config_path.read_text())
    return raw.get("extra", {}) if isinstance(raw, dict) and raw.get("format") == FORMAT_NAME else {}


__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "assemble_policy",
    "check_trust_pickle",
    "checkpoint_info",
    "load_policy",
    "read_checkpoint",
    "read_safetensors",
    "save_policy",
]
