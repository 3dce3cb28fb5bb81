"""Check policy_accel.model.vision against the sources themselves: torchvision's resnet18, robomimic 0.3.0 with DP's
own construction code (``get_robomimic_config`` -> ``algo_factory`` -> GroupNorm swap -> DP's CropRandomizer), DP's
``MultiImageObsEncoder`` + ``get_resnet``, and LeRobot 0.6.1's ``DiffusionRgbEncoder`` and its
``_prepare_global_conditioning``
(its classes are exec'd from ``modeling_diffusion.py``). Every weight random, norm affines and BN statistics too;
prints max |ours - source| per case (2026-12-06: 0.0 in all 14 cases; random BatchNorm statistics blow the DP image
features up to ~1e8, the GroupNorm cases stay at O(1)).

Why a script and not a test: it needs torchvision, DP's source and LeRobot's, none of which the project installs
(torchvision's default wheel pulls CUDA). Set-up, outside the project's environment (torchvision only as Python files,
its compiled ops are never called):

    pip download torchvision==0.28.0 einops==0.8.2 --no-deps -d /tmp/tvwheel
    mkdir -p /tmp/tv && cd /tmp/tv && for w in /tmp/tvwheel/*.whl; do unzip -qo $w; done
    : > /tmp/tv/torchvision/_meta_registrations.py   # registers CUDA/C++ op metas; not needed on this path
    git clone https://github.com/real-stanford/diffusion_policy /tmp/dp && git -C /tmp/dp checkout 5ba07ac
    mkdir -p /tmp/dpsrc && cp -r /tmp/dp/diffusion_policy /tmp/dpsrc/
    # LeRobot's source: a git dir holding tag v0.6.1 (LEROBOT_GIT, default the tool library's mirror)
    PYTHONPATH=/tmp/tv:/tmp/dpsrc:. .venv/bin/python scripts/vision_reference.py
"""

import os
import re
import subprocess
import types
from collections.abc import Callable

import einops
import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from policy_accel.model.vision import (
    EncoderConfig,
    ImageNormalizer,
    ObservationEncoder,
    ResNet18Trunk,
    load_source_state_dict,
)

torch.set_num_threads(1)
results = {}


