"""Convert a trained Diffusion Policy to our checkpoint format (config.json + model.safetensors).

    python eval/convert.py runs/epoch=0550.ckpt checkpoints/my_dp --trust-pickle   # Diffusion Policy workspace
    python eval/convert.py path/to/lerobot/pretrained_model checkpoints/my_lerobot    # LeRobot diffusion policy
    python eval/convert.py checkpoints/pusht /tmp/pusht16 --fp16                      # ours, re-saved in float16

Why convert: the result loads without unpickling anything and without the source project's file layout, and
it records where it came from in ``config.json``'s ``extra.converted_from``. The written checkpoint is read back
and its denoiser and normalizers are checked against the loaded source before the command reports success.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from policy_accel.errors import EXIT_USER_ERROR, ConfigError, UserError
from policy_accel.io.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_policy,
    read_checkpoint,
    save_policy,
)
from policy_accel.policy import DiffusionPolicy


def convert(
    src: str | Path, dst: str | Path, trust_pickle: bool = False, fp16: bool = False, force: bool = False
) -> dict:
    """Write ``src`` (any supported format) to ``dst`` in ours; returns a summary. Raises :class:`CheckpointError`."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError("source and destination are the same path")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise CheckpointError(f"destination {dst} is not empty; pass --force to overwrite its checkpoint files")
    created = not dst.exists()
    try:  # before reading the source: an unwritable destination fails at once, naming it
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"destination {dst} cannot be written: {err.strerror or err}") from None
    try:
        loaded = read_checkpoint(src, trust_pickle=trust_pickle)
    except BaseException:
        if created:  # a refused or unreadable source leaves nothing behind
            dst.rmdir()
        raise
    extra = {"converted_from": {**loaded.info, "format": loaded.format, "source": str(src)}}
    if loaded.format == "policy_accel" and loaded.info.get("extra"):
        extra = {**loaded.info["extra"], **extra}
        extra["converted_from"].pop("extra", None)
    dtype = torch.float16 if fp16 else torch.float32
    if force and dst.is_dir():
        for name in (CONFIG_FILE, "model.safetensors"):
            (dst / name).unlink(missing_ok=True)
    save_policy(loaded.policy, dst, extra=extra, weights_dtype=dtype)
    _verify(loaded.policy, load_policy(dst, engine="torch"), exact=not fp16, dst=dst)
    config = loaded.policy.config
    sched = config.schedule
    return {
        "source_format": loaded.format,
        "destination": str(dst),
        "task": config.task,
        "obs_dim": config.obs_dim,
        "action_dim": config.action_dim,
        "horizon": config.horizon,
        "n_obs_steps": config.n_obs_steps,
        "n_action_steps": config.n_action_steps,
        "schedule": f"{sched.kind}, {sched.num_inference_steps} of {sched.num_train_timesteps} steps",
        "parameters": sum(p.numel() for p in loaded.policy.model.parameters()),
        **({"encoder": f"{config.encoder.kind}, cameras {dict(config.encoder.cameras)}"} if config.encoder else {}),
        **{k: v for k, v in loaded.info.items() if k in ("weights", "global_step", "epoch", "observation_layout")},
    }


def _verify(source: DiffusionPolicy, written: DiffusionPolicy, exact: bool, dst: Path) -> None:
    """The written file must give back the same denoiser, encoder and normalizers (bit for bit unless stored in
    fp16)."""
    if written.config != source.config:
        raise CheckpointError(f"{dst}: the config read back differs from the source's")
    modules = [("model", source.model, written.model)]
    if source.encoder is not None:
        modules.append(("encoder", source.encoder, written.encoder))
    for prefix, mine, read in modules:
        theirs = read.state_dict()
        for key, value in mine.state_dict().items():
            if exact or not value.is_floating_point():
                same = torch.equal(value, theirs[key])
            else:
                same = torch.allclose(value, theirs[key], rtol=1e-3, atol=1e-4)
            if not same:
                raise CheckpointError(f"{dst}: tensor {prefix}.{key} read back differs from the source's")
    for a, b in (
        (source.obs_normalizer, written.obs_normalizer),
        (source.action_normalizer, written.action_normalizer),
    ):
        if not (torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)):
            raise CheckpointError(f"{dst}: a normalizer read back differs from the source's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a Diffusion Policy checkpoint (ours, Diffusion Policy .ckpt, LeRobot directory) "
        "to a policy_accel checkpoint directory."
    )
    parser.add_argument("src", help="a .ckpt file, or a checkpoint directory (ours or LeRobot's)")
    parser.add_argument("dst", help="output directory (config.json + model.safetensors)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a Diffusion Policy .ckpt; unpickling can run code from the file, so only for "
        "files from a source you trust",
    )
    parser.add_argument(
        "--fp16", action="store_true", help="store the denoiser's and encoder's parameters in float16 (half the size)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite the checkpoint files in a non-empty dst")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.dst, trust_pickle=args.trust_pickle, fp16=args.fp16, force=args.force)
    except UserError as err:  # a bad or refused checkpoint: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"converted {args.src} ({summary.pop('source_format')}) -> {summary.pop('destination')}")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
