"""Camera-image Diffusion Policies from the sources' files: DP's hybrid and image workspace ``.ckpt`` and LeRobot
directories with cameras load as the policy they hold, reproduce the source's condition, epsilon and actions, convert
to our format bit for bit, and what cannot be run exactly is refused in one line naming the field.

The files come from ``tests/format_builders.py`` (each project's key names and config layout). "The source's math"
here: its normalisation restated (DP: ``x * scale + offset`` per key from the file's normalizer; LeRobot: the
processor's MEAN_STD / MIN_MAX from its safetensors), its encoder as ``ObservationEncoder`` loaded from the file's
encoder tensors (``tests/test_vision.py`` checks that against each source), and its U-Net (DP's names are ours;
LeRobot's module layout is :class:`format_builders.LeRobotUnet`). Tiny networks: ResNet width 8 or 16 on 3x40x40
images cropped to 36x36, the smallest size at which the trunk's feature map is 2x2 (at 32x32 a spatial softmax sees
a 1x1 map and its keypoints do not depend on the image).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import dill
import numpy as np
import pytest
import torch
from format_builders import LeRobotUnet, dp_image_policy_state_dict, write_dp_ckpt, write_lerobot_dir
from safetensors.torch import load_file, save_file
from test_vision import randomize

from policy_accel.io.checkpoint import CheckpointError, load_policy, read_checkpoint
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.unet import UNetConfig
from policy_accel.model.vision import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, ObservationEncoder
from policy_accel.model.vision import load_source_state_dict as load_encoder
from policy_accel.policy import DiffusionPolicy, PolicyConfig, build_denoiser
from policy_accel.schedule import ScheduleConfig
from policy_accel.solvers import make_solver

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 40, 40)
CROP = (36, 36)


def _f32(values: tuple[float, ...]) -> tuple[float, ...]:
    """Statistics as a float32 file stores them (what the reader reads back)."""
    return tuple(float(v) for v in torch.tensor(values, dtype=torch.float32))


ENCODERS = {
    # DP's hybrid policy (robomimic encoder, PushT-image's GroupNorm and eval center crop); shape_meta interleaves
    # cameras and low-dim keys, and robomimic concatenates in that order
    "dp_hybrid": EncoderConfig(
        kind="robomimic",
        cameras={"image": SHAPE, "wrist": SHAPE},
        low_dim={"agent_pos": 2, "gripper": 1},
        feature_order=("image", "agent_pos", "wrist", "gripper"),
        crop_shape=CROP,
        width=16,
        norm="group",
    ),
    # DP's image policy as the real-robot config (GroupNorm, per-camera ResNets, ImageNet inside), cameras unsorted
    "dp_image": EncoderConfig(
        kind="dp_image",
        cameras={"wrist": SHAPE, "image": SHAPE},
        low_dim={"robot_eef_pose": 3, "gripper": 1},
        crop_shape=CROP,
        imagenet_norm=True,
        width=16,
        norm="group",
        feature_dim=128,
    ),
    # one shared BatchNorm ResNet, cameras only
    "dp_image_shared": EncoderConfig(
        kind="dp_image",
        cameras={"left": SHAPE, "right": SHAPE},
        crop_shape=CROP,
        width=8,
        norm="batch",
        feature_dim=64,
        shared=True,
    ),
    # LeRobot 0.6: a ResNet per camera, ImageNet statistics, state + environment state
    "lerobot": EncoderConfig(
        kind="lerobot",
        cameras={"observation.images.top": SHAPE, "observation.images.wrist": SHAPE},
        low_dim={"observation.state": 2, "observation.environment_state": 3},
        crop_shape=CROP,
        width=16,
        norm="group",
        image_mean={c: _f32(IMAGENET_MEAN) for c in ("observation.images.top", "observation.images.wrist")},
        image_std={c: _f32(IMAGENET_STD) for c in ("observation.images.top", "observation.images.wrist")},
    ),
    # lerobot/diffusion_pusht's layout: one camera, a shared encoder, mean 0.5 / std 0.5; BatchNorm to vary it
    "lerobot_pusht": EncoderConfig(
        kind="lerobot",
        cameras={"observation.image": SHAPE},
        low_dim={"observation.state": 2},
        crop_shape=CROP,
        width=8,
        norm="batch",
        shared=True,
        image_mean={"observation.image": (0.5, 0.5, 0.5)},
        image_std={"observation.image": (0.5, 0.5, 0.5)},
    ),
}
CASES = list(ENCODERS)


def image_policy(encoder: EncoderConfig) -> DiffusionPolicy:
    """A random image policy (DDIM-8 of 100, a small U-Net) around ``encoder``."""
    torch.manual_seed(0)
    unet = UNetConfig(
        input_dim=2, global_cond_dim=2 * encoder.step_feature_dim(), down_dims=[16, 32], diffusion_step_embed_dim=16
    )
    config = PolicyConfig(
        task="pusht_image",
        obs_dim=encoder.low_dim_total,
        action_dim=2,
        horizon=16,
        n_obs_steps=2,
        n_action_steps=8,
        unet=unet,
        encoder=encoder,
        schedule=ScheduleConfig(kind="ddim", num_train_timesteps=100, num_inference_steps=8),
    )
    g = torch.Generator().manual_seed(1)
    obs_norm = (
        LinearNormalizer.fit(torch.rand(50, encoder.low_dim_total, generator=g) * 512)
        if encoder.low_dim
        else LinearNormalizer(torch.zeros(0), torch.zeros(0))
    )
    return DiffusionPolicy(
        config,
        randomize(build_denoiser(config), seed=3),
        obs_norm,
        LinearNormalizer.fit(torch.rand(50, 2, generator=g) * 512),
        randomize(ObservationEncoder(encoder), seed=2),
    )


@pytest.fixture(scope="module")
def policies() -> dict[str, DiffusionPolicy]:
    return {case: image_policy(encoder) for case, encoder in ENCODERS.items()}


def write(case: str, policy: DiffusionPolicy, tmp_path: Path, **kwargs) -> Path:
    if case.startswith("dp"):
        return write_dp_ckpt(policy, tmp_path / "epoch=0100-test_mean_score=0.900.ckpt", **kwargs)
    return write_lerobot_dir(policy, tmp_path / "pretrained_model", state_dim=2, **kwargs)


def observations(encoder: EncoderConfig, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """(B, To, ...) history: float32 CHW images in [0, 1] (as DP's and LeRobot's environments give them), raw
    low-dim values."""
    rng = np.random.default_rng(seed)
    obs = {name: rng.random((batch, 2, *shape), dtype=np.float32) for name, shape in encoder.cameras}
    obs.update({name: rng.uniform(0, 512, (batch, 2, dim)).astype(np.float32) for name, dim in encoder.low_dim})
    return obs


def source_condition(case: str, policy: DiffusionPolicy, path: Path, obs: dict) -> torch.Tensor:
    """The source's global condition: its normalisation restated, its encoder loaded from its own tensors."""
    enc = policy.config.encoder
    t = {k: torch.as_tensor(v) for k, v in obs.items()}
    if case.startswith("dp"):  # DP's LinearNormalizer: x * scale + offset with each key's parameters
        state = dp_image_policy_state_dict(policy)
        params = lambda k, s: state[f"normalizer.params_dict.{k}.{s}"]  # noqa: E731
        normalized = {k: v * params(k, "scale") + params(k, "offset") for k, v in t.items()}
    else:  # LeRobot's NormalizerProcessorStep, statistics from the processor's safetensors
        stats = load_file(str(path / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
        normalized = {}
        for k, v in t.items():
            if k in enc.camera_names:
                normalized[k] = (v - stats[f"{k}.mean"]) / (stats[f"{k}.std"] + 1e-8)
            else:
                lo, hi = stats[f"{k}.min"], stats[f"{k}.max"]
                normalized[k] = 2 * (v - lo) / (hi - lo) - 1
        state = load_file(str(path / "model.safetensors"))
    encoder = load_encoder(ObservationEncoder(enc), state).eval()
    low = torch.cat([normalized[k] for k in enc.low_dim_names], dim=-1) if enc.low_dim else None
    with torch.no_grad():
        return encoder({k: normalized[k] for k in enc.camera_names}, low)


def source_epsilon(case: str, policy: DiffusionPolicy, path: Path, x, t, cond) -> torch.Tensor:
    if case.startswith("dp"):  # DP's ConditionalUnet1D has our names: the file's model.* tensors load as they are
        state = dp_image_policy_state_dict(policy)
        net = build_denoiser(policy.config)
        net.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
    else:
        net = LeRobotUnet(json.loads((path / "config.json").read_text()))
        tensors = load_file(str(path / "model.safetensors"))
        net.load_state_dict({k[len("diffusion.unet.") :]: v for k, v in tensors.items() if "unet" in k}, strict=True)
    with torch.no_grad():
        return net.eval()(x, t, cond)


def actions(policy: DiffusionPolicy, obs: dict) -> np.ndarray:
    out, _ = policy.predict_action(obs, make_solver("sequential"), generator=torch.Generator().manual_seed(0))
    return out


# -- loading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_loads_and_gives_the_sources_condition_epsilon_and_actions(case, policies, tmp_path):
    original = policies[case]
    path = write(case, original, tmp_path)
    loaded = read_checkpoint(path, trust_pickle=True)
    policy = loaded.policy
    # every encoder field read from the file (or its weights); the task from DP's cfg, LeRobot's train_config.json
    assert policy.config == replace(original.config, task=policy.config.task)
    obs = observations(original.config.encoder)
    cond = policy.condition(obs)
    expected = source_condition(case, original, path, obs)
    exact = case.startswith("dp")  # LeRobot's MIN_MAX is (x - min) * 2 / (max - min) - 1, ours one affine map
    if exact:
        assert torch.equal(cond, expected)
        assert loaded.info["weights"] == "ema_model"
    else:
        torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 2, generator=g)
    t = torch.tensor([99, 3])
    with torch.no_grad():
        eps = policy.denoiser(x, t, expected)
    reference = source_epsilon(case, original, path, x, t, expected)
    if exact:
        assert torch.equal(eps, reference)
        np.testing.assert_array_equal(actions(policy, obs), actions(original, obs))
    else:
        torch.testing.assert_close(eps, reference, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(actions(policy, obs), actions(original, obs), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("case", CASES)
def test_converts_to_our_format_and_reloads_bit_exactly(case, policies, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert", ROOT / "eval" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    src, dst = write(case, policies[case], tmp_path), tmp_path / "ours"
    assert convert.main([str(src), str(dst), "--trust-pickle"]) == 0
    assert "encoder:" in capsys.readouterr().out
    source = read_checkpoint(src, trust_pickle=True).policy
    converted = load_policy(dst, engine="torch")
    assert converted.config == source.config
    for mine, theirs in ((source.model, converted.model), (source.encoder, converted.encoder)):
        ours = theirs.state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in mine.state_dict().items())
    obs = observations(source.config.encoder, seed=1)
    assert torch.equal(converted.condition(obs), source.condition(obs))
    np.testing.assert_array_equal(actions(converted, obs), actions(source, obs))


def test_dp_shared_model_keeps_batch_norm_whatever_use_group_norm_says(policies, tmp_path):
    """DP swaps BatchNorm for GroupNorm only in per-camera copies: a shared model with use_group_norm=True is BN."""
    path = write("dp_image_shared", policies["dp_image_shared"], tmp_path)
    _edit_ckpt(path, lambda p: p["cfg"]["policy"]["obs_encoder"].update(use_group_norm=True))
    assert read_checkpoint(path, trust_pickle=True).policy.config.encoder.norm == "batch"


def test_lerobot_encoder_layout_is_read_from_the_weights_when_config_json_leaves_it_out(policies, tmp_path):
    """LeRobot 0.6.0 flipped the defaults of both fields: without them the weights say which layout it is."""
    path = write("lerobot_pusht", policies["lerobot_pusht"], tmp_path)
    _edit_json(path / "config.json", lambda c: [c.pop("use_separate_rgb_encoder_per_camera"), c.pop("use_group_norm")])
    assert read_checkpoint(path).policy.config.encoder == policies["lerobot_pusht"].config.encoder


@pytest.mark.parametrize("layout", ["legacy", "legacy_shapes"])
def test_lerobot_legacy_image_statistics_in_model_safetensors(layout, policies, tmp_path):
    original = policies["lerobot_pusht"]
    loaded = read_checkpoint(write("lerobot_pusht", original, tmp_path, layout=layout)).policy
    assert loaded.config.encoder == original.config.encoder
    obs = observations(original.config.encoder)
    torch.testing.assert_close(loaded.condition(obs), original.condition(obs), rtol=1e-5, atol=1e-5)


# -- refusals: one line naming the field ---------------------------------------------------------------------------


def _edit_ckpt(path: Path, edit) -> None:
    payload = torch.load(path, pickle_module=dill, weights_only=False)
    payload["cfg"] = dict(payload["cfg"])  # OmegaConf -> plain containers to edit, stored back as DP would
    from omegaconf import OmegaConf

    payload["cfg"] = OmegaConf.to_container(OmegaConf.create(payload["cfg"]))
    edit(payload)
    payload["cfg"] = OmegaConf.create(payload["cfg"])
    torch.save(payload, path, pickle_module=dill)


def _edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _policy_cfg(change):
    return lambda p: change(p["cfg"]["policy"])


def _ema(change):
    return lambda p: change(p["state_dicts"]["ema_model"])


DP_REFUSALS = [
    ("dp_hybrid", _policy_cfg(lambda c: c.update(eval_fixed_crop=False)), "eval_fixed_crop=False"),
    ("dp_hybrid", _policy_cfg(lambda c: c.update(obs_as_global_cond=False)), "obs_as_global_cond=False"),
    ("dp_hybrid", _policy_cfg(lambda c: c["shape_meta"]["obs"]["wrist"].update(type="depth")), "wrist.type='depth'"),
    ("dp_hybrid", _policy_cfg(lambda c: c.update(crop_shape=[40, 40])), "crop_shape"),
    (
        "dp_hybrid",
        _ema(lambda s: s.update({"normalizer.params_dict.image.scale": torch.tensor([1.0])})),
        "normalizer.params_dict.image is not DP's image range normalizer",
    ),
    ("dp_hybrid", _ema(lambda s: s.pop("obs_encoder.obs_nets.wrist.nets.3.bias")), "nets.3.bias"),
    ("dp_hybrid", _ema(lambda s: s.pop("normalizer.params_dict.gripper.offset")), "gripper.offset' missing"),
    ("dp_image", _policy_cfg(lambda c: c["obs_encoder"].update(resize_shape=[32, 32])), "obs_encoder.resize_shape"),
    ("dp_image", _policy_cfg(lambda c: c["obs_encoder"]["rgb_model"].update(weights="r3m")), "rgb_model.weights"),
    ("dp_image", _policy_cfg(lambda c: c["obs_encoder"]["rgb_model"].update(name="resnet50")), "rgb_model"),
    (
        "dp_image",
        _policy_cfg(lambda c: c["obs_encoder"].update(crop_shape={"wrist": [36, 36], "image": [30, 30]})),
        "obs_encoder.crop_shape is per camera",
    ),
    ("dp_image", _policy_cfg(lambda c: c.update(obs_as_global_cond=False)), "obs_as_global_cond=False"),
]


@pytest.mark.parametrize("case,edit,field", DP_REFUSALS, ids=[f"{c}-{f}" for c, _, f in DP_REFUSALS])
def test_dp_image_refusals_are_one_line_naming_the_field(case, edit, field, policies, tmp_path):
    path = write(case, policies[case], tmp_path)
    _edit_ckpt(path, edit)
    with pytest.raises(CheckpointError) as err:
        load_policy(path, trust_pickle=True)
    message = str(err.value)
    assert field in message and "\n" not in message, message


def _stats_file(path: Path) -> Path:
    return path / "policy_preprocessor_step_3_normalizer_processor.safetensors"


def _edit_stats(path: Path, edit) -> None:
    tensors = load_file(str(_stats_file(path)))
    edit(tensors)
    save_file(tensors, str(_stats_file(path)))


def _edit_pre(path: Path, edit) -> None:
    _edit_json(path / "policy_preprocessor.json", lambda raw: edit(raw["steps"][3]["config"]))


LEROBOT_REFUSALS = [
    (lambda p: _edit_json(p / "config.json", lambda c: c.update(resize_shape=[32, 32])), "resize_shape=[32, 32]"),
    (lambda p: _edit_json(p / "config.json", lambda c: c.update(vision_backbone="resnet34")), "vision_backbone"),
    (lambda p: _edit_pre(p, lambda c: c["norm_map"].update(VISUAL="MIN_MAX")), "VISUAL='MIN_MAX'"),
    (lambda p: _edit_pre(p, lambda c: c.update(eps=1e-5)), "eps=1e-05"),
    (lambda p: _edit_stats(p, lambda t: t.pop("observation.images.wrist.std")), "per-channel std"),
    (
        lambda p: _edit_json(p / "config.json", lambda c: c.update(use_separate_rgb_encoder_per_camera=False)),
        "use_separate_rgb_encoder_per_camera=False",
    ),
]


@pytest.mark.parametrize("edit,field", LEROBOT_REFUSALS, ids=[f for _, f in LEROBOT_REFUSALS])
def test_lerobot_image_refusals_are_one_line_naming_the_field(edit, field, policies, tmp_path):
    path = write("lerobot", policies["lerobot"], tmp_path)
    edit(path)
    with pytest.raises(CheckpointError) as err:
        load_policy(path)
    message = str(err.value)
    assert field in message and "\n" not in message, message


def test_lerobot_identity_image_normalization_passes_images_through(policies, tmp_path):
    """VISUAL IDENTITY: mean 0, std 1 (exact: 1 + 1e-8 is 1 in float32)."""
    path = write("lerobot", policies["lerobot"], tmp_path)
    _edit_pre(path, lambda c: c["norm_map"].update(VISUAL="IDENTITY"))
    policy = read_checkpoint(path).policy
    assert dict(policy.config.encoder.image_std)["observation.images.top"] == (1.0, 1.0, 1.0)
    image = torch.rand(2, 3, 40, 40)
    normalized = policy.image_normalizer({"observation.images.top": image, "observation.images.wrist": image})
    assert torch.equal(normalized["observation.images.top"], image)