def randomize(module, seed):
    """Random weights everywhere (norm affine and BN running stats too), so nothing is trivially 1/0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point and "pos_" not in name and "temperature" not in name:
                if "running_var" in name:
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name.endswith("weight") and t.dim() == 1:
                    t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * (0.1 if t.dim() > 1 else 0.05))


def record(name, a, b):
    d = (a - b).abs().max().item()
    results[name] = (d, a.abs().max().item(), tuple(a.shape))
    print(f"{name}: max|diff| = {d:.3e}  (max|ref| {a.abs().max().item():.3f}, shape {tuple(a.shape)})")


# ---------------------------------------------------------------- 1. trunk vs torchvision resnet18 children()[:-2]
for norm in ("batch", "group"):
    tv = torchvision.models.resnet18()
    if norm == "group":
        from diffusion_policy.common.pytorch_util import replace_submodules

        tv = replace_submodules(
            tv, lambda x: isinstance(x, nn.BatchNorm2d), lambda x: nn.GroupNorm(x.num_features // 16, x.num_features)
        )
    randomize(tv, 1)
    tv.eval()
    trunk = nn.Sequential(*list(tv.children())[:-2])
    ours = ResNet18Trunk(3, 64, norm).eval()
    ours.load_state_dict(trunk.state_dict(), strict=True)
    x = torch.randn(3, 3, 84, 84)
    with torch.no_grad():
        record(f"trunk[{norm}] vs torchvision resnet18[:-2]", trunk(x), ours(x))

# ---------------------------------------------------------------- 2. robomimic / DP hybrid: DP's construction code
import diffusion_policy.model.vision.crop_randomizer as dmvc  # noqa: E402
import robomimic.models.base_nets as rmbn  # noqa: E402
import robomimic.utils.obs_utils as ObsUtils  # noqa: E402
from diffusion_policy.common.pytorch_util import dict_apply, replace_submodules  # noqa: E402
from diffusion_policy.common.robomimic_config_util import get_robomimic_config  # noqa: E402
from robomimic.algo import algo_factory  # noqa: E402


def dp_hybrid_encoder(shape_meta, crop_shape, group_norm):
    """Lines 43-128 of DP's DiffusionUnetHybridImagePolicy.__init__ (obs encoder only), verbatim in substance."""
    obs_config = {"low_dim": [], "rgb": [], "depth": [], "scan": []}
    obs_key_shapes = {}
    for key, attr in shape_meta["obs"].items():
        obs_key_shapes[key] = list(attr["shape"])
        obs_config[attr.get("type", "low_dim")].append(key)
    config = get_robomimic_config(algo_name="bc_rnn", hdf5_type="image", task_name="square", dataset_type="ph")
    with config.unlocked():
        config.observation.modalities.obs = obs_config
        ch, cw = crop_shape
        for _key, modality in config.observation.encoder.items():
            if modality.obs_randomizer_class == "CropRandomizer":
                modality.obs_randomizer_kwargs.crop_height = ch
                modality.obs_randomizer_kwargs.crop_width = cw
    ObsUtils.initialize_obs_utils_with_config(config)
    policy = algo_factory(
        algo_name=config.algo_name, config=config, obs_key_shapes=obs_key_shapes, ac_dim=2, device="cpu"
    )
    obs_encoder = policy.nets["policy"].nets["encoder"].nets["obs"]
    if group_norm:
        replace_submodules(
            obs_encoder,
            lambda x: isinstance(x, nn.BatchNorm2d),
            lambda x: nn.GroupNorm(x.num_features // 16, x.num_features),
        )
    replace_submodules(
        obs_encoder,
        lambda x: isinstance(
            x,
            getattr(rmbn, "CropRandomizer", None)
            or __import__("robomimic.models.obs_core", fromlist=["x"]).CropRandomizer,
        ),
        lambda x: dmvc.CropRandomizer(
            input_shape=x.input_shape,
            crop_height=x.crop_height,
            crop_width=x.crop_width,
            num_crops=x.num_crops,
            pos_enc=x.pos_enc,
        ),
    )
    return obs_encoder


def dp_global_cond(encoder, nobs, To):
    B = next(iter(nobs.values())).shape[0]
    this_nobs = dict_apply(nobs, lambda x: x[:, :To, ...].reshape(-1, *x.shape[2:]))
    return encoder(this_nobs).reshape(B, -1)


cases = {
    "pusht": (
        {"image": {"shape": [3, 96, 96], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}},
        (84, 84),
    ),
    "lift": (
        {
            "agentview_image": {"shape": [3, 84, 84], "type": "rgb"},
            "robot0_eye_in_hand_image": {"shape": [3, 84, 84], "type": "rgb"},
            "robot0_eef_pos": {"shape": [3]},
            "robot0_eef_quat": {"shape": [4]},
            "robot0_gripper_qpos": {"shape": [2]},
        },
        (76, 76),
    ),
}
for task, (obs_meta, crop) in cases.items():
    for group_norm in (True, False):
        enc = dp_hybrid_encoder({"obs": obs_meta, "action": {"shape": [2]}}, crop, group_norm)
        randomize(enc, 2)
        enc.eval()
        keys = list(obs_meta)
        cams = [(k, tuple(v["shape"])) for k, v in obs_meta.items() if v.get("type") == "rgb"]
        lows = [(k, v["shape"][0]) for k, v in obs_meta.items() if v.get("type", "low_dim") == "low_dim"]
        cfg = EncoderConfig(
            kind="robomimic",
            cameras=cams,
            low_dim=lows,
            feature_order=keys,
            crop_shape=crop,
            norm="group" if group_norm else "batch",
        )
        sd = {"obs_encoder." + k: v for k, v in enc.state_dict().items()}
        ours = load_source_state_dict(ObservationEncoder(cfg), sd).eval()
        B, To = 3, 2
        raw = {k: torch.rand(B, To, *s) for k, s in cams}
        nobs = {k: v * 2 - 1 for k, v in raw.items()}  # DP's image range normaliser
        for k, d in lows:
            nobs[k] = torch.randn(B, To, d)
        with torch.no_grad():
            ref = dp_global_cond(enc, nobs, To)
            got = ours({k: nobs[k] for k, _ in cams}, torch.cat([nobs[k] for k, _ in lows], -1))
            assert torch.equal(ImageNormalizer(cfg)(raw)[cams[0][0]], nobs[cams[0][0]])
        record(f"robomimic/{task}/{'GN' if group_norm else 'BN'} global cond {tuple(ref.shape)}", ref, got)

# ---------------------------------------------------------------- 3. DP image: MultiImageObsEncoder from DP's file
from diffusion_policy.model.vision.model_getter import get_resnet  # noqa: E402
from diffusion_policy.model.vision.multi_image_obs_encoder import MultiImageObsEncoder  # noqa: E402

shape_meta = {
    "obs": {
        "camera_1": {"shape": [3, 72, 88], "type": "rgb"},
        "camera_0": {"shape": [3, 72, 88], "type": "rgb"},
        "robot_eef_pose": {"shape": [6], "type": "low_dim"},
        "gripper": {"shape": [1], "type": "low_dim"},
    },
    "action": {"shape": [2]},
}
for shared, group_norm, random_crop in (
    (False, True, True),
    (True, True, True),
    (False, False, False),
    (True, False, True),
):
    enc = MultiImageObsEncoder(
        shape_meta=shape_meta,
        rgb_model=get_resnet("resnet18"),
        crop_shape=(61, 77),
        random_crop=random_crop,
        use_group_norm=group_norm,
        share_rgb_model=shared,
        imagenet_norm=True,
    )
    randomize(enc, 3)
    enc.eval()
    actual_norm = "group" if (group_norm and not shared) else "batch"  # DP never swaps the shared model's BN
    cfg = EncoderConfig(
        kind="dp_image",
        cameras=[("camera_1", (3, 72, 88)), ("camera_0", (3, 72, 88))],
        low_dim=[("robot_eef_pose", 6), ("gripper", 1)],
        crop_shape=(61, 77),
        random_crop=random_crop,
        norm=actual_norm,
        shared=shared,
        imagenet_norm=True,
        feature_dim=512,
    )
    sd = {"obs_encoder." + k: v for k, v in enc.state_dict().items()}
    ours = load_source_state_dict(ObservationEncoder(cfg), sd).eval()
    B, To = 2, 2
    nobs = {k: torch.rand(B, To, 3, 72, 88) * 2 - 1 for k in ("camera_0", "camera_1")}
    nobs["robot_eef_pose"] = torch.randn(B, To, 6)
    nobs["gripper"] = torch.randn(B, To, 1)
    with torch.no_grad():
        ref = dp_global_cond(enc, nobs, To)
        got = ours(
            {k: nobs[k] for k in ("camera_1", "camera_0")}, torch.cat([nobs["robot_eef_pose"], nobs["gripper"]], -1)
        )
    record(
        f"dp_image/shared={shared}/use_group_norm={group_norm}/random_crop={random_crop} {tuple(ref.shape)}", ref, got
    )

# ---------------------------------------------------------------- 4. LeRobot 0.6.1: classes exec'd from its source
src = subprocess.run(
    [
        "git",
        "--git-dir=" + os.environ.get("LEROBOT_GIT", "/work/.mirror/huggingface+lerobot/repo"),
        "show",
        "v0.6.1:src/lerobot/policies/diffusion/modeling_diffusion.py",
    ],
    capture_output=True,
    text=True,
    check=True,
).stdout
start = src.index("class SpatialSoftmax(nn.Module):")
end = src.index("class DiffusionSinusoidalPosEmb(nn.Module):")
prep = src[src.index("    def _prepare_global_conditioning") : src.index("    def generate_actions")]


def get_output_shape(module, input_shape):
    with torch.inference_mode():
        return tuple(module(torch.zeros(size=input_shape)).shape)


ns = {
    "torch": torch,
    "nn": nn,
    "F": F,
    "np": np,
    "torchvision": torchvision,
    "Tensor": Tensor,
    "Callable": Callable,
    "get_output_shape": get_output_shape,
    "einops": einops,
    "DiffusionConfig": object,
    "OBS_STATE": "observation.state",
    "OBS_IMAGES": "observation.images",
    "OBS_ENV_STATE": "observation.environment_state",
}
exec(src[start:end], ns)  # noqa: S102
exec("class _M(torch.nn.Module):\n" + re.sub(r"^", "", prep), ns)  # noqa: S102
for separate in (True, False):
    for gn in (True, False):
        lcfg = types.SimpleNamespace(
            resize_shape=None,
            crop_shape=(84, 84),
            crop_is_random=True,
            vision_backbone="resnet18",
            pretrained_backbone_weights=None,
            use_group_norm=gn,
            spatial_softmax_num_keypoints=32,
            image_features={
                "observation.images.top": types.SimpleNamespace(shape=(3, 96, 96)),
                "observation.images.wrist": types.SimpleNamespace(shape=(3, 96, 96)),
            },
            use_separate_rgb_encoder_per_camera=separate,
            env_state_feature=True,
        )
        m = ns["_M"]()
        m.config = lcfg
        m.rgb_encoder = (
            nn.ModuleList([ns["DiffusionRgbEncoder"](lcfg) for _ in range(2)])
            if separate
            else ns["DiffusionRgbEncoder"](lcfg)
        )
        randomize(m, 4)
        m.eval()
        cfg = EncoderConfig(
            kind="lerobot",
            cameras=[("observation.images.top", (3, 96, 96)), ("observation.images.wrist", (3, 96, 96))],
            low_dim=[("observation.state", 2), ("observation.environment_state", 5)],
            crop_shape=(84, 84),
            norm="group" if gn else "batch",
            shared=not separate,
        )
        sd = {"diffusion." + k: v for k, v in m.state_dict().items()}
        ours = load_source_state_dict(ObservationEncoder(cfg), sd).eval()
        B, To = 3, 2
        imgs = torch.randn(B, To, 2, 3, 96, 96)
        batch = {
            "observation.state": torch.randn(B, To, 2),
            "observation.images": imgs,
            "observation.environment_state": torch.randn(B, To, 5),
        }
        with torch.no_grad():
            ref = m._prepare_global_conditioning(batch)
            got = ours(
                {"observation.images.top": imgs[:, :, 0], "observation.images.wrist": imgs[:, :, 1]},
                torch.cat([batch["observation.state"], batch["observation.environment_state"]], -1),
            )
        record(f"lerobot/separate={separate}/GN={gn} global cond {tuple(ref.shape)}", ref, got)

print("\nWORST:", max(v[0] for v in results.values()))
