"""Train a Diffusion Policy with Diffusion Policy's recipe (epsilon MSE, AdamW, cosine schedule with warm-up,
EMA weights), sized for a CPU: low-dim, or an image policy whose observation encoder trains with the network.

    python -m policy_accel.train task=pusht out_dir=runs/train_pusht steps=30000
    python -m policy_accel.train task=pusht_image   # DP's hybrid image recipe (configs/encoder/pusht_image.yaml)

An image task (one with ``cameras``) takes its encoder architecture and recipe from ``configs/encoder/<task>.yaml``
(DP's ``DiffusionUnetHybridImagePolicy``: the encoder trained from scratch together with the U-Net, random crop
in training and center crop at evaluation, images range-normalised to [-1, 1], EMA of both).

Resumable: ``out_dir/train_state.pt`` holds model, EMA, optimizer and step (and the encoder and its EMA);
rerunning with the same ``out_dir`` continues. Every ``save_every`` steps the EMA policy is exported to
``out_dir/policy`` in our checkpoint format.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from policy_accel.data import ImageSequenceDataset, build_dataset
from policy_accel.errors import ConfigError, report_user_errors
from policy_accel.experiment.build import cfg_float, cfg_int
from policy_accel.io.checkpoint import save_policy
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.transformer import TransformerConfig, TransformerForDiffusion
from policy_accel.model.unet import UNetConfig
from policy_accel.model.vision import EncoderConfig, ImageNormalizer, ObservationEncoder
from policy_accel.policy import DiffusionPolicy, PolicyConfig, build_denoiser
from policy_accel.schedule import ScheduleConfig

log = logging.getLogger(__name__)


def ema_decay(step: int, power: float, max_value: float) -> float:
    """Diffusion Policy's EMAModel decay (inv_gamma 1, update_after_step 0)."""
    step = max(0, step - 1)
    if step <= 0:
        return 0.0
    return min(max_value, 1 - (1 + step) ** -power)


def encoder_config(task: DictConfig, encoder: DictConfig | None) -> EncoderConfig | None:
    """An image task's observation encoder: the recipe's architecture (``encoder``, configs/encoder/<task>.yaml) for
    the task's cameras and low-dim keys; None for a low-dim task. A mismatch of the two is one line."""
    if "cameras" not in task:
        if encoder is not None:
            raise ConfigError(f"task {task.name!r} has no cameras: an encoder section is for image tasks only")
        return None
    if encoder is None:
        raise ConfigError(
            f"task {task.name!r} observes cameras: training needs an encoder section (configs/encoder/{task.name}.yaml)"
        )
    arch = OmegaConf.to_container(encoder)
    if arch.get("kind") == "lerobot":  # before the dataset loads, not at the first training step
        raise ConfigError(
            "encoder.kind=lerobot: LeRobot's encoder is reproduced for evaluation only (its training crop, one "
            "RandomCrop offset per batch, is not); train with kind=robomimic or kind=dp_image"
        )
    return EncoderConfig(
        cameras=OmegaConf.to_container(task.cameras), low_dim=OmegaConf.to_container(task.low_dim), **arch
    )


