"""Camera-image observation encoders of Diffusion Policy's three checkpoint families, re-implemented exactly.

Why here: a pretrained image policy conditions its U-Net on features of its camera images, so loading one means
reproducing its encoder bit for bit, without torchvision (whose default wheel pulls a multi-GB CUDA build). One
``EncoderConfig`` with a ``kind`` picks the family:

``"robomimic"``
    DP's hybrid image policy (``DiffusionUnetHybridImagePolicy``): robomimic's ``ObservationEncoder`` with, per
    camera, a ``VisualCore`` = ResNet18Conv trunk (torchvision ``resnet18`` ``children()[:-2]``) -> robomimic
    ``SpatialSoftmax`` (1x1 conv to 32 keypoints, temperature, ``pos_x``/``pos_y``) -> Flatten -> Linear(64, 64),
    then ReLU (the encoder's ``feature_activation``); DP's ``eval_fixed_crop`` crop randomizer center-crops at
    evaluation; low-dim keys pass through; per step the features follow the shape_meta key order.
``"dp_image"``
    DP's ``MultiImageObsEncoder`` (``DiffusionUnetImagePolicy``): torchvision ``resnet18`` with ``fc = Identity``
    (512-d average-pooled features, no projection, no ReLU), center crop at evaluation (but ``random_crop=False``
    applies no crop at all: DP builds a CenterCrop and then overwrites it), ImageNet normalisation inside the
    encoder (after the policy's [0, 1] -> [-1, 1] range normaliser); image keys sorted, then low-dim keys sorted.
    Quirk: with ``share_rgb_model=True`` DP never swaps BatchNorm for GroupNorm (only the per-key copies are
    swapped), so a shared DP model has ``norm="batch"`` whatever its ``use_group_norm`` says.
``"lerobot"``
    LeRobot 0.6.1's ``DiffusionRgbEncoder``: ``backbone`` = resnet18 ``children()[:-2]`` -> LeRobot
    ``SpatialSoftmax`` (buffer ``pos_grid``, ``attention @ pos_grid``) -> ``out`` Linear(64, 64) -> ReLU, center crop
    at evaluation, one encoder per camera or one shared; per step ``[state, camera features..., env state]``.

Training: in training mode a robomimic or DP image encoder random-crops as DP's ``CropRandomizer`` does, each image
its own offset (:func:`random_crop`), so that ``policy_accel.train`` can train DP's image recipe; LeRobot's training
crop (one torchvision ``RandomCrop`` offset per batch) is not reproduced, and such an encoder refuses training mode.

What is *not* reproduced: robomimic 0.2.0's own
CropRandomizer (it random-crops even at evaluation; DP's configs set ``eval_fixed_crop=True``), DP's and LeRobot's
``resize_shape`` (torchvision Resize; the real-robot DP configs use it: resize the images before this encoder),
R3M / pretrained backbones other than loading their weights, and robomimic's ``num_kp=None`` / ``output_variance``.

Module names follow the sources so that a source state dict loads after the simple renames done by
``convert_state_dict`` (documented per kind there). The image normalisation that the source's *policy* applies
before its encoder (DP's range normaliser, LeRobot's MEAN_STD processor) is a separate module, ``ImageNormalizer``,
so the policy owns it; ``ObservationEncoder.forward`` takes images exactly as the source's encoder receives them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from policy_accel.errors import CheckpointError, ConfigError, ObservationError
from policy_accel.schema import exact_int

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "DPResNetCore",
    "EncoderConfig",
    "ImageNormalizer",
    "LeRobotRgbCore",
    "LeRobotSpatialSoftmax",
    "ObservationEncoder",
    "ResNet18Trunk",
    "RobomimicSpatialSoftmax",
    "RobomimicVisualCore",
    "StateDictKeyError",
    "center_crop",
    "random_crop",
    "convert_dp_image_state_dict",
    "convert_lerobot_state_dict",
    "convert_robomimic_state_dict",
    "convert_state_dict",
    "imagenet_normalize",
    "load_source_state_dict",
]

KINDS = ("robomimic", "dp_image", "lerobot")
NORMS = ("group", "batch")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision.transforms.Normalize values used by DP and LeRobot
IMAGENET_STD = (0.229, 0.224, 0.225)
LEROBOT_EPS = 1e-8  # LeRobot's NormalizerProcessorStep: (x - mean) / (std + eps)
DEFAULT_PREFIX = {"robomimic": "obs_encoder.", "dp_image": "obs_encoder.", "lerobot": "diffusion.rgb_encoder."}


class StateDictKeyError(CheckpointError, ValueError):
    """A source state dict whose encoder keys do not match the config: one line naming the key."""


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def _bad(field_name: str, message: str) -> ConfigError:
    return ConfigError(f"EncoderConfig.{field_name}: {message}")


@dataclass(frozen=True)
class EncoderConfig:
    """Every architecture choice of one image encoder; JSON-safe through ``to_dict`` / ``from_dict``.

    ``cameras``: ``(name, (C, H, W))`` pairs, the camera order of the source (robomimic/LeRobot: config order; DP
    image sorts them itself). ``low_dim``: ``(name, dim)`` pairs, the layout of ``forward``'s ``low_dim`` tensor.
    ``feature_order``: every camera and low-dim name in the per-step global-condition order; ``None`` fills in the
    source's rule (robomimic: cameras then low-dim keys, DP's shape_meta order for its shipped tasks; DP image:
    sorted cameras then sorted low-dim keys; LeRobot: state (first low-dim key), cameras, env state (second)).
    ``width``: ResNet base channels (64 = torchvision). ``norm``: "group" (``GroupNorm(C // 16, C)``) or "batch"
    (BatchNorm with running stats, evaluation mode). ``random_crop`` matters for DP image only. ``temperature``:
    robomimic SpatialSoftmax initial temperature (the loaded weights carry the real value). ``imagenet_norm``: DP
    image's in-encoder ImageNet normalisation. ``image_mean`` / ``image_std``: LeRobot's per-camera MEAN_STD stats
    (``None`` = ImageNet for every camera), used by ``ImageNormalizer``.
    """

    kind: str
    cameras: tuple[tuple[str, tuple[int, int, int]], ...]
    low_dim: tuple[tuple[str, int], ...] = ()
    feature_order: tuple[str, ...] | None = None
    crop_shape: tuple[int, int] | None = None
    random_crop: bool = True
    width: int = 64
    norm: str = "group"
    num_keypoints: int = 32
    feature_dim: int = 64
    shared: bool = False
    temperature: float = 1.0
    imagenet_norm: bool = False
    image_mean: tuple[tuple[str, tuple[float, ...]], ...] | None = None
    image_std: tuple[tuple[str, tuple[float, ...]], ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise JSON lists / mappings to tuples once, here
        set_(self, "cameras", _pairs(self.cameras, "cameras", lambda v: tuple(exact_int(x) for x in v)))
        set_(self, "low_dim", _pairs(self.low_dim, "low_dim", exact_int))
        if self.crop_shape is not None:
            set_(self, "crop_shape", _int_tuple(self.crop_shape, "crop_shape", 2))
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, _pairs(value, name, lambda v: tuple(float(x) for x in v)))
        self._check()
        if self.feature_order is None:
            set_(self, "feature_order", self.source_order())
        else:
            set_(self, "feature_order", tuple(str(k) for k in self.feature_order))
            self._check_order()

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.cameras)

    @property
    def low_dim_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.low_dim)

    @property
    def low_dim_total(self) -> int:
        return sum(dim for _, dim in self.low_dim)

    def camera_feature_dim(self) -> int:
        """Per-camera feature size: Linear output (robomimic, LeRobot) or 8 * width pooled channels (DP image)."""
        return 8 * self.width if self.kind == "dp_image" else self.feature_dim

    def step_feature_dim(self) -> int:
        """Features per observation step; ``forward`` returns ``n_obs_steps`` times this."""
        return self.camera_feature_dim() * len(self.cameras) + self.low_dim_total

    def trunk_input_hw(self, camera: str) -> tuple[int, int]:
        """Image size the ResNet trunk sees for ``camera`` after the evaluation crop."""
        _, h, w = dict(self.cameras)[camera]
        return (h, w) if not self.applies_crop() else self.crop_shape  # type: ignore[return-value]

    def applies_crop(self) -> bool:
        """Whether the source crops at evaluation (DP image with ``random_crop=False``: no crop, a DP quirk)."""
        if self.crop_shape is None:
            return False
        return self.random_crop if self.kind == "dp_image" else True

    def source_order(self) -> tuple[str, ...]:
        """The source's per-step feature order for these cameras and low-dim keys."""
        cams, lows = self.camera_names, self.low_dim_names
        if self.kind == "dp_image":
            return tuple(sorted(cams)) + tuple(sorted(lows))
        if self.kind == "lerobot":
            return lows[:1] + cams + lows[1:]
        return cams + lows

    # -- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (mappings keep the camera / low-dim order); ``from_dict`` reads it back."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("cameras", "image_mean", "image_std") and value is not None:
                value = {name: list(v) for name, v in value}
            elif f.name == "low_dim":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderConfig:
        """Build from ``to_dict``'s output (or a JSON file's); an unknown field is a ``ConfigError``."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise _bad(str(key), f"unknown field (known: {', '.join(sorted(known))})")
        if "kind" not in data or "cameras" not in data:
            raise _bad("kind" if "kind" not in data else "cameras", "required field missing")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    # -- checks --------------------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.kind not in KINDS:
            raise _bad("kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.cameras:
            raise _bad("cameras", "at least one camera is needed")
        names = self.camera_names + self.low_dim_names
        for name in names:
            if not name:
                raise _bad("cameras", "empty observation name")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _bad("cameras" if dup in self.camera_names else "low_dim", f"name {dup!r} used twice")
        for name, shape in self.cameras:
            if len(shape) != 3 or min(shape) < 1:
                raise _bad("cameras", f"{name!r} shape {list(shape)} is not a positive (C, H, W)")
        for name, dim in self.low_dim:
            if dim < 1:
                raise _bad("low_dim", f"{name!r} has dimension {dim}; it must be >= 1")
        for flag in ("random_crop", "shared", "imagenet_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(flag, f"must be true or false, got {getattr(self, flag)!r}")
        for name in ("width", "num_keypoints", "feature_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(name, f"must be a positive integer, got {value!r}")
        if self.norm not in NORMS:
            raise _bad("norm", f"{self.norm!r} is not one of {', '.join(NORMS)}")
        if self.norm == "group":
            for channels in (self.width, 2 * self.width, 4 * self.width, 8 * self.width):
                groups = channels // 16
                if groups < 1 or channels % groups:
                    raise _bad(
                        "width",
                        f"{self.width} gives a {channels}-channel stage that GroupNorm(C // 16) cannot split "
                        "(needs width >= 16 and C divisible by C // 16)",
                    )
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)) or (
            self.temperature <= 0
        ):
            raise _bad("temperature", f"must be a finite number > 0, got {self.temperature!r}")
        self._check_crop()
        self._check_kind()
        self._check_stats()

    def _check_crop(self) -> None:
        if self.crop_shape is None:
            return
        ch, cw = self.crop_shape
        if min(ch, cw) < 1:
            raise _bad("crop_shape", f"{list(self.crop_shape)} must be positive")
        # DP's CropRandomizer asserts crop < image; LeRobot's CenterCrop would pad a larger crop (not reproduced).
        strict = self.kind != "lerobot" and self.applies_crop()
        for name, (_, h, w) in self.cameras:
            if (ch > h or cw > w) or (strict and (ch >= h or cw >= w)):
                relation = "smaller than" if strict else "at most"
                raise _bad("crop_shape", f"{list(self.crop_shape)} must be {relation} camera {name!r} ({h}, {w})")

    def _check_kind(self) -> None:
        shapes = {shape for _, shape in self.cameras}
        if self.kind == "robomimic" and self.shared:
            raise _bad("shared", "DP's hybrid image policy builds one VisualCore per camera; shared must be false")
        if self.kind == "lerobot" and len(shapes) > 1:
            raise _bad("cameras", "LeRobot requires every camera to have the same shape")
        if self.shared and len(shapes) > 1:
            raise _bad("shared", "a shared encoder batches every camera together: all cameras need one shape")
        if self.kind == "lerobot" and not 1 <= len(self.low_dim) <= 2:
            raise _bad("low_dim", "LeRobot needs the state (first) and at most an environment state (second)")
        if self.kind == "lerobot" and self.feature_dim != 2 * self.num_keypoints:
            raise _bad("feature_dim", f"LeRobot's out layer is Linear(2K, 2K): must be {2 * self.num_keypoints}")
        if self.kind == "dp_image" and self.feature_dim != 8 * self.width:
            raise _bad("feature_dim", f"DP image features are the pooled trunk channels: must be {8 * self.width}")
        if self.imagenet_norm and self.kind != "dp_image":
            raise _bad("imagenet_norm", "only DP image's encoder normalises inside (LeRobot: use image_mean/std)")

    def _check_stats(self) -> None:
        if (self.image_mean is None) != (self.image_std is None):
            raise _bad("image_mean" if self.image_mean is None else "image_std", "give both mean and std, or neither")
        if self.image_mean is None:
            return
        if self.kind != "lerobot":
            raise _bad("image_mean", "per-camera mean/std stats are LeRobot's (DP: range normaliser, imagenet_norm)")
        for name in ("image_mean", "image_std"):
            stats = dict(getattr(self, name))
            if tuple(stats) != self.camera_names:
                raise _bad(name, f"cameras {list(stats)} must be {list(self.camera_names)}")
            for cam, values in stats.items():
                channels = dict(self.cameras)[cam][0]
                if len(values) != channels or not all(math.isfinite(v) for v in values):
                    raise _bad(name, f"{cam!r} needs {channels} finite values, got {list(values)}")
                if name == "image_std" and min(values) <= 0:
                    raise _bad(name, f"{cam!r} std must be > 0, got {list(values)}")

    def _check_order(self) -> None:
        order = self.feature_order or ()
        everything = set(self.camera_names + self.low_dim_names)
        if len(order) != len(set(order)) or set(order) != everything:
            raise _bad("feature_order", f"{list(order)} must list each of {sorted(everything)} exactly once")
        if self.kind != "robomimic" and order != self.source_order():
            raise _bad("feature_order", f"{self.kind} concatenates as {list(self.source_order())}, not {list(order)}")


def _pairs(value: Any, name: str, convert: Any) -> tuple[tuple[str, Any], ...]:
    items: Iterable[Any] = value.items() if isinstance(value, Mapping) else value
    try:
        return tuple((str(k), convert(v)) for k, v in items)
    except (TypeError, ValueError) as err:
        raise _bad(name, f"expected name -> value pairs, got {value!r} ({err})") from err


def _int_tuple(value: Any, name: str, length: int) -> tuple[int, ...]:
    try:
        out = tuple(exact_int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise _bad(name, f"expected {length} integers, got {value!r}") from err
    if len(out) != length:
        raise _bad(name, f"expected {length} integers, got {list(out)}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Image normalisation (the policy's side) and crops
# ----------------------------------------------------------------------------------------------------------------


def imagenet_normalize(x: Tensor) -> Tensor:
    """DP image's in-encoder step (torchvision ``Normalize``): ``(x - m) / s``, applied to [-1, 1] input as DP does."""
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


class ImageNormalizer(nn.Module):
    """Camera images in [0, 1] -> what the source's encoder receives: the step the source's *policy* owns.

    robomimic / DP image: DP's ``get_image_range_normalizer`` (``x * 2 + (-1)``, to [-1, 1]); LeRobot: MEAN_STD
    ``(x - mean) / (std + 1e-8)`` with the processor's per-camera stats. Input and output: ``{camera: (..., C, H,
    W)}``. Kept out of ``ObservationEncoder`` so that a policy can apply it once and read the stats from its own
    normaliser files.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.kind = config.kind
        self.cameras = config.camera_names
        if config.kind == "lerobot":
            mean = dict(config.image_mean) if config.image_mean else {c: IMAGENET_MEAN for c in self.cameras}
            std = dict(config.image_std) if config.image_std else {c: IMAGENET_STD for c in self.cameras}
            for i, cam in enumerate(self.cameras):
                self.register_buffer(f"mean_{i}", torch.tensor(mean[cam]).view(-1, 1, 1), persistent=False)
                self.register_buffer(f"std_{i}", torch.tensor(std[cam]).view(-1, 1, 1), persistent=False)

    def forward(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for i, cam in enumerate(self.cameras):
            x = images[cam]
            if self.kind == "lerobot":
                out[cam] = (x - getattr(self, f"mean_{i}")) / (getattr(self, f"std_{i}") + LEROBOT_EPS)
            else:
                out[cam] = x * 2.0 + (-1.0)
        return out


def random_crop(x: Tensor, crop_shape: tuple[int, int]) -> Tensor:
    """DP's ``CropRandomizer`` in training (robomimic's ``sample_random_image_crops``): every image of ``(N, C, H, W)``
    gets its own offset ``floor((H - h) * U[0, 1))`` (drawn from torch's global generator, rows then columns), so
    the training images are shifted by up to ``H - h - 1`` pixels around the evaluation crop."""
    n, c, h, w = x.shape
    ch, cw = crop_shape
    top = ((h - ch) * torch.rand(n, 1, device=x.device)).long()
    left = ((w - cw) * torch.rand(n, 1, device=x.device)).long()
    rows = (top + torch.arange(ch, device=x.device))[:, None, :, None]  # (N, 1, ch, 1)
    cols = (left + torch.arange(cw, device=x.device))[:, None, None, :]  # (N, 1, 1, cw)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return x[batch, channel, rows, cols]


def center_crop(x: Tensor, crop_shape: tuple[int, int]) -> Tensor:
    """torchvision's ``center_crop`` for a crop no larger than the image: offsets ``int(round((H - h) / 2))``.

    Python's ``round`` rounds halves to even, so an odd margin of 5 starts the crop at 2, one of 3 at 2 as well.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])  # ints also while traced for export (the image size is fixed)
    ch, cw = crop_shape
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return x[..., top : top + ch, left : left + cw]


# ----------------------------------------------------------------------------------------------------------------
# ResNet-18 trunk (torchvision's names and math)
# ----------------------------------------------------------------------------------------------------------------


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "group":  # DP's / LeRobot's replace_submodules swap
        return nn.GroupNorm(num_groups=channels // 16, num_channels=channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: names ``conv1, bn1, conv2, bn2, downsample.0, downsample.1``."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = _norm_layer(norm, channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _norm_layer(norm, channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), _norm_layer(norm, channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Trunk(nn.Sequential):
    """torchvision ``resnet18(...).children()[:-2]``: ``0 conv1, 1 bn1, 2 relu, 3 maxpool, 4..7 layer1..4``.

    ``width`` scales every stage (w, 2w, 4w, 8w; 64 = torchvision). Output: ``(N, 8w, ceil(H/32), ceil(W/32))``.
    Initialised as torchvision does (He fan-out convs, unit norms); real weights come from ``convert_state_dict``.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, norm: str = "group") -> None:
        widths = (width, 2 * width, 4 * width, 8 * width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
            _norm_layer(norm, width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ]
        previous = width
        for i, channels in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Sequential(BasicBlock(previous, channels, stride, norm), BasicBlock(channels, channels, 1, norm))
            )
            previous = channels
        super().__init__(*layers)
        self.out_channels = 8 * width
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)


def trunk_output_hw(hw: tuple[int, int]) -> tuple[int, int]:
    """Feature-map size after the trunk: each of its five stride-2 ops maps n to ceil(n / 2)."""
    return (math.ceil(hw[0] / 32), math.ceil(hw[1] / 32))


# ----------------------------------------------------------------------------------------------------------------
# Spatial softmax (two sources, two layouts)
# ----------------------------------------------------------------------------------------------------------------


def _numpy_grid(h: int, w: int) -> tuple[Tensor, Tensor]:
    # Both sources build the grid with numpy linspace (torch.linspace rounds differently in the last bit).
    pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, w), np.linspace(-1.0, 1.0, h))
    return torch.from_numpy(pos_x.reshape(-1)).float(), torch.from_numpy(pos_y.reshape(-1)).float()


class RobomimicSpatialSoftmax(nn.Module):
    """robomimic's ``SpatialSoftmax`` at evaluation (noise_std 0): ``nets``, ``temperature``, ``pos_x``, ``pos_y``.

    Output ``(N, K, 2)`` = per keypoint ``[E[x], E[y]]`` of ``softmax(conv1x1(f) / temperature)`` over the H*W grid.
    """

    def __init__(self, in_channels: int, hw: tuple[int, int], num_kp: int = 32, temperature: float = 1.0) -> None:
        super().__init__()
        self.in_h, self.in_w = hw
        self.num_kp = num_kp
        self.nets = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        self.register_buffer("temperature", torch.ones(1) * temperature)
        pos_x, pos_y = _numpy_grid(self.in_h, self.in_w)
        self.register_buffer("pos_x", pos_x.view(1, -1))
        self.register_buffer("pos_y", pos_y.view(1, -1))

    def forward(self, feature: Tensor) -> Tensor:
        feature = self.nets(feature).reshape(-1, self.in_h * self.in_w)
        attention = F.softmax(feature / self.temperature, dim=-1)
        expected_x = torch.sum(self.pos_x * attention, dim=1, keepdim=True)
        expected_y = torch.sum(self.pos_y * attention, dim=1, keepdim=True)
        return torch.cat([expected_x, expected_y], 1).view(-1, self.num_kp, 2)


class LeRobotSpatialSoftmax(nn.Module):
    """LeRobot's ``SpatialSoftmax``: names ``nets``, ``pos_grid`` (H*W, 2); ``softmax(conv1x1(f)) @ pos_grid``."""

    def __init__(self, in_channels: int, hw: tuple[int, int], num_kp: int = 32) -> None:
        super().__init__()
        self.in_h, self.in_w = hw
        self.num_kp = num_kp
        self.nets = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        pos_x, pos_y = _numpy_grid(self.in_h, self.in_w)
        self.register_buffer("pos_grid", torch.stack([pos_x, pos_y], dim=1))

    def forward(self, features: Tensor) -> Tensor:
        features = self.nets(features).reshape(-1, self.in_h * self.in_w)
        attention = F.softmax(features, dim=-1)
        return (attention @ self.pos_grid).view(-1, self.num_kp, 2)


# ----------------------------------------------------------------------------------------------------------------
# Per-camera cores (input: the cropped, source-normalised image (N, C, h, w); output (N, feature))
# ----------------------------------------------------------------------------------------------------------------


class RobomimicVisualCore(nn.Module):
    """robomimic ``VisualCore`` (backbone -> pool -> Flatten -> Linear), *before* the encoder's ReLU.

    Names: ``backbone.N`` (robomimic: ``backbone.nets.N``), ``pool.*``, ``out`` (robomimic: ``nets.3``).
    """

    def __init__(self, config: EncoderConfig, camera: str) -> None:
        super().__init__()
        channels = dict(config.cameras)[camera][0]
        self.backbone = ResNet18Trunk(channels, config.width, config.norm)
        hw = trunk_output_hw(config.trunk_input_hw(camera))
        self.pool = RobomimicSpatialSoftmax(self.backbone.out_channels, hw, config.num_keypoints, config.temperature)
        self.out = nn.Linear(2 * config.num_keypoints, config.feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.flatten(self.pool(self.backbone(x)), start_dim=1))


class DPResNetCore(nn.Module):
    """DP image's ``get_resnet("resnet18")`` with ``fc = Identity``: trunk -> AdaptiveAvgPool2d(1) -> flatten."""

    def __init__(self, config: EncoderConfig, camera: str) -> None:
        super().__init__()
        self.backbone = ResNet18Trunk(dict(config.cameras)[camera][0], config.width, config.norm)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.backbone(x)), 1)


class LeRobotRgbCore(nn.Module):
    """LeRobot ``DiffusionRgbEncoder`` after its crop: ``relu(out(flatten(pool(backbone(x)))))``."""

    def __init__(self, config: EncoderConfig, camera: str) -> None:
        super().__init__()
        self.backbone = ResNet18Trunk(dict(config.cameras)[camera][0], config.width, config.norm)
        hw = trunk_output_hw(config.trunk_input_hw(camera))
        self.pool = LeRobotSpatialSoftmax(self.backbone.out_channels, hw, config.num_keypoints)
        self.out = nn.Linear(2 * config.num_keypoints, config.feature_dim)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.out(torch.flatten(self.pool(self.backbone(x)), start_dim=1)))


