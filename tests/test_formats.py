"""Bring your own Diffusion Policy: DP workspace .ckpt and LeRobot directories load as the policy they hold.

The files are built from our own model with each source project's key names and config structure
(``tests/format_builders.py``); the loaded policy must give the original's actions, and broken or unsupported
files must fail with a message that says what is wrong.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from format_builders import (
    LeRobotUnet,
    dp_policy_state_dict,
    dp_workspace_cfg,
    lerobot_config,
    lerobot_unet_state_dict,
    write_dp_ckpt,
    write_lerobot_dir,
)
from safetensors.torch import load_file, save_file

from policy_accel.io.checkpoint import CheckpointError, load_policy, read_checkpoint
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.unet import ConditionalUnet1D, UNetConfig
from policy_accel.policy import DiffusionPolicy, PolicyConfig
from policy_accel.schedule import ScheduleConfig
from policy_accel.solvers import make_solver

ROOT = Path(__file__).resolve().parents[1]
DP_POLICIES = "diffusion_policy.policy."


def _policy(config: PolicyConfig, seed: int = 0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    obs = LinearNormalizer.fit(torch.rand(100, config.obs_dim) * 512)
    act = LinearNormalizer.fit(torch.rand(100, config.action_dim) * 512)
    return DiffusionPolicy(config, ConditionalUnet1D(config.unet), obs, act)


@pytest.fixture(scope="module")
def small_policy() -> DiffusionPolicy:
    """PushT's shapes (obs 18, action 2), a small U-Net."""
    return _policy(PolicyConfig(unet=UNetConfig(down_dims=[16, 32, 64], diffusion_step_embed_dim=32)))


@pytest.fixture(scope="module")
def odd_policy() -> DiffusionPolicy:
    """Nothing at our defaults, so a loader that assumed a value instead of reading it would be caught."""
    unet = UNetConfig(
        input_dim=3,
        global_cond_dim=15,
        diffusion_step_embed_dim=16,
        down_dims=[8, 16],
        kernel_size=3,
        n_groups=4,
        cond_predict_scale=False,
    )
    schedule = ScheduleConfig(
        kind="ddim", num_inference_steps=8, num_train_timesteps=50, beta_schedule="linear", clip_sample=False
    )
    config = PolicyConfig(
        obs_dim=5, action_dim=3, horizon=12, n_obs_steps=3, n_action_steps=4, unet=unet, schedule=schedule
    )
    return _policy(config, seed=1)


def _actions(policy: DiffusionPolicy, steps: int = 10) -> np.ndarray:
    c = policy.config
    obs = np.random.default_rng(0).uniform(0, 512, (2, c.n_obs_steps, c.obs_dim))
    schedule = policy.schedule(num_inference_steps=min(steps, c.schedule.num_train_timesteps))
    actions, _ = policy.predict_action(obs, make_solver("sequential"), schedule, torch.Generator().manual_seed(0))
    return actions


def _write(fmt: str, policy: DiffusionPolicy, tmp_path: Path) -> Path:
    if fmt == "diffusion_policy":
        return write_dp_ckpt(policy, tmp_path / "epoch=0550-test_mean_score=0.969.ckpt")
    return write_lerobot_dir(policy, tmp_path / "pretrained_model", state_dim=2)


def _same_policy(loaded: DiffusionPolicy, original: DiffusionPolicy, exact: bool) -> None:
    c = loaded.config
    assert (c.obs_dim, c.action_dim, c.horizon, c.n_obs_steps, c.n_action_steps) == (
        original.config.obs_dim,
        original.config.action_dim,
        original.config.horizon,
        original.config.n_obs_steps,
        original.config.n_action_steps,
    )
    assert c.unet == original.config.unet and c.schedule == original.config.schedule
    if exact:
        np.testing.assert_array_equal(_actions(loaded), _actions(original))
    else:  # LeRobot's conditioning columns are reordered: the same sums in another order
        np.testing.assert_allclose(_actions(loaded), _actions(original), rtol=1e-5, atol=1e-3)


