"""Image observation encoders (policy_accel.model.vision) against their three sources, on tiny networks.

What is compared with what:
- robomimic (DP's hybrid image policy): robomimic 0.3.0's own ``ObservationEncoder`` / ``VisualCore`` /
  ``SpatialSoftmax`` classes, imported with a stub ``torchvision`` (torchvision is not installed here). robomimic's
  ResNet18Conv asks ``torchvision.models.resnet18`` for its trunk, so the stub hands it torchvision-layout modules built
  from *our* trunk: the trunk itself is not independently checked here (it was checked against torchvision 0.28's
  resnet18, bit-identical, outside the suite); robomimic's composition, spatial softmax, ReLU, key order and state-dict
  names are. DP's GroupNorm swap (``replace_submodules``) and its eval crop (``ttf.center_crop``) are restated below.
- DP image (``MultiImageObsEncoder``) and LeRobot (``DiffusionRgbEncoder``, ``_prepare_global_conditioning``): their
  forward passes restated from the sources, with state dicts under the sources' key names and layouts.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from policy_accel.errors import ConfigError, ObservationError
from policy_accel.model.vision import (
    EncoderConfig,
    ImageNormalizer,
    LeRobotSpatialSoftmax,
    ObservationEncoder,
    ResNet18Trunk,
    RobomimicSpatialSoftmax,
    StateDictKeyError,
    center_crop,
    convert_state_dict,
    load_source_state_dict,
)

TOL = 1e-6


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights, norm affines and BN running stats (so nothing is trivially 0 or 1), modest magnitudes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.dtype.is_floating_point or "pos_" in name or "temperature" in name:
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.dim() > 1:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
            else:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
    return module


def tv_center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision.transforms.functional.center_crop (crop <= image), as DP's CropRandomizer and LeRobot call it."""
    top = int(round((x.shape[-2] - h) / 2.0))
    left = int(round((x.shape[-1] - w) / 2.0))
    return x[..., top : top + h, left : left + w]


def dp_replace_submodules(root: nn.Module, predicate, func) -> nn.Module:
    """DP's common/pytorch_util.py::replace_submodules (same as LeRobot's _replace_submodules)."""
    for *parent, k in [n.split(".") for n, m in root.named_modules(remove_duplicate=True) if predicate(m)]:
        parent_module = root.get_submodule(".".join(parent)) if parent else root
        if isinstance(parent_module, nn.Sequential):
            parent_module[int(k)] = func(parent_module[int(k)])
        else:
            setattr(parent_module, k, func(getattr(parent_module, k)))
    assert not any(predicate(m) for _, m in root.named_modules())
    return root


