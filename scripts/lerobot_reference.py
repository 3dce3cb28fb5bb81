"""Write a checkpoint with LeRobot's own code, and its outputs on fixed inputs, for tests/test_lerobot_reference.py.

Runs in a separate Python 3.12 environment with LeRobot 0.6.1 (never the project's: LeRobot 0.6 needs Python >= 3.12
and torch < 2.12, see /work/shared/reference/install-and-cpu-timings.md):

    PYENV_VERSION=3.12.1 pyenv exec python -m venv /tmp/lerobot312
    /tmp/lerobot312/bin/pip install "torch<2.12" lerobot==0.6.1 diffusers
    /tmp/lerobot312/bin/python scripts/lerobot_reference.py OUT_DIR

Why: our LeRobot reader was tested only on files we built ourselves (tests/format_builders.py). This builds two
LeRobot ``DiffusionPolicy``s and their processor pipelines (``make_diffusion_pre_post_processors``), saves them with
their own ``save_pretrained`` (the current 0.6 format), and records, on fixed inputs, what LeRobot's pipelines and
networks return:

- ``OUT_DIR/policy`` + ``OUT_DIR/reference.safetensors``: state + environment-state features; the normalized
  observations, the U-Net's epsilon for a given sample / timestep / conditioning, and the unnormalized actions.
- ``OUT_DIR/image_policy`` + ``OUT_DIR/image_reference.safetensors``: state + one camera (``DiffusionRgbEncoder``:
  torchvision's full-width ResNet-18, GroupNorm, 36x36 center crop of 40x40 images, ImageNet mean/std in the
  processor); the normalized images, the encoder's global condition (``_prepare_global_conditioning``), epsilon, and
  ``predict_action_chunk``'s executed actions (what ``select_action`` queues) for a given initial noise under DDIM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors
from safetensors.torch import save_file

STATE, ENV, ACTION = "observation.state", "observation.environment_state", "action"
IMAGE, OBS_IMAGES = "observation.images.top", "observation.images"  # a camera, and LeRobot's stacked-cameras key
STATE_DIM, ENV_DIM, ACTION_DIM, BATCH = 2, 16, 2, 3
IMAGE_SHAPE = (3, 40, 40)


def stats(dim: int, lo: float, hi: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    low = lo + torch.rand(dim, generator=gen) * 10
    high = hi - torch.rand(dim, generator=gen) * 10
    return {"min": low, "max": high, "mean": (low + high) / 2, "std": (high - low) / 4}


def main(out: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config = DiffusionConfig(
        input_features={
            STATE: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
            ENV: PolicyFeature(type=FeatureType.ENV, shape=(ENV_DIM,)),
        },
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        # LeRobot leaves ENV unnormalized by default; mapped here so that both normalizers are compared
        normalization_mapping={
            "VISUAL": NormalizationMode.MEAN_STD,
            "STATE": NormalizationMode.MIN_MAX,
            "ENV": NormalizationMode.MIN_MAX,
            "ACTION": NormalizationMode.MIN_MAX,
        },
        n_obs_steps=2,
        horizon=16,
        n_action_steps=8,
        down_dims=(16, 32),
        kernel_size=3,
        n_groups=4,
        diffusion_step_embed_dim=16,
        num_train_timesteps=100,
        noise_scheduler_type="DDIM",
        num_inference_steps=10,
        device="cpu",
        push_to_hub=False,
    )
    dataset_stats = {STATE: stats(STATE_DIM, 0, 512, gen), ENV: stats(ENV_DIM, -50, 600, gen)}
    dataset_stats[ACTION] = stats(ACTION_DIM, 10, 500, gen)
    policy = DiffusionPolicy(config)
    with torch.no_grad():  # LeRobot's init leaves some layers at zero; random weights make the comparison strict
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.eval()
    pre, post = make_diffusion_pre_post_processors(config, dataset_stats=dataset_stats)
    target = out / "policy"
    policy.save_pretrained(target)
    pre.save_pretrained(target)
    post.save_pretrained(target)

    raw_state = torch.rand(BATCH, 2, STATE_DIM, generator=gen) * 512
    raw_env = torch.rand(BATCH, 2, ENV_DIM, generator=gen) * 650 - 50
    normalized = pre({STATE: raw_state, ENV: raw_env})
    norm_state, norm_env = normalized[STATE].float().clone(), normalized[ENV].float().clone()
    # LeRobot's conditioning: per step [state, environment_state], steps flattened (DiffusionModel's own order)
    cond = torch.cat([norm_state, norm_env], dim=-1).flatten(1)
    sample = torch.randn(BATCH, config.horizon, ACTION_DIM, generator=gen)
    timestep = torch.tensor([99, 50, 3])
    with torch.no_grad():
        eps = policy.diffusion.unet(sample, timestep, global_cond=cond)
        global_cond = policy.diffusion._prepare_global_conditioning({STATE: norm_state, ENV: norm_env})
    assert torch.equal(global_cond, cond), "LeRobot's conditioning order changed"
    norm_action = torch.rand(BATCH, config.horizon, ACTION_DIM, generator=gen) * 2 - 1
    raw_action = post(norm_action)
    save_file(
        {
            "raw_state": raw_state,
            "raw_env": raw_env,
            "norm_state": norm_state,
            "norm_env": norm_env,
            "sample": sample,
            "timestep": timestep,
            "eps": eps.contiguous(),
            "norm_action": norm_action,
            "raw_action": raw_action.float().contiguous(),
        },
        str(out / "reference.safetensors"),
    )
    print(f"LeRobot checkpoint in {target}, reference outputs in {out / 'reference.safetensors'}")
    image_reference(out, gen)


def image_reference(out: Path, gen: torch.Generator) -> None:
    """A policy with a camera (random init, no pretrained download), its files, and its outputs on fixed images."""
    config = DiffusionConfig(
        input_features={
            STATE: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
            IMAGE: PolicyFeature(type=FeatureType.VISUAL, shape=IMAGE_SHAPE),
        },
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        n_obs_steps=2,
        horizon=16,
        n_action_steps=8,
        crop_shape=(36, 36),
        pretrained_backbone_weights=None,
        use_group_norm=True,
        use_separate_rgb_encoder_per_camera=True,
        down_dims=(16, 32),
        kernel_size=3,
        n_groups=4,
        diffusion_step_embed_dim=16,
        num_train_timesteps=100,
        noise_scheduler_type="DDIM",
        num_inference_steps=10,
        device="cpu",
        push_to_hub=False,
    )
    dataset_stats = {STATE: stats(STATE_DIM, 0, 512, gen), ACTION: stats(ACTION_DIM, 10, 500, gen)}
    dataset_stats[IMAGE] = {  # LeRobot's ImageNet statistics (use_imagenet_stats), shaped (C, 1, 1)
        "mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
        "std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1),
        "min": torch.zeros(3, 1, 1),
        "max": torch.ones(3, 1, 1),
    }
    policy = DiffusionPolicy(config)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.eval()
    pre, post = make_diffusion_pre_post_processors(config, dataset_stats=dataset_stats)
    target = out / "image_policy"
    policy.save_pretrained(target)
    pre.save_pretrained(target)
    post.save_pretrained(target)

    raw_state = torch.rand(BATCH, 2, STATE_DIM, generator=gen) * 512
    raw_image = torch.rand(BATCH, 2, *IMAGE_SHAPE, generator=gen)  # float [0, 1], as LeRobot's env processor gives
    normalized = pre({STATE: raw_state, IMAGE: raw_image})
    norm_state, norm_image = normalized[STATE].float().clone(), normalized[IMAGE].float().clone()
    sample = torch.randn(BATCH, config.horizon, ACTION_DIM, generator=gen)
    noise = torch.randn(BATCH, config.horizon, ACTION_DIM, generator=gen)
    timestep = torch.tensor([99, 50, 3])
    with torch.no_grad():
        batch = {STATE: norm_state, OBS_IMAGES: torch.stack([norm_image], dim=-4)}  # as select_action stacks it
        global_cond = policy.diffusion._prepare_global_conditioning(batch)
        eps = policy.diffusion.unet(sample, timestep, global_cond=global_cond)
        policy.reset()  # empty queues: predict_action_chunk takes the batch as it is
        norm_action = policy.predict_action_chunk({STATE: norm_state, IMAGE: norm_image}, noise=noise.clone())
    raw_action = post(norm_action)
    save_file(
        {
            "raw_state": raw_state,
            "raw_image": raw_image,
            "norm_state": norm_state,
            "norm_image": norm_image,
            "global_cond": global_cond.contiguous(),
            "sample": sample,
            "timestep": timestep,
            "eps": eps.contiguous(),
            "noise": noise,
            "norm_action": norm_action.float().contiguous(),
            "raw_action": raw_action.float().contiguous(),
        },
        str(out / "image_reference.safetensors"),
    )
    print(f"LeRobot image checkpoint in {target}, reference outputs in {out / 'image_reference.safetensors'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