# -- loading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusion_policy", "lerobot"])
@pytest.mark.parametrize("which", ["small", "odd"])
def test_loaded_policy_gives_the_original_actions_and_reads_its_config(fmt, which, small_policy, odd_policy, tmp_path):
    original = small_policy if which == "small" else odd_policy
    path = _write(fmt, original, tmp_path)
    loaded = read_checkpoint(path, trust_pickle=True)
    assert loaded.format == fmt
    _same_policy(loaded.policy, original, exact=fmt == "diffusion_policy")
    if fmt == "diffusion_policy":
        assert loaded.info["weights"] == "ema_model" and loaded.info["global_step"] == 1234
        assert loaded.policy.config.task == "pusht_lowdim"
        for key, value in original.model.state_dict().items():
            assert torch.equal(loaded.policy.model.state_dict()[key], value)
    else:
        assert [f["key"] for f in loaded.info["observation_layout"]] == [
            "observation.environment_state",
            "observation.state",
        ]
        assert loaded.policy.config.task == "pusht"  # from train_config.json


def test_dp_ckpt_without_ema_uses_model_weights(small_policy, tmp_path):
    cfg = dp_workspace_cfg(small_policy)
    cfg["training"]["use_ema"] = False
    path = write_dp_ckpt(
        small_policy,
        tmp_path / "latest.ckpt",
        cfg=cfg,
        model_state=dp_policy_state_dict(small_policy),
        include_ema=False,
    )
    loaded = read_checkpoint(path, trust_pickle=True)
    assert loaded.info["weights"] == "model"
    np.testing.assert_array_equal(_actions(loaded.policy), _actions(small_policy))


@pytest.mark.parametrize("layout", ["legacy", "legacy_shapes"])
def test_lerobot_legacy_normalization_buffers(layout, small_policy, tmp_path):
    """Exports from before LeRobot's processor pipelines keep the statistics inside model.safetensors."""
    path = write_lerobot_dir(small_policy, tmp_path / "old", layout=layout)
    loaded = read_checkpoint(path)
    assert loaded.info["normalization"]["kind"].startswith("legacy")
    _same_policy(loaded.policy, small_policy, exact=False)


def test_lerobot_file_matches_lerobot_module_layout(small_policy):
    """The written weights load strictly into LeRobot's U-Net layout and compute what ours computes."""
    config = lerobot_config(small_policy, state_dim=2)
    net = LeRobotUnet(config)
    state = {k[len("diffusion.unet.") :]: v for k, v in lerobot_unet_state_dict(small_policy, 2).items()}
    net.load_state_dict(state, strict=True)
    torch.manual_seed(0)
    c = small_policy.config
    x = torch.randn(3, c.horizon, c.action_dim)
    t = torch.tensor([0, 42, 99])
    obs = torch.randn(3, c.n_obs_steps, c.obs_dim)  # ours: [env (16), state (2)] per step
    lerobot_obs = torch.cat([obs[..., 16:], obs[..., :16]], dim=-1)  # LeRobot: [state, env]
    with torch.no_grad():
        ours = small_policy.model(x, t, obs.reshape(3, -1))
        theirs = net(x, t, lerobot_obs.reshape(3, -1))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