def to_group_norm(module: nn.Module) -> nn.Module:
    return dp_replace_submodules(
        module, lambda m: isinstance(m, nn.BatchNorm2d), lambda m: nn.GroupNorm(m.num_features // 16, m.num_features)
    )


class TorchvisionResNet(nn.Module):
    """torchvision ResNet's attribute layout and ``_forward_impl`` (layers taken from a BatchNorm trunk)."""

    def __init__(self, width: int, fc: nn.Module | None = None) -> None:
        super().__init__()
        trunk = list(ResNet18Trunk(3, width, "batch").children())
        self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3, self.layer4 = trunk
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = fc if fc is not None else nn.Linear(8 * width, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def images_and_low(cfg: EncoderConfig, b: int, to: int, seed: int = 0) -> tuple[dict, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    images = {name: torch.rand((b, to, *shape), generator=g) * 2 - 1 for name, shape in cfg.cameras}
    low = torch.randn(b, to, cfg.low_dim_total, generator=g) if cfg.low_dim else None
    return images, low


# ---------------------------------------------------------------------------------------------------------------
# robomimic's own classes, imported with a stub torchvision
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def robomimic_models(monkeypatch):
    """robomimic.models.{base_nets, obs_core, obs_nets} imported against a stub torchvision, in a fresh copy of the
    whole robomimic package: its registries (robomimic.utils.obs_utils) must not keep stub-era classes, or later
    tests in the same process (the robomimic environments) would run on them. Every robomimic and torchvision module
    is put back as it was afterwards."""
    isolated = ("robomimic", "torchvision")
    saved = {name: module for name, module in sys.modules.items() if name.startswith(isolated)}
    for name in saved:
        del sys.modules[name]

    def stub(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    tv, transforms, functional, models = (
        stub("torchvision"),
        stub("torchvision.transforms"),
        stub("torchvision.transforms.functional"),
        stub("torchvision.models"),
    )
    tv.transforms, tv.models, transforms.functional = transforms, models, functional
    transforms.Lambda = transforms.Compose = object
    models.resnet18 = lambda pretrained=False, **_: TorchvisionResNet(64)  # robomimic's ResNet18Conv insists on 512
    try:
        import robomimic.models.base_nets as base_nets
        import robomimic.models.obs_core as obs_core
        import robomimic.models.obs_nets as obs_nets

        yield types.SimpleNamespace(base_nets=base_nets, obs_core=obs_core, obs_nets=obs_nets)
    finally:
        for name in [name for name in sys.modules if name.startswith(isolated)]:
            del sys.modules[name]
        sys.modules.update(saved)


class DPEvalCrop(nn.Module):
    """DP's diffusion_policy/model/vision/crop_randomizer.py CropRandomizer at evaluation (num_crops=1)."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w

    def forward_in(self, x):
        return tv_center_crop(x, self.h, self.w)

    def forward_out(self, x):
        return x


def robomimic_reference(rm, cfg: EncoderConfig) -> nn.Module:
    """DP hybrid policy's obs encoder: robomimic ObservationEncoder as obs_encoder_factory builds it for DP."""
    enc = rm.obs_nets.ObservationEncoder(feature_activation=nn.ReLU)
    cams, lows = dict(cfg.cameras), dict(cfg.low_dim)
    ch, cw = cfg.crop_shape
    for key in cfg.feature_order:
        if key in lows:
            enc.register_obs_key(name=key, shape=[lows[key]])
            continue
        kwargs = {
            "backbone_class": "ResNet18Conv",
            "backbone_kwargs": {"pretrained": False, "input_coord_conv": False},
            "pool_class": "SpatialSoftmax",
            "pool_kwargs": {"num_kp": 32, "learnable_temperature": False, "temperature": 1.0, "noise_std": 0.0},
            "feature_dimension": 64,
        }
        randomizer = rm.obs_core.CropRandomizer(input_shape=list(cams[key]), crop_height=ch, crop_width=cw)
        enc.register_obs_key(
            name=key, shape=list(cams[key]), net_class="VisualCore", net_kwargs=kwargs, randomizer=randomizer
        )
    enc.make()
    if cfg.norm == "group":
        to_group_norm(enc)
    for key in cfg.camera_names:  # DP's eval_fixed_crop swap
        enc.obs_randomizers[key] = DPEvalCrop(ch, cw)
    return enc


ROBOMIMIC = dict(
    kind="robomimic",
    cameras={"agentview": (3, 40, 40), "wrist": (3, 40, 40)},
    low_dim={"eef_pos": 3, "gripper": 2},
    feature_order=("agentview", "eef_pos", "wrist", "gripper"),  # any shape_meta order; a mixed one on purpose
    crop_shape=(37, 37),  # odd margin: torchvision rounds 1.5 to 2 (robomimic 0.3.0's own crop would floor)
)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_robomimic_encoder_matches_robomimic_classes(robomimic_models, norm):
    cfg = EncoderConfig(**ROBOMIMIC, norm=norm)
    ref = randomize(robomimic_reference(robomimic_models, cfg), 1).eval()
    with torch.no_grad():
        ref.obs_nets["wrist"].pool.temperature.fill_(0.7)  # a loaded temperature, not the constructor's
    source = {"obs_encoder." + k: v for k, v in ref.state_dict().items()}
    assert "obs_encoder.obs_nets.wrist.nets.0.nets.0.weight" in source  # the duplicated VisualCore names
    assert "obs_encoder.obs_nets.wrist.nets.1.pos_x" in source
    ours = load_source_state_dict(ObservationEncoder(cfg), source).eval()
    assert ours.cores[1].pool.temperature.item() == pytest.approx(0.7)

    b, to = 2, 2
    images, low = images_and_low(cfg, b, to)
    split = dict(zip(cfg.low_dim_names, low.split([3, 2], dim=-1), strict=True))
    with torch.no_grad():
        flat = {k: v.reshape(b * to, *v.shape[2:]) for k, v in {**images, **split}.items()}
        expected = ref(flat).reshape(b, -1)  # DP: obs_encoder(x[:, :To].reshape(-1, ...)).reshape(B, -1)
        got = ours(images, low)
    assert got.shape == (b, to * (64 + 3 + 64 + 2))
    assert (got - expected).abs().max().item() <= TOL
    step = got.reshape(b, to, -1)  # layout: [agentview 64 | eef_pos 3 | wrist 64 | gripper 2] per step
    assert torch.equal(step[:, :, 64:67], split["eef_pos"]) and torch.equal(step[:, :, -2:], split["gripper"])
    assert (step[:, :, :64] >= 0).all()  # robomimic's ReLU after each image net


def test_robomimic_spatial_softmax_matches(robomimic_models):
    ref = robomimic_models.base_nets.SpatialSoftmax(input_shape=[16, 3, 5], num_kp=8, temperature=0.5)
    ours = RobomimicSpatialSoftmax(16, (3, 5), num_kp=8, temperature=0.5)
    randomize(ref, 2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 16, 3, 5)
    ref.eval(), ours.eval()
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == (4, 8, 2)
    assert (got - expected).abs().max().item() <= TOL
    assert torch.equal(ours.pos_x, ref.pos_x) and torch.equal(ours.pos_y, ref.pos_y)


# ---------------------------------------------------------------------------------------------------------------
# DP image: MultiImageObsEncoder restated
# ---------------------------------------------------------------------------------------------------------------


def dp_image_reference(cfg: EncoderConfig, seed: int) -> tuple[dict, callable]:
    """DP's MultiImageObsEncoder at evaluation: per key resnet18 (fc Identity), crop, ImageNet after [-1, 1]."""
    cams = dict(cfg.cameras)
    models = nn.ModuleDict()
    for key in ["rgb"] if cfg.shared else cams:
        model = TorchvisionResNet(cfg.width, fc=nn.Identity())
        models[key] = to_group_norm(model) if cfg.norm == "group" else model
    randomize(models, seed).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)

    def transform(x):
        if cfg.crop_shape is not None and cfg.random_crop:  # random_crop=False: the CenterCrop is overwritten
            x = tv_center_crop(x, *cfg.crop_shape)
        return (x - mean) / std if cfg.imagenet_norm else x

    def forward(obs):  # obs: {key: (N, ...)}
        rgb_keys, low_keys = sorted(cams), sorted(dict(cfg.low_dim))
        if cfg.shared:
            n = obs[rgb_keys[0]].shape[0]
            feature = models["rgb"](torch.cat([transform(obs[k]) for k in rgb_keys], dim=0))
            features = [torch.moveaxis(feature.reshape(-1, n, feature.shape[-1]), 0, 1).reshape(n, -1)]
        else:
            features = [models[k](transform(obs[k])) for k in rgb_keys]
        return torch.cat(features + [obs[k] for k in low_keys], dim=-1)

    state = {"obs_encoder._dummy_variable": torch.empty(0)}
    state.update({f"obs_encoder.key_model_map.{k}": v for k, v in models.state_dict().items()})
    return state, forward


DP_IMAGE = dict(
    kind="dp_image",
    cameras={"camera_1": (3, 40, 36), "camera_0": (3, 40, 36)},  # given unsorted: DP sorts
    low_dim={"robot_eef_pose": 4, "gripper": 1},
    crop_shape=(35, 31),
    imagenet_norm=True,
)


@pytest.mark.parametrize(
    ("width", "norm", "shared", "random_crop"),
    [(16, "group", False, True), (8, "batch", True, True), (8, "batch", False, False)],
)
def test_dp_image_encoder_matches_multi_image_obs_encoder(width, norm, shared, random_crop):
    cfg = EncoderConfig(
        **DP_IMAGE, width=width, norm=norm, shared=shared, random_crop=random_crop, feature_dim=8 * width
    )
    assert cfg.feature_order == ("camera_0", "camera_1", "gripper", "robot_eef_pose")
    state, reference = dp_image_reference(cfg, seed=3)
    ours = load_source_state_dict(ObservationEncoder(cfg), state).eval()
    b, to = 3, 2
    images, low = images_and_low(cfg, b, to, seed=4)
    split = dict(zip(cfg.low_dim_names, low.split([4, 1], dim=-1), strict=True))
    with torch.no_grad():
        flat = {k: v.reshape(b * to, *v.shape[2:]) for k, v in {**images, **split}.items()}
        expected = reference(flat).reshape(b, -1)
        got = ours(images, low)
    assert got.shape == (b, to * (2 * 8 * width + 5))
    assert (got - expected).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------------------------
# LeRobot: DiffusionRgbEncoder and _prepare_global_conditioning restated
# ---------------------------------------------------------------------------------------------------------------


class LeRobotSpatialSoftmaxSource(nn.Module):
    """LeRobot 0.6.1 modeling_diffusion.py SpatialSoftmax, restated."""

    def __init__(self, input_shape, num_kp):
        super().__init__()
        self._in_c, self._in_h, self._in_w = input_shape
        self.nets = nn.Conv2d(self._in_c, num_kp, kernel_size=1)
        self._out_c = num_kp
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, self._in_w), np.linspace(-1.0, 1.0, self._in_h))
        pos_x = torch.from_numpy(pos_x.reshape(self._in_h * self._in_w, 1)).float()
        pos_y = torch.from_numpy(pos_y.reshape(self._in_h * self._in_w, 1)).float()
        self.register_buffer("pos_grid", torch.cat([pos_x, pos_y], dim=1))

    def forward(self, features):
        features = self.nets(features).reshape(-1, self._in_h * self._in_w)
        attention = F.softmax(features, dim=-1)
        return (attention @ self.pos_grid).view(-1, self._out_c, 2)


class LeRobotRgbEncoderSource(nn.Module):
    """LeRobot 0.6.1 DiffusionRgbEncoder at evaluation (no resize), restated."""

    def __init__(self, width: int, norm: str, crop, feature_hw, num_kp: int = 32):
        super().__init__()
        self.crop = crop
        self.backbone = nn.Sequential(*list(TorchvisionResNet(width).children())[:-2])
        if norm == "group":
            self.backbone = to_group_norm(self.backbone)
        self.pool = LeRobotSpatialSoftmaxSource((8 * width, *feature_hw), num_kp)
        self.out = nn.Linear(num_kp * 2, num_kp * 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = tv_center_crop(x, *self.crop)
        return self.relu(self.out(torch.flatten(self.pool(self.backbone(x)), start_dim=1)))


LEROBOT = dict(
    kind="lerobot",
    cameras={"observation.images.top": (3, 36, 36), "observation.images.wrist": (3, 36, 36)},
    low_dim={"observation.state": 2, "observation.environment_state": 3},
    crop_shape=(33, 33),
    num_keypoints=8,
    feature_dim=16,
)


@pytest.mark.parametrize(("width", "norm", "shared"), [(16, "group", False), (8, "batch", True)])
def test_lerobot_encoder_matches_rgb_encoder(width, norm, shared):
    cfg = EncoderConfig(**LEROBOT, width=width, norm=norm, shared=shared)
    assert cfg.feature_order == ("observation.state", *cfg.camera_names, "observation.environment_state")
    make = lambda: LeRobotRgbEncoderSource(width, norm, (33, 33), (2, 2), num_kp=8)  # noqa: E731
    rgb_encoder = make() if shared else nn.ModuleList([make(), make()])
    randomize(rgb_encoder, 5).eval()
    state = {"diffusion.rgb_encoder." + k: v for k, v in rgb_encoder.state_dict().items()}
    ours = load_source_state_dict(ObservationEncoder(cfg), state).eval()
    b, to = 2, 2
    images, low = images_and_low(cfg, b, to, seed=6)
    stacked = torch.stack([images[c] for c in cfg.camera_names], dim=2)  # LeRobot's "observation.images"
    state_x, env = low[..., :2], low[..., 2:]
    with torch.no_grad():  # _prepare_global_conditioning with einops spelled out
        if shared:
            feats = rgb_encoder(stacked.reshape(b * to * 2, 3, 36, 36)).reshape(b, to, -1)  # "(b s n) -> b s (n d)"
        else:
            per_cam = stacked.permute(2, 0, 1, 3, 4, 5).reshape(2, b * to, 3, 36, 36)  # "b s n ... -> n (b s) ..."
            out = torch.cat([enc(x) for enc, x in zip(rgb_encoder, per_cam, strict=True)])
            feats = out.reshape(2, b, to, -1).permute(1, 2, 0, 3).reshape(b, to, -1)  # "(n b s) d -> b s (n d)"
        expected = torch.cat([state_x, feats, env], dim=-1).flatten(start_dim=1)
        got = ours(images, low)
    assert got.shape == (b, to * (2 + 2 * 16 + 3))
    assert (got - expected).abs().max().item() <= TOL


def test_lerobot_spatial_softmax_matches_source():
    ref = randomize(LeRobotSpatialSoftmaxSource((16, 3, 4), 8), 7)
    ours = LeRobotSpatialSoftmax(16, (3, 4), num_kp=8)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(5, 16, 3, 4)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL
    # keypoint layout (B, K, [x, y]) with x along the width: a peak in the last column has x = 1
    feature = torch.full((1, 16, 3, 4), -50.0)
    with torch.no_grad():
        ours.nets.weight.zero_(), ours.nets.bias.zero_(), ours.nets.weight[:, 0].fill_(1.0)
    feature[0, 0, 1, 3] = 50.0
    kp = ours(feature)
    assert torch.allclose(kp[0, 0], torch.tensor([1.0, 0.0]), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# State-dict key mapping
# ---------------------------------------------------------------------------------------------------------------


def source_state(cfg: EncoderConfig) -> dict:
    """A source-named state dict for ``cfg`` (DP image: built from the reference; others: renamed back)."""
    if cfg.kind == "dp_image":
        return dp_image_reference(cfg, seed=0)[0]
    ours = ObservationEncoder(cfg).state_dict()
    if cfg.kind == "lerobot":
        return {"diffusion.rgb_encoder." + k.removeprefix("cores."): v for k, v in ours.items()}
    out = {}
    for k, v in ours.items():
        _, i, tail = k.split(".", 2)
        cam = cfg.camera_names[int(i)]
        tail = tail.replace("backbone.", "backbone.nets.", 1).replace("out.", "nets.3.", 1)
        out[f"obs_encoder.obs_nets.{cam}.{tail}"] = v
    return out


SMALL = {
    "robomimic": dict(ROBOMIMIC, width=8, norm="batch", feature_dim=16, num_keypoints=4),
    "dp_image": dict(DP_IMAGE, width=8, norm="batch", feature_dim=64),
    "lerobot": dict(LEROBOT, width=8, norm="batch"),
}


@pytest.mark.parametrize("kind", list(SMALL))
def test_state_dict_round_trip_and_other_keys_ignored(kind):
    cfg = EncoderConfig(**SMALL[kind])
    state = source_state(cfg)
    state["model.final_conv.1.weight"] = torch.zeros(2)  # the U-Net's keys are not the encoder's business
    state["normalizer.params_dict.image.scale"] = torch.ones(1)
    converted = convert_state_dict(state, cfg)
    assert set(converted) == set(ObservationEncoder(cfg).state_dict())


@pytest.mark.parametrize("kind", list(SMALL))
def test_missing_key_is_one_line_naming_it(kind):
    cfg = EncoderConfig(**SMALL[kind])
    state = source_state(cfg)
    victim = next(k for k in state if "layer" in k or ".5." in k)  # a trunk key of the second stage or so
    del state[victim]
    with pytest.raises(StateDictKeyError) as info:
        convert_state_dict(state, cfg)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "missing key" in message and repr(victim) in message


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("robomimic", "obs_encoder.obs_nets.agentview.backbone.nets.9.weight"),
        ("robomimic", "obs_encoder.obs_nets.side_camera.nets.3.weight"),
        ("robomimic", "obs_encoder.something_else"),
        ("dp_image", "obs_encoder.key_model_map.camera_0.fc.weight"),
        ("dp_image", "obs_encoder.key_model_map.rgb.conv1.weight"),
        ("lerobot", "diffusion.rgb_encoder.2.out.weight"),
        ("lerobot", "diffusion.rgb_encoder.0.pool.temperature"),
    ],
)
def test_unexpected_key_is_one_line_naming_it(kind, extra):
    cfg = EncoderConfig(**SMALL[kind])
    state = source_state(cfg)
    state[extra] = torch.zeros(1)
    with pytest.raises(StateDictKeyError) as info:
        convert_state_dict(state, cfg)
    message = str(info.value)
    assert "\n" not in message and repr(extra) in message and "unexpected" in message


def test_shape_mismatch_and_disagreeing_aliases_are_refused():
    cfg = EncoderConfig(**SMALL["robomimic"])
    state = source_state(cfg)
    key = "obs_encoder.obs_nets.wrist.nets.3.weight"
    bad = dict(state, **{key: torch.zeros(3, 3)})
    with pytest.raises(StateDictKeyError, match=r"nets\.3\.weight' has shape \[3, 3\]"):
        convert_state_dict(bad, cfg)
    alias = dict(state)
    alias["obs_encoder.obs_nets.wrist.nets.1.nets.weight"] = state["obs_encoder.obs_nets.wrist.pool.nets.weight"] + 1
    with pytest.raises(StateDictKeyError, match="differs from its alias"):
        convert_state_dict(alias, cfg)
    same = dict(state)
    same["obs_encoder.obs_nets.wrist.nets.1.nets.weight"] = state["obs_encoder.obs_nets.wrist.pool.nets.weight"]
    convert_state_dict(same, cfg)  # DP's duplicated names hold the same tensor: accepted


def test_batch_norm_state_refused_by_group_norm_config():
    batch_state = source_state(EncoderConfig(**dict(SMALL["lerobot"], width=16)))
    with pytest.raises(StateDictKeyError, match="running_mean"):
        convert_state_dict(batch_state, EncoderConfig(**dict(SMALL["lerobot"], width=16, norm="group")))


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def test_config_json_round_trip():
    for spec in (ROBOMIMIC, DP_IMAGE | {"feature_dim": 512}, LEROBOT):
        cfg = EncoderConfig(**spec)
        text = json.dumps(cfg.to_dict())
        again = EncoderConfig.from_dict(json.loads(text))
        assert again == cfg and again.to_json() == cfg.to_json()
    stats = EncoderConfig(
        **LEROBOT,
        image_mean={c: (0.5, 0.5, 0.5) for c in LEROBOT["cameras"]},
        image_std={c: (0.5, 0.5, 0.5) for c in LEROBOT["cameras"]},
    )
    assert EncoderConfig.from_dict(json.loads(stats.to_json())) == stats


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (dict(ROBOMIMIC, kind="vit"), "kind"),
        (dict(ROBOMIMIC, cameras={}), "cameras"),
        (dict(ROBOMIMIC, cameras={"agentview": (3, 40)}), "cameras"),
        (dict(ROBOMIMIC, low_dim={"agentview": 2}, feature_order=None), "cameras"),
        (dict(ROBOMIMIC, low_dim={"eef_pos": 0, "gripper": 2}), "low_dim"),
        (dict(ROBOMIMIC, feature_order=("agentview", "wrist")), "feature_order"),
        (dict(ROBOMIMIC, crop_shape=(40, 37)), "crop_shape"),  # DP's CropRandomizer needs crop < image
        (dict(ROBOMIMIC, crop_shape=(37,)), "crop_shape"),
        (dict(ROBOMIMIC, crop_shape=(36.5, 36)), "crop_shape"),  # not truncated to 36
        (dict(ROBOMIMIC, cameras={"agentview": (3, 40.5, 40)}), "cameras"),
        (dict(ROBOMIMIC, cameras={"agentview": (3, "40", 40)}), "cameras"),
        (dict(ROBOMIMIC, low_dim={"eef_pos": 2.5, "gripper": 2}), "low_dim"),
        (dict(ROBOMIMIC, low_dim={"eef_pos": True, "gripper": 2}), "low_dim"),
        (dict(ROBOMIMIC, low_dim={"eef_pos": float("inf"), "gripper": 2}), "low_dim"),  # not an OverflowError
        (dict(ROBOMIMIC, width=8, norm="group"), "width"),  # 8 // 16 = 0 groups
        (dict(ROBOMIMIC, norm="layer"), "norm"),
        (dict(ROBOMIMIC, shared=True), "shared"),
        (dict(ROBOMIMIC, temperature=0.0), "temperature"),
        (dict(ROBOMIMIC, num_keypoints=0), "num_keypoints"),
        (dict(ROBOMIMIC, imagenet_norm=True), "imagenet_norm"),
        (dict(DP_IMAGE, feature_dim=64), "feature_dim"),
        (
            dict(DP_IMAGE, feature_dim=512, feature_order=("camera_1", "camera_0", "gripper", "robot_eef_pose")),
            "feature_order",
        ),
        (dict(LEROBOT, feature_dim=64), "feature_dim"),
        (dict(LEROBOT, low_dim={}), "low_dim"),
        (dict(LEROBOT, cameras={"a": (3, 36, 36), "b": (3, 40, 40)}), "cameras"),
        (dict(LEROBOT, image_mean={"observation.images.top": (0.5,) * 3}), "image_std"),
        (
            dict(
                LEROBOT,
                image_mean={c: (0.5,) * 3 for c in LEROBOT["cameras"]},
                image_std={c: (0.0,) * 3 for c in LEROBOT["cameras"]},
            ),
            "image_std",
        ),
    ],
)
def test_config_errors_name_the_field(spec, field):
    with pytest.raises(ConfigError) as info:
        EncoderConfig(**spec)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith(f"EncoderConfig.{field}:"), message