def policy_config(
    task: DictConfig, denoiser: DictConfig, inpainting: bool, encoder: EncoderConfig | None = None
) -> PolicyConfig:
    """The policy a task's data trains: ``denoiser`` (configs/denoiser/) names the network and its architecture; an
    image policy's network is conditioned on ``encoder``'s features (its low-dim keys are ``obs_dim``)."""
    arch = {k: v for k, v in OmegaConf.to_container(denoiser).items() if k != "name"}
    obs_dim = task.obs_dim if encoder is None else encoder.low_dim_total
    step_cond_dim = obs_dim if encoder is None else encoder.step_feature_dim()
    if inpainting and encoder is not None:
        raise ConfigError("inpainting=true is for low-dim policies (DP's image policies condition on the encoder)")
    chunk_dim = task.action_dim + (obs_dim if inpainting else 0)
    if denoiser.name == "unet":
        global_cond_dim = 0 if inpainting else step_cond_dim * task.n_obs_steps
        nets = {"unet": UNetConfig(input_dim=chunk_dim, global_cond_dim=global_cond_dim, **arch)}
    else:
        transformer = TransformerConfig(
            input_dim=chunk_dim,
            output_dim=chunk_dim,
            horizon=task.horizon,
            n_obs_steps=task.n_obs_steps,
            cond_dim=0 if inpainting else step_cond_dim,
            obs_as_cond=not inpainting,
            **arch,
        )
        nets = {"unet": None, "transformer": transformer}
    return PolicyConfig(
        task=task.name,
        obs_dim=obs_dim,
        action_dim=task.action_dim,
        horizon=task.horizon,
        n_obs_steps=task.n_obs_steps,
        n_action_steps=task.n_action_steps,
        schedule=ScheduleConfig(),
        denoiser=denoiser.name,
        inpainting=inpainting,
        encoder=encoder,
        **nets,
    )


def optim_groups(model: torch.nn.Module, weight_decay: float, encoder: nn.Module | None = None) -> list[dict]:
    """Diffusion Policy's AdamW groups: DP-T's own split (``get_optim_groups``: linear and attention weights decay,
    biases, norms and positional embeddings do not); the U-Net decays every parameter, and so does the observation
    encoder, optimised together with the network (DP's hybrid image policy: one AdamW over all parameters)."""
    if isinstance(model, TransformerForDiffusion):
        groups = model.get_optim_groups(weight_decay)
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    if encoder is not None:
        groups.append({"params": list(encoder.parameters()), "weight_decay": weight_decay})
    return groups


def trained_modules(config: PolicyConfig) -> nn.ModuleDict:
    """What training optimises and averages: the denoiser (``model``) and an image policy's ``encoder``, untrained
    (built in this order, so a low-dim run draws the same initial weights as before encoders existed)."""
    modules = nn.ModuleDict({"model": build_denoiser(config)})
    if config.encoder is not None:
        modules["encoder"] = ObservationEncoder(config.encoder)
    return modules