# -- pickles ----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: what a hostile .ckpt could do with any callable."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_dp_ckpt_is_refused_by_default_without_unpickling(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.ckpt"
    torch.save({"cfg": {}, "state_dicts": {}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_policy(path)
    message = str(err.value)
    for words in ("pickle", "run arbitrary code", "trust_pickle=True", "trust_pickle=true", "--trust-pickle"):
        assert words in message
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # opting in does unpickle (and then the payload is not a policy)
        load_policy(path, trust_pickle=True)
    assert marker.exists()


def test_not_a_workspace_checkpoint(small_policy, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(small_policy.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a Diffusion Policy workspace checkpoint"):
        load_policy(path, trust_pickle=True)
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither a torch.save archive nor a pickle"):
        load_policy(tmp_path / "notes.ckpt", trust_pickle=True)


# -- broken files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_dp_ckpt(trust, small_policy, tmp_path):
    path = write_dp_ckpt(small_policy, tmp_path / "latest.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_policy(path, trust_pickle=trust)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_policy(path, trust_pickle=trust)


@pytest.mark.parametrize("name", ["model.safetensors", "policy_preprocessor_step_3_normalizer_processor.safetensors"])
def test_truncated_lerobot_files(name, small_policy, tmp_path):
    path = write_lerobot_dir(small_policy, tmp_path / "lr")
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{name} is corrupt or truncated"):
        load_policy(path)


def _edit_dp(path: Path, edit) -> None:
    import dill

    payload = torch.load(path, pickle_module=dill, weights_only=False)
    edit(payload)
    torch.save(payload, path, pickle_module=dill)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("model.final_conv.1.bias"), r"does not match .*missing \['final_conv.1.bias'\]"),
        (lambda sd: sd.update({"model.extra.weight": torch.zeros(1)}), r"unexpected \['extra.weight'\]"),
        (lambda sd: sd.pop("normalizer.params_dict.obs.scale"), "normalizer.params_dict.obs.scale' missing"),
        (
            lambda sd: sd.update({"obs_encoder.obs_nets.image.nets.0.weight": torch.zeros(1)}),
            "low-dim policy, but its weights hold observation-encoder tensors",
        ),
        (lambda sd: sd.update({"normalizer.params_dict.agent_pos.scale": torch.ones(2)}), "does not have"),
        (lambda sd: sd.update({"model.final_conv.1.bias": torch.zeros(5)}), "shapes that do not match"),
    ],
)
def test_dp_wrong_keys_and_shapes(edit, message, small_policy, tmp_path):
    path = write_dp_ckpt(small_policy, tmp_path / "latest.ckpt")
    _edit_dp(path, lambda payload: edit(payload["state_dicts"]["ema_model"]))
    with pytest.raises(CheckpointError, match=message):
        load_policy(path, trust_pickle=True)


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[last] = value


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"policy.model.down_dims": [16, 32, 128]}, "shapes that do not match"),
        ({"policy.model.down_dims": [16, 32]}, "missing"),
        ({"policy.obs_as_local_cond": True}, "local conditioning"),
        ({"policy.pred_action_steps_only": True}, "pred_action_steps_only"),
        ({"policy.oa_step_convention": False}, "oa_step_convention"),
        ({"n_latency_steps": 2}, "n_latency_steps"),
        (
            {"policy._target_": DP_POLICIES + "diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"},
            "cfg has no shape_meta",
        ),
        (
            {"policy._target_": DP_POLICIES + "diffusion_transformer_hybrid_image_policy.DiffusionTransformerHybrid"},
            "DiffusionTransformerHybrid is not supported; only",
        ),
        (
            {"policy._target_": DP_POLICIES + "diffusion_transformer_lowdim_policy.DiffusionTransformerLowdimPolicy"},
            "ConditionalUnet1D is not supported in DiffusionTransformerLowdimPolicy",
        ),
        ({"policy._target_": DP_POLICIES + "bet_lowdim_policy.BETLowdimPolicy"}, "not supported"),
        ({"policy.noise_scheduler.prediction_type": "sample"}, "prediction_type='sample' is not supported"),
        ({"policy.noise_scheduler.variance_type": "fixed_large"}, "variance_type='fixed_large' is not supported"),
        ({"policy.noise_scheduler._target_": "diffusers.DPMSolverMultistepScheduler"}, "DPMSolverMultistepScheduler"),
        ({"policy.noise_scheduler.beta_schedule": "wiggly"}, "not a usable schedule"),
        ({"policy.num_inference_steps": 500}, "num_inference_steps=500"),
        ({"policy.eta": 0.5}, "eta=0.5 is not supported"),
        ({"policy.horizon": 15, "horizon": 15}, "does not describe a valid policy"),
        ({"policy.horizon": "${horizon_eval}"}, "not an integer"),
    ],
)
def test_dp_cfg_problems_are_refused(changes, message, small_policy, tmp_path):
    cfg = dp_workspace_cfg(small_policy)
    for key, value in changes.items():
        _set(cfg, key, value)
    path = write_dp_ckpt(small_policy, tmp_path / "latest.ckpt", cfg=cfg)
    with pytest.raises(CheckpointError, match=message):
        load_policy(path, trust_pickle=True)


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({"timestep_spacing": "trailing"}, {"timestep_spacing": "trailing"}),
        ({"timestep_spacing": "linspace"}, {"timestep_spacing": "linspace"}),
        (
            {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
            {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        ),
        ({"thresholding": True}, {"thresholding": True, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}),
    ],
)
def test_dp_scheduler_spacing_and_thresholding_load_as_schedule_config_settings(settings, expected, tmp_path):
    """DDIM checkpoints with diffusers' ``timestep_spacing`` / ``thresholding`` keys (what ScheduleConfig supports) load
    with those settings, and the loaded policy's sampler gives the same actions as one built with them directly."""
    config = PolicyConfig(
        unet=UNetConfig(down_dims=[16, 32, 64], diffusion_step_embed_dim=32),
        schedule=ScheduleConfig(kind="ddim", num_inference_steps=4),
    )
    policy = _policy(config)
    cfg = dp_workspace_cfg(policy)
    cfg["policy"]["noise_scheduler"].update(settings)
    path = write_dp_ckpt(policy, tmp_path / "latest.ckpt", cfg=cfg)
    loaded = load_policy(path, trust_pickle=True)
    for key, value in expected.items():
        assert getattr(loaded.config.schedule, key) == value, key
    schedule = loaded.schedule()
    reference = policy.schedule(**expected)
    torch.testing.assert_close(schedule.timesteps, reference.timesteps)