def test_from_dict_refuses_unknown_field():
    data = EncoderConfig(**ROBOMIMIC).to_dict() | {"dropout": 0.1}
    with pytest.raises(ConfigError, match=r"^EncoderConfig\.dropout: unknown field"):
        EncoderConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------------------
# Trunk, norms, crops, batches
# ---------------------------------------------------------------------------------------------------------------


def test_trunk_has_torchvision_names_and_shapes():
    trunk = ResNet18Trunk(3, width=8, norm="batch").eval()
    keys = set(trunk.state_dict())
    for key in (
        "0.weight",
        "1.running_mean",
        "1.num_batches_tracked",
        "4.0.conv1.weight",
        "4.1.bn2.bias",
        "5.0.downsample.0.weight",
        "5.0.downsample.1.running_var",
        "7.1.conv2.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("4.0.downsample") for k in keys)  # layer1 keeps the width: no projection
    assert trunk[7][1].conv2.weight.shape == (64, 64, 3, 3)
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, 40, 20)).shape == (2, 64, 2, 1)  # ceil(40 / 32), ceil(20 / 32)


def test_group_norm_and_batch_norm():
    group = ResNet18Trunk(3, width=16, norm="group")
    groups = [m.num_groups for m in group.modules() if isinstance(m, nn.GroupNorm)]
    assert set(groups) == {1, 2, 4, 8}  # num_features // 16 for 16, 32, 64, 128 channels
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())

    cfg = EncoderConfig(**dict(LEROBOT, width=8, norm="batch"))
    enc = randomize(ObservationEncoder(cfg), 8).eval()
    images, low = images_and_low(cfg, 3, 2)
    with torch.no_grad():
        before = enc(images, low)
        one = enc({k: v[1:2] for k, v in images.items()}, low[1:2])
        enc.cores[0].backbone[1].running_mean.add_(0.5)  # evaluation BatchNorm reads its running statistics
        after = enc(images, low)
    assert (one - before[1:2]).abs().max().item() <= 1e-5  # no batch statistics: rows are independent
    assert (after - before).abs().max().item() > 1e-4


