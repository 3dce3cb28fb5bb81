"""DP-T as a policy: every solver returns the sequential sample on it (observation-conditioned and inpainting),
and Diffusion Policy's transformer workspace checkpoints load with the same actions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from format_builders import dp_workspace_cfg, write_dp_ckpt

from policy_accel.errors import CheckpointError
from policy_accel.io.checkpoint import load_policy, save_policy
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.transformer import TransformerConfig
from policy_accel.policy import DiffusionPolicy, PolicyConfig, build_denoiser
from policy_accel.schedule import ScheduleConfig
from policy_accel.solvers import make_solver

OBS, ACT, TO, H = 5, 2, 2, 16
DP_POLICIES = "diffusion_policy.policy."


def transformer_policy(inpainting: bool = False, kind: str = "ddpm", steps: int = 100) -> DiffusionPolicy:
    torch.manual_seed(0)
    chunk = ACT + (OBS if inpainting else 0)
    net = TransformerConfig(
        input_dim=chunk,
        output_dim=chunk,
        horizon=H,
        n_obs_steps=TO,
        cond_dim=0 if inpainting else OBS,
        obs_as_cond=not inpainting,
        n_layer=2,
        n_head=4,
        n_emb=32,
        p_drop_attn=0.3,  # must be off at inference: the policy runs the network in eval mode
    )
    config = PolicyConfig(
        obs_dim=OBS,
        action_dim=ACT,
        horizon=H,
        n_obs_steps=TO,
        unet=None,
        denoiser="transformer",
        transformer=net,
        inpainting=inpainting,
        schedule=ScheduleConfig(kind=kind, num_inference_steps=steps),
    )
    model = build_denoiser(config)
    with torch.no_grad():  # DP's init leaves biases and norms plain: move every parameter off it
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    norm = LinearNormalizer.fit
    return DiffusionPolicy(
        config, model, norm(torch.rand(50, OBS, generator=g)), norm(torch.rand(50, ACT, generator=g))
    )


SOLVERS = [
    ("paradigms", {"tolerance": 1e-3}),
    ("parataa", {}),
    ("newton", {"jacobian": "broyden"}),
    ("newton", {"jacobian": "exact"}),
    ("newton", {"jacobian": "broyden", "rounds": "fixed"}),
]


@pytest.mark.parametrize("name,options", SOLVERS, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("inpainting", [False, True], ids=["cond", "inpainting"])
def test_every_solver_returns_the_sequential_sample_on_dp_t(name, options, kind, steps, batch, inpainting):
    policy = transformer_policy(inpainting, kind, steps)
    schedule = policy.schedule()
    cond = torch.rand(batch, TO * OBS) * 2 - 1
    noise = policy.draw_noise(schedule, batch, torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = make_solver("sequential").solve(policy.denoiser, schedule, noise, cond)
        result = make_solver(name, **options).solve(policy.denoiser, schedule, noise, cond)
    assert result.converged and result.sample.shape == (batch, *policy.chunk_shape)
    assert (result.sample[..., :ACT] - reference.sample[..., :ACT]).abs().max() <= 1e-3


def test_the_network_runs_in_eval_mode_whatever_it_was_handed():
    policy = transformer_policy()
    x, t, cond = torch.randn(2, H, ACT), torch.tensor([3, 70]), torch.rand(2, TO * OBS)
    with torch.inference_mode():
        assert torch.equal(policy.denoiser(x, t, cond), policy.denoiser(x, t, cond))  # attention dropout is off


def dp_transformer_cfg(policy: DiffusionPolicy) -> dict:
    """The resolved cfg of DP's ``train_diffusion_transformer_lowdim_workspace`` for ``policy``'s shapes."""
    cfg = dp_workspace_cfg_like(policy)
    c, net = policy.config, policy.config.transformer
    obs_as_cond = not c.inpainting
    for section in (cfg, cfg["policy"]):
        for key in ("obs_as_global_cond", "obs_as_local_cond", "oa_step_convention"):
            section.pop(key, None)
        section["obs_as_cond"] = obs_as_cond
    cfg["name"] = "train_diffusion_transformer_lowdim"
    cfg["policy"]["_target_"] = DP_POLICIES + "diffusion_transformer_lowdim_policy.DiffusionTransformerLowdimPolicy"
    cfg["policy"]["model"] = {
        "_target_": "diffusion_policy.model.diffusion.transformer_for_diffusion.TransformerForDiffusion",
        "input_dim": net.input_dim,
        "output_dim": net.output_dim,
        "horizon": c.horizon,
        "n_obs_steps": c.n_obs_steps,
        "cond_dim": net.cond_dim,
        "n_layer": net.n_layer,
        "n_head": net.n_head,
        "n_emb": net.n_emb,
        "p_drop_emb": net.p_drop_emb,
        "p_drop_attn": net.p_drop_attn,
        "causal_attn": net.causal_attn,
        "time_as_cond": net.time_as_cond,
        "obs_as_cond": obs_as_cond,
        "n_cond_layers": net.n_cond_layers,
    }
    return cfg


def dp_workspace_cfg_like(policy: DiffusionPolicy) -> dict:
    """DP's U-Net workspace cfg for the same shapes and scheduler (the builder reads a U-Net section: lend it one)."""
    from policy_accel.model.unet import UNetConfig

    c = policy.config
    stand_in = SimpleNamespace(
        config=PolicyConfig(
            obs_dim=c.obs_dim,
            action_dim=c.action_dim,
            horizon=c.horizon,
            n_obs_steps=c.n_obs_steps,
            n_action_steps=c.n_action_steps,
            unet=UNetConfig(input_dim=c.action_dim, global_cond_dim=c.cond_dim, down_dims=[16, 32, 64]),
            schedule=c.schedule,
        )
    )
    return dp_workspace_cfg(stand_in)