def test_dp_ddpm_with_trailing_spacing_is_still_refused_with_the_reason(small_policy, tmp_path):
    cfg = dp_workspace_cfg(small_policy)
    cfg["policy"]["noise_scheduler"]["timestep_spacing"] = "trailing"
    path = write_dp_ckpt(small_policy, tmp_path / "latest.ckpt", cfg=cfg)
    with pytest.raises(CheckpointError, match="trailing"):
        load_policy(path, trust_pickle=True)


def _edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _rename(tensors: dict, old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


@pytest.mark.parametrize(
    "config_edit,weights_edit,message",
    [
        (
            None,
            lambda t: _rename(t, "diffusion.unet.mid_modules.0.conv1.block.0.weight", "diffusion.unet.mid.conv.weight"),
            r"missing \['mid_modules.0.blocks.0.block.0.weight'\], unexpected \['mid.conv.weight'\]",
        ),
        (None, lambda t: t.update({"diffusion.rgb_encoder.backbone.0.weight": torch.zeros(1)}), "image-encoder"),
        (None, lambda t: t.update({"model.head.weight": torch.zeros(1)}), "does not have"),
        (lambda c: c.update(down_dims=[16, 32, 128]), None, "shapes that do not match"),
        (
            lambda c: c["input_features"]["observation.state"].update(shape=[3]),
            None,
            r"have shape \(2,\), the feature has \(3,\)",
        ),
        (lambda c: c.update(type="act"), None, "LeRobot policy type 'act' is not supported"),
        (
            lambda c: c["input_features"].update({"observation.image": {"type": "VISUAL", "shape": [3, 96, 96]}}),
            None,
            "holds no image-encoder weights",
        ),
        (lambda c: c["input_features"].pop("observation.state"), None, "no 'observation.state'"),
        (lambda c: c.update(prediction_type="sample"), None, "prediction_type='sample' is not supported"),
        (lambda c: c.update(clip_sample_range=2.0), None, "clip_sample_range=2.0"),
        (lambda c: c.update(horizon=6), None, "does not describe a valid policy"),
    ],
)
def test_lerobot_problems_are_refused(config_edit, weights_edit, message, small_policy, tmp_path):
    path = write_lerobot_dir(small_policy, tmp_path / "lr")
    if config_edit:
        _edit_json(path / "config.json", config_edit)
    if weights_edit:
        _edit_weights(path / "model.safetensors", weights_edit)
    with pytest.raises(CheckpointError, match=message):
        load_policy(path)


def test_lerobot_missing_statistics(small_policy, tmp_path):
    path = write_lerobot_dir(small_policy, tmp_path / "lr")
    stats = path / "policy_preprocessor_step_3_normalizer_processor.safetensors"
    _edit_weights(stats, lambda t: t.pop("observation.environment_state.max"))
    with pytest.raises(CheckpointError, match="no min/max statistics for 'observation.environment_state'"):
        load_policy(path)
    for f in path.glob("policy_*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="has no normalization statistics"):
        load_policy(path)


def test_file_of_a_directory_and_directory_of_a_ckpt(small_policy, tmp_path):
    path = write_lerobot_dir(small_policy, tmp_path / "lr")
    with pytest.raises(CheckpointError, match="pass the directory"):
        load_policy(path / "model.safetensors")
    write_dp_ckpt(small_policy, tmp_path / "run" / "checkpoints" / "latest.ckpt")
    with pytest.raises(CheckpointError, match="pass the .ckpt file itself"):
        load_policy(tmp_path / "run" / "checkpoints")
    with pytest.raises(CheckpointError, match="checkpoint file .*missing.ckpt does not exist"):
        load_policy(tmp_path / "missing.ckpt")


# -- the converter ------------------------------------------------------------------------------------


def _convert_module():
    spec = importlib.util.spec_from_file_location("convert", ROOT / "eval" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["diffusion_policy", "lerobot"])
def test_convert_writes_our_format(fmt, small_policy, tmp_path, capsys):
    convert = _convert_module()
    src, dst = _write(fmt, small_policy, tmp_path), tmp_path / "ours"
    assert convert.main([str(src), str(dst), "--trust-pickle"]) == 0
    assert "converted" in capsys.readouterr().out
    raw = json.loads((dst / "config.json").read_text())
    assert raw["format"] == "policy_accel" and raw["extra"]["converted_from"]["format"] == fmt
    assert read_checkpoint(dst).format == "policy_accel"  # no trust needed any more
    _same_policy(load_policy(dst, engine="torch"), small_policy, exact=fmt == "diffusion_policy")
    assert convert.main([str(src), str(dst), "--trust-pickle"]) == 1  # dst is not empty
    assert "--force" in capsys.readouterr().err
    assert convert.main([str(src), str(dst), "--trust-pickle", "--force", "--fp16"]) == 0


def test_convert_refuses_a_pickle_without_the_flag(small_policy, tmp_path, capsys):
    convert = _convert_module()
    src = write_dp_ckpt(small_policy, tmp_path / "latest.ckpt")
    assert convert.main([str(src), str(tmp_path / "ours")]) == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


# -- the rollout command --------------------------------------------------------------------------------


def test_rollout_runs_a_dp_ckpt_given_as_policy_path(small_policy, tmp_path, run_rollout):
    path = write_dp_ckpt(small_policy, tmp_path / "latest.ckpt")
    refused = run_rollout(f"checkpoint={path}", "n_episodes=1")
    assert refused.returncode != 0 and "trust_pickle=true" in refused.stderr + refused.stdout
    run = run_rollout(
        f"checkpoint={path}",
        "trust_pickle=true",
        "policy=ddim4",
        "solver=paradigms",
        "seeds=[100000]",
        f"out_dir={tmp_path / 'out'}",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["checkpoint"] == str(path) and results["n_episodes"] == 1


def test_rollout_refuses_a_policy_for_another_task(odd_policy, tmp_path, run_rollout):
    path = write_lerobot_dir(odd_policy, tmp_path / "lr")
    run = run_rollout(f"checkpoint={path}", "n_episodes=1")
    assert run.returncode != 0
    assert "expects obs_dim=5, action_dim=3, but task 'pusht' has obs_dim=18, action_dim=2" in run.stderr + run.stdout