def test_center_crop_rounds_like_torchvision():
    x = torch.arange(10 * 9, dtype=torch.float32).reshape(1, 1, 10, 9)
    # margins 3 -> round(1.5) = 2 (half to even); 5 -> round(2.5) = 2; 4 -> 2
    assert center_crop(x, (7, 4))[0, 0, 0, 0].item() == x[0, 0, 2, 2].item()
    assert center_crop(x, (6, 5)).shape[-2:] == (6, 5) and center_crop(x, (6, 5))[0, 0, 0, 0].item() == x[0, 0, 2, 2]
    assert torch.equal(center_crop(x, (10, 9)), x)


def test_evaluation_crop_is_applied_or_not_like_the_source():
    cropped = EncoderConfig(**dict(SMALL["dp_image"], random_crop=True))
    uncropped = EncoderConfig(**dict(SMALL["dp_image"], random_crop=False))  # DP quirk: no crop at all
    assert cropped.trunk_input_hw("camera_0") == (35, 31) and uncropped.trunk_input_hw("camera_0") == (40, 36)
    enc = randomize(ObservationEncoder(cropped), 9).eval()
    small = {name: (3, 35, 31) for name in DP_IMAGE["cameras"]}
    plain = ObservationEncoder(EncoderConfig(**dict(SMALL["dp_image"], cameras=small, random_crop=False))).eval()
    plain.load_state_dict(enc.state_dict())
    images, low = images_and_low(cropped, 1, 2)
    by_hand = {k: center_crop(v, (35, 31)) for k, v in images.items()}
    with torch.no_grad():
        assert torch.equal(enc(images, low), plain(by_hand, low))  # crop by hand, then no crop: the same

    lerobot = EncoderConfig(**SMALL["lerobot"])  # LeRobot: center crop at evaluation, pool grid from the crop size
    enc = ObservationEncoder(lerobot).eval()
    assert enc.cores[0].pool.pos_grid.shape == (4, 2)  # ceil(33 / 32) ** 2