_CORES = {"robomimic": RobomimicVisualCore, "dp_image": DPResNetCore, "lerobot": LeRobotRgbCore}


# ----------------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------------


class ObservationEncoder(nn.Module):
    """Images + low-dim history -> the global condition the source feeds its U-Net, ``(B, To * step_feature_dim)``.

    ``forward(images, low_dim)``: ``images[camera]`` is ``(B, To, C, H, W)`` as the source's encoder receives it
    (robomimic / DP image: [-1, 1]; LeRobot: MEAN_STD normalised; see ``ImageNormalizer``), ``low_dim`` is
    ``(B, To, sum of low_dim dims)`` in ``config.low_dim`` order (or ``None`` without low-dim keys). Per step the
    features follow ``config.feature_order``; steps follow one another (DP: ``reshape(B, -1)`` of the (B*To) rows;
    LeRobot: ``flatten(start_dim=1)``). Cores: ``cores.{i}`` per camera in ``config.cameras`` order, or one
    ``cores.0`` when shared. In training mode (robomimic, DP image) each image gets its own random crop
    (:func:`random_crop`); at evaluation the center crop.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        core = _CORES[config.kind]
        cameras = config.camera_names[:1] if config.shared else config.camera_names
        self.cores = nn.ModuleList([core(config, cam) for cam in cameras])

    @property
    def output_dim(self) -> int:
        """Features per observation step (multiply by To for the global-condition width)."""
        return self.config.step_feature_dim()

    def _prepare(self, x: Tensor) -> Tensor:
        if self.config.kind == "dp_image" and self.config.imagenet_norm:
            x = imagenet_normalize(x)
        if self.config.applies_crop():  # DP's CropRandomizer: random in training, center at evaluation
            crop = random_crop if self.training else center_crop
            x = crop(x, self.config.crop_shape)  # type: ignore[arg-type]
        return x

    def encode_cameras(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{camera: (N, C, H, W)}`` -> ``{camera: (N, camera_feature_dim)}``, batched as the source batches."""
        cfg = self.config
        cams = cfg.camera_names
        prepared = [self._prepare(images[cam]) for cam in cams]
        if not cfg.shared:
            feats = [self.cores[i](x) for i, x in enumerate(prepared)]
            if cfg.kind == "robomimic":  # ObservationEncoder's feature_activation, after each obs net
                feats = [F.relu(f) for f in feats]
            return dict(zip(cams, feats, strict=True))
        n = prepared[0].shape[0]
        if cfg.kind == "dp_image":  # torch.cat over keys: camera-major rows (k * N + row)
            out = self.cores[0](torch.cat(prepared, dim=0)).reshape(len(cams), n, -1)
            return {cam: out[k] for k, cam in enumerate(cams)}
        # LeRobot "(b s n)": camera-minor rows (row * n_cams + k)
        stacked = torch.stack(prepared, dim=1).reshape(n * len(cams), *prepared[0].shape[1:])
        out = self.cores[0](stacked).reshape(n, len(cams), -1)
        return {cam: out[:, k] for k, cam in enumerate(cams)}

    def forward(self, images: Mapping[str, Tensor], low_dim: Tensor | None = None) -> Tensor:
        if self.training and self.config.kind == "lerobot":
            raise RuntimeError(
                "a LeRobot encoder reproduces evaluation only (its training crop is one RandomCrop per batch, not "
                "reproduced): call .eval() first"
            )
        cfg = self.config
        missing = [cam for cam in cfg.camera_names if cam not in images]
        if missing:
            raise ObservationError(f"images: camera {missing[0]!r} missing (expected {list(cfg.camera_names)})")
        first = images[cfg.camera_names[0]]
        if first.dim() != 5:
            raise ObservationError(
                f"images[{cfg.camera_names[0]!r}]: expected (B, To, C, H, W), got {tuple(first.shape)}"
            )
        b, to = first.shape[:2]
        flat = {}
        for cam, shape in cfg.cameras:
            x = images[cam]
            if tuple(x.shape) != (b, to, *shape):
                raise ObservationError(f"images[{cam!r}]: expected {(b, to, *shape)}, got {tuple(x.shape)}")
            flat[cam] = x.reshape(b * to, *shape)  # row = b * To + t, as DP's x[:, :To].reshape(-1, ...)
        parts: dict[str, Tensor] = {cam: f.reshape(b, to, -1) for cam, f in self.encode_cameras(flat).items()}
        if cfg.low_dim:
            if low_dim is None or tuple(low_dim.shape) != (b, to, cfg.low_dim_total):
                got = None if low_dim is None else tuple(low_dim.shape)
                raise ObservationError(f"low_dim: expected {(b, to, cfg.low_dim_total)}, got {got}")
            start = 0
            for name, dim in cfg.low_dim:
                parts[name] = low_dim[..., start : start + dim].to(first.dtype)
                start += dim
        per_step = torch.cat([parts[name] for name in cfg.feature_order or ()], dim=-1)
        return per_step.reshape(b, to * per_step.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# Source state dicts -> ObservationEncoder state dicts
# ----------------------------------------------------------------------------------------------------------------


def _expected_state(config: EncoderConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        module = ObservationEncoder(config)
    return {k: v.shape for k, v in module.state_dict().items()}


def _split_camera(rest: str, names: Iterable[str], kind: str, key: str) -> tuple[str, str]:
    for name in sorted(names, key=len, reverse=True):  # camera names may contain dots: longest match first
        if rest.startswith(name + "."):
            return name, rest[len(name) + 1 :]
    raise StateDictKeyError(f"{kind} state dict: unexpected key {key!r} (no such camera in the config)")


def _trunk_key(rest: str, kind: str, key: str) -> str:
    """DP image (torchvision) trunk names -> ``backbone.N``: conv1 -> 0, bn1 -> 1, layerK -> K + 3."""
    head, _, tail = rest.partition(".")
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}.get(head)
    if index is None or not tail:
        raise StateDictKeyError(f"{kind} state dict: unexpected key {key!r}")
    return f"backbone.{index}.{tail}"


def _source_name(ours: str, config: EncoderConfig, prefix: str) -> str:
    """Where the source keeps our key ``ours`` (for error messages)."""
    _, index, tail = ours.split(".", 2)
    i = int(index)
    if config.kind == "lerobot":
        return f"{prefix}{tail}" if config.shared else f"{prefix}{i}.{tail}"
    cam = "rgb" if config.shared else config.camera_names[i]
    if config.kind == "dp_image":
        _, number, inner = tail.split(".", 2)
        head = {0: "conv1", 1: "bn1"}.get(int(number), f"layer{int(number) - 3}")
        return f"{prefix}key_model_map.{cam}.{head}.{inner}"
    for mine, theirs in (("backbone.", "backbone.nets."), ("pool.", "pool."), ("out.", "nets.3.")):
        if tail.startswith(mine):
            tail = theirs + tail[len(mine) :]
            break
    return f"{prefix}obs_nets.{cam}.{tail}"


def _finish(kind: str, mapped: dict[str, tuple[str, Tensor]], config: EncoderConfig, prefix: str) -> dict[str, Tensor]:
    expected = _expected_state(config)
    for ours, (theirs, tensor) in mapped.items():
        if ours not in expected:
            raise StateDictKeyError(f"{kind} state dict: unexpected key {theirs!r} (not in this config's encoder)")
        if tuple(tensor.shape) != tuple(expected[ours]):
            raise StateDictKeyError(
                f"{kind} state dict: key {theirs!r} has shape {list(tensor.shape)}, the config needs "
                f"{list(expected[ours])}"
            )
    for ours in expected:
        if ours not in mapped:
            raise StateDictKeyError(f"{kind} state dict: missing key {_source_name(ours, config, prefix)!r}")
    return {ours: tensor for ours, (_, tensor) in mapped.items()}


def _put(mapped: dict[str, tuple[str, Tensor]], ours: str, theirs: str, tensor: Tensor, kind: str) -> None:
    if ours in mapped:  # robomimic's aliases (nets.0 = backbone, nets.1 = pool) must hold the same tensor
        other, previous = mapped[ours]
        if previous.shape != tensor.shape or not torch.equal(previous, tensor):
            raise StateDictKeyError(f"{kind} state dict: {theirs!r} differs from its alias {other!r}")
        return
    mapped[ours] = (theirs, tensor)


def convert_robomimic_state_dict(
    state_dict: Mapping[str, Tensor], config: EncoderConfig, prefix: str = "obs_encoder."
) -> dict[str, Tensor]:
    """DP hybrid policy's ``obs_encoder.*`` keys -> ``ObservationEncoder`` keys (other keys are ignored).

    ``obs_nets.<cam>.backbone.nets.N.*`` and its alias ``obs_nets.<cam>.nets.0.nets.N.*`` -> ``cores.i.backbone.N.*``;
    ``obs_nets.<cam>.pool.*`` / ``nets.1.*`` -> ``cores.i.pool.*``; ``obs_nets.<cam>.nets.3.*`` -> ``cores.i.out.*``.
    Aliases must agree. A key under ``prefix`` that maps nowhere, or a missing one, is a ``StateDictKeyError``.
    """
    kind = "robomimic"
    mapped: dict[str, tuple[str, Tensor]] = {}
    index = {cam: i for i, cam in enumerate(config.camera_names)}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if not rest.startswith("obs_nets."):
            raise StateDictKeyError(f"{kind} state dict: unexpected key {key!r}")
        cam, tail = _split_camera(rest[len("obs_nets.") :], index, kind, key)
        for theirs, ours in (
            ("backbone.nets.", "backbone."),
            ("nets.0.nets.", "backbone."),
            ("pool.", "pool."),
            ("nets.1.", "pool."),
            ("nets.3.", "out."),
        ):
            if tail.startswith(theirs):
                _put(mapped, f"cores.{index[cam]}.{ours}{tail[len(theirs) :]}", key, tensor, kind)
                break
        else:
            raise StateDictKeyError(f"{kind} state dict: unexpected key {key!r}")
    return _finish(kind, mapped, config, prefix)


def convert_dp_image_state_dict(
    state_dict: Mapping[str, Tensor], config: EncoderConfig, prefix: str = "obs_encoder."
) -> dict[str, Tensor]:
    """DP image policy's ``obs_encoder.*`` keys -> ``ObservationEncoder`` keys (other keys are ignored).

    ``key_model_map.<cam>.{conv1, bn1, layer1..4}.*`` (``key_model_map.rgb`` when shared) ->
    ``cores.i.backbone.{0, 1, 4..7}.*``; ``_dummy_variable`` (DP's ModuleAttrMixin) is dropped.
    """
    kind = "dp_image"
    mapped: dict[str, tuple[str, Tensor]] = {}
    index = {"rgb": 0} if config.shared else {cam: i for i, cam in enumerate(config.camera_names)}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest == "_dummy_variable":
            continue
        if not rest.startswith("key_model_map."):
            raise StateDictKeyError(f"{kind} state dict: unexpected key {key!r}")
        cam, tail = _split_camera(rest[len("key_model_map.") :], index, kind, key)
        _put(mapped, f"cores.{index[cam]}.{_trunk_key(tail, kind, key)}", key, tensor, kind)
    return _finish(kind, mapped, config, prefix)


def convert_lerobot_state_dict(
    state_dict: Mapping[str, Tensor], config: EncoderConfig, prefix: str = "diffusion.rgb_encoder."
) -> dict[str, Tensor]:
    """LeRobot's ``diffusion.rgb_encoder.{i}.*`` (or ``diffusion.rgb_encoder.*`` when shared) -> ``cores.i.*``.

    The inner names (``backbone.N``, ``pool.nets``, ``pool.pos_grid``, ``out``) are LeRobot's own.
    """
    kind = "lerobot"
    mapped: dict[str, tuple[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if config.shared:
            _put(mapped, f"cores.0.{rest}", key, tensor, kind)
            continue
        head, _, tail = rest.partition(".")
        if not head.isdigit() or not tail:
            raise StateDictKeyError(f"{kind} state dict: unexpected key {key!r} (expected rgb_encoder.<i>.*)")
        _put(mapped, f"cores.{int(head)}.{tail}", key, tensor, kind)
    return _finish(kind, mapped, config, prefix)


_CONVERTERS = {
    "robomimic": convert_robomimic_state_dict,
    "dp_image": convert_dp_image_state_dict,
    "lerobot": convert_lerobot_state_dict,
}


def convert_state_dict(
    state_dict: Mapping[str, Tensor], config: EncoderConfig, prefix: str | None = None
) -> dict[str, Tensor]:
    """The source's state dict (whole policy or encoder only, with ``prefix``) -> ``ObservationEncoder`` keys.

    ``prefix`` defaults to where the source keeps its encoder: ``obs_encoder.`` (DP) or ``diffusion.rgb_encoder.``
    (LeRobot); pass ``""`` for a bare encoder state dict.
    """
    return _CONVERTERS[config.kind](state_dict, config, DEFAULT_PREFIX[config.kind] if prefix is None else prefix)


def load_source_state_dict(
    encoder: ObservationEncoder, state_dict: Mapping[str, Tensor], prefix: str | None = None
) -> ObservationEncoder:
    """Convert and load (``strict=True``) a source state dict into ``encoder``; returns it for chaining."""
    encoder.load_state_dict(convert_state_dict(state_dict, encoder.config, prefix), strict=True)
    return encoder