@pytest.mark.parametrize("inpainting", [False, True], ids=["cond", "inpainting"])
def test_a_diffusion_policy_transformer_ckpt_loads_and_gives_the_same_actions(inpainting, tmp_path):
    policy = transformer_policy(inpainting)
    path = write_dp_ckpt(policy, tmp_path / "latest.ckpt", cfg=dp_transformer_cfg(policy))
    save_policy(policy, tmp_path / "ours")
    obs = np.random.default_rng(0).random((2, TO, OBS)).astype(np.float32)
    solver = make_solver("sequential")
    expected, _ = policy.predict_action(obs, solver, generator=torch.Generator().manual_seed(5))
    for loaded in (load_policy(path, trust_pickle=True, engine="torch"), load_policy(tmp_path / "ours")):
        assert loaded.config.denoiser == "transformer" and loaded.config.inpainting == inpainting
        actions, _ = loaded.predict_action(obs, solver, generator=torch.Generator().manual_seed(5))
        assert np.allclose(actions, expected, atol=1e-5)  # the second is served by the compiled engine


@pytest.mark.parametrize(
    "change,message",
    [
        ({"policy.pred_action_steps_only": True}, "pred_action_steps_only=True"),
        ({"policy.model._target_": "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"}, "only"),
        ({"policy.model.n_emb": 30}, "n_emb"),
    ],
)
def test_unsupported_transformer_checkpoints_are_refused_naming_the_field(change, message, tmp_path):
    policy = transformer_policy()
    cfg = dp_transformer_cfg(policy)
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        section = cfg
        for p in parents:
            section = section[p]
        section[last] = value
    path = write_dp_ckpt(policy, tmp_path / "latest.ckpt", cfg=cfg)
    with pytest.raises(CheckpointError, match=message):
        load_policy(path, trust_pickle=True)


def test_an_attention_mask_with_nan_is_refused():
    policy = transformer_policy()
    policy.model.mask[0, 1] = float("nan")
    with pytest.raises(ValueError, match="attention mask"):
        policy.check_finite()