@pytest.mark.parametrize("kind", list(SMALL))
def test_batch_one_and_many_agree(kind):
    cfg = EncoderConfig(**SMALL[kind])
    enc = randomize(ObservationEncoder(cfg), 10).eval()
    images, low = images_and_low(cfg, 3, 2)
    with torch.no_grad():
        many = enc(images, low)
        singles = torch.cat([enc({k: v[i : i + 1] for k, v in images.items()}, low[i : i + 1]) for i in range(3)])
    assert many.shape == (3, 2 * cfg.step_feature_dim()) == singles.shape
    assert (many - singles).abs().max().item() <= 1e-5


def test_forward_refuses_lerobot_training_mode_and_bad_shapes():
    lerobot = EncoderConfig(**SMALL["lerobot"])
    with pytest.raises(RuntimeError, match="eval"):  # LeRobot's per-batch training crop is not reproduced
        ObservationEncoder(lerobot)(*images_and_low(lerobot, 1, 2))
    cfg = EncoderConfig(**SMALL["robomimic"])
    enc = ObservationEncoder(cfg).eval()
    images, low = images_and_low(cfg, 1, 2)
    with pytest.raises(ObservationError, match="'wrist' missing"):
        enc({"agentview": images["agentview"]}, low)
    with pytest.raises(ObservationError, match=r"images\['wrist'\]"):
        enc(dict(images, wrist=images["wrist"][:, :1]), low)
    with pytest.raises(ObservationError, match="low_dim"):
        enc(images, low[..., :3])