def train(cfg: DictConfig) -> Path:
    for key in ("steps", "batch_size", "save_every", "log_every", "threads"):
        cfg_int(cfg, key, minimum=1)  # one line naming the key, the value and what is allowed
    cfg_int(cfg, "max_episodes", minimum=1, optional=True)
    cfg_float(cfg, "lr", minimum=0, strict=True)
    cfg_float(cfg, "time_limit_min", minimum=0, strict=True, optional=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = cfg.task

    encoder_cfg = encoder_config(task, cfg.get("encoder"))
    policy_cfg = policy_config(task, cfg.denoiser, cfg.inpainting, encoder_cfg)
    dataset, obs, action = build_dataset(task, cfg.max_episodes)
    obs_norm, act_norm = LinearNormalizer.fit(torch.as_tensor(obs)), LinearNormalizer.fit(torch.as_tensor(action))
    # DP's image normaliser ([0, 1] -> [-1, 1]) before the encoder, as the exported policy applies it
    image_norm = None if encoder_cfg is None else ImageNormalizer(encoder_cfg)
    nets = trained_modules(policy_cfg)
    model, encoder = nets["model"], nets["encoder"] if encoder_cfg is not None else None
    ema = trained_modules(policy_cfg)
    ema.load_state_dict(nets.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        optim_groups(model, cfg.weight_decay, encoder),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * step / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    state_path = out_dir / "train_state.pt"
    step = 0
    history: list[dict] = []
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if ("encoder" in state) != (encoder is not None):
            written = "an image" if "encoder" in state else "a low-dim"
            raise ConfigError(f"{state_path} was written by {written} policy's training: pass another out_dir")
        model.load_state_dict(state["model"])
        ema["model"].load_state_dict(state["ema"])
        if encoder is not None:
            encoder.load_state_dict(state["encoder"])
            ema["encoder"].load_state_dict(state["ema_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        rng = np.random.default_rng(cfg.seed + step)
        history = json.loads((out_dir / "history.json").read_text()) if (out_dir / "history.json").exists() else []
        log.info("resumed from %s at step %d", state_path, step)

    schedule = ScheduleConfig().make_scheduler()
    alphas_cumprod = schedule.alphas_cumprod.float()
    n_params = sum(p.numel() for p in nets.parameters())
    n_encoder = 0 if encoder is None else sum(p.numel() for p in encoder.parameters())
    log.info(
        "training %s: %d windows, %.2fM parameters (encoder %.2fM), %d steps",
        task.name,
        len(dataset),
        n_params / 1e6,
        n_encoder / 1e6,
        cfg.steps,
    )

    def save() -> None:
        state = {"model": model.state_dict(), "ema": ema["model"].state_dict(), "optimizer": optimizer.state_dict()}
        if encoder is not None:
            state.update(encoder=encoder.state_dict(), ema_encoder=ema["encoder"].state_dict())
        torch.save({**state, "step": step}, state_path)
        extra = {
            "training": {
                "steps": step,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
                "weight_decay": cfg.weight_decay,
                "betas": list(cfg.betas),
                "ema_power": cfg.ema_power,
                "ema_max": cfg.ema_max,
                "dataset": str(task.dataset),
                "episodes": int(len(np.unique(dataset.indices[:, 0]))),
                "windows": len(dataset),
                "parameters": n_params,
                "encoder_parameters": n_encoder,
                "seed": cfg.seed,
            }
        }
        if encoder is not None:
            extra["training"]["image_augmentation"] = "random crop per image in training, center crop at evaluation"
        ema_encoder = ema["encoder"] if encoder is not None else None
        exported = DiffusionPolicy(policy_cfg, ema["model"], obs_norm, act_norm, encoder=ema_encoder)
        save_policy(exported, out_dir / "policy", extra=extra)
        (out_dir / "history.json").write_text(json.dumps(history))

    t_start = time.time()
    nets.train()  # the encoder random-crops in training mode
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    running = []
    while step < cfg.steps:
        rows = rng.integers(0, len(dataset), size=cfg.batch_size)
        obs_b, act_b = dataset.batch(rows, obs_steps=task.horizon if cfg.inpainting else None)
        obs_b = obs_norm.normalize(obs_b)
        if isinstance(dataset, ImageSequenceDataset):  # the encoder's features of the images and low-dim keys
            cond = encoder(image_norm(dataset.batch_images(rows)), obs_b[:, : task.n_obs_steps])
        else:
            cond = obs_b[:, : task.n_obs_steps].reshape(cfg.batch_size, -1)
        x0 = act_norm.normalize(act_b)
        if cfg.inpainting:  # the chunk is [action | observation]; the model writes the observed entries itself
            x0 = torch.cat([x0, obs_b], dim=-1)
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch_size,))
        a = alphas_cumprod[t].view(-1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        error = (model(noisy, t, cond) - noise).square()
        if cfg.inpainting:  # DP's loss mask: the observed entries are given, not predicted
            error[:, : task.n_obs_steps, task.action_dim :] = 0
        loss = error.mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        decay = ema_decay(step, cfg.ema_power, cfg.ema_max)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), nets.parameters(), strict=True):  # the encoder's too
                p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)
            for b_ema, b in zip(ema.buffers(), nets.buffers(), strict=True):
                b_ema.copy_(b)
        running.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0:
            mean = float(np.mean(running))
            history.append({"step": step, "loss": mean, "lr": lr_at(step)})
            bar.set_postfix(loss=f"{mean:.4f}")
            running = []
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
        if cfg.time_limit_min is not None and time.time() - t_start > 60 * cfg.time_limit_min:
            log.info("time limit reached at step %d; saving (resume with the same out_dir)", step)
            save()
            break
    bar.close()
    if step == cfg.steps:
        save()
    return out_dir / "policy"


@hydra.main(version_base=None, config_path="../configs", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> None:
    path = train(cfg)
    print(f"policy saved to {path}")


if __name__ == "__main__":
    main()