def test_image_normalizer_is_the_policy_side_step():
    x = {"agentview": torch.rand(2, 3, 4, 4), "wrist": torch.rand(2, 3, 4, 4)}
    out = ImageNormalizer(EncoderConfig(**ROBOMIMIC))(x)
    assert torch.equal(out["wrist"], x["wrist"] * 2 - 1)  # DP's range normaliser: scale 2, offset -1
    cams = list(LEROBOT["cameras"])
    mean = {cams[0]: (0.1, 0.2, 0.3), cams[1]: (0.5, 0.5, 0.5)}
    std = {cams[0]: (0.2, 0.3, 0.4), cams[1]: (0.5, 0.5, 0.5)}
    norm = ImageNormalizer(EncoderConfig(**LEROBOT, image_mean=mean, image_std=std))
    y = {cams[0]: x["agentview"], cams[1]: x["wrist"]}
    out = norm(y)
    m, s = torch.tensor(mean[cams[0]]).view(3, 1, 1), torch.tensor(std[cams[0]]).view(3, 1, 1)
    assert torch.equal(out[cams[0]], (y[cams[0]] - m) / (s + 1e-8))
    default = ImageNormalizer(EncoderConfig(**LEROBOT))(y)  # use_imagenet_stats default
    m = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(default[cams[1]], (y[cams[1]] - m) / (torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)))
