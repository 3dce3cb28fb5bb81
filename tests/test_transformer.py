"""DP-T (``TransformerForDiffusion``) has Diffusion Policy's state-dict names, masks and semantics, and exports."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

from policy_accel.model.engine import EXACT_TOLERANCE, compile_denoiser
from policy_accel.model.transformer import TransformerConfig, TransformerForDiffusion

# Diffusion Policy's TransformerForDiffusion(input_dim=2, output_dim=2, horizon=16, n_obs_steps=2, cond_dim=20,
# n_layer=2, n_head=4, n_emb=32, causal_attn=True), read off DP's constructor (5ba07ac): ModuleAttrMixin's empty
# _dummy_variable, the causal buffers, an MLP condition encoder (n_cond_layers=0) and pre-norm decoder layers.
SMALL_DP_KEYS = [
    ("_dummy_variable", (0,)),
    ("pos_emb", (1, 16, 32)),
    ("cond_pos_emb", (1, 3, 32)),
    ("mask", (16, 16)),
    ("memory_mask", (16, 3)),
    ("input_emb.weight", (32, 2)),
    ("input_emb.bias", (32,)),
    ("cond_obs_emb.weight", (32, 20)),
    ("cond_obs_emb.bias", (32,)),
    ("encoder.0.weight", (128, 32)),
    ("encoder.0.bias", (128,)),
    ("encoder.2.weight", (32, 128)),
    ("encoder.2.bias", (32,)),
    ("decoder.layers.0.self_attn.in_proj_weight", (96, 32)),
    ("decoder.layers.0.self_attn.in_proj_bias", (96,)),
    ("decoder.layers.0.self_attn.out_proj.weight", (32, 32)),
    ("decoder.layers.0.self_attn.out_proj.bias", (32,)),
    ("decoder.layers.0.multihead_attn.in_proj_weight", (96, 32)),
    ("decoder.layers.0.multihead_attn.in_proj_bias", (96,)),
    ("decoder.layers.0.multihead_attn.out_proj.weight", (32, 32)),
    ("decoder.layers.0.multihead_attn.out_proj.bias", (32,)),
    ("decoder.layers.0.linear1.weight", (128, 32)),
    ("decoder.layers.0.linear1.bias", (128,)),
    ("decoder.layers.0.linear2.weight", (32, 128)),
    ("decoder.layers.0.linear2.bias", (32,)),
    ("decoder.layers.0.norm1.weight", (32,)),
    ("decoder.layers.0.norm1.bias", (32,)),
    ("decoder.layers.0.norm2.weight", (32,)),
    ("decoder.layers.0.norm2.bias", (32,)),
    ("decoder.layers.0.norm3.weight", (32,)),
    ("decoder.layers.0.norm3.bias", (32,)),
    ("decoder.layers.1.self_attn.in_proj_weight", (96, 32)),
    ("decoder.layers.1.self_attn.in_proj_bias", (96,)),
    ("decoder.layers.1.self_attn.out_proj.weight", (32, 32)),
    ("decoder.layers.1.self_attn.out_proj.bias", (32,)),
    ("decoder.layers.1.multihead_attn.in_proj_weight", (96, 32)),
    ("decoder.layers.1.multihead_attn.in_proj_bias", (96,)),
    ("decoder.layers.1.multihead_attn.out_proj.weight", (32, 32)),
    ("decoder.layers.1.multihead_attn.out_proj.bias", (32,)),
    ("decoder.layers.1.linear1.weight", (128, 32)),
    ("decoder.layers.1.linear1.bias", (128,)),
    ("decoder.layers.1.linear2.weight", (32, 128)),
    ("decoder.layers.1.linear2.bias", (32,)),
    ("decoder.layers.1.norm1.weight", (32,)),
    ("decoder.layers.1.norm1.bias", (32,)),
    ("decoder.layers.1.norm2.weight", (32,)),
    ("decoder.layers.1.norm2.bias", (32,)),
    ("decoder.layers.1.norm3.weight", (32,)),
    ("decoder.layers.1.norm3.bias", (32,)),
    ("ln_f.weight", (32,)),
    ("ln_f.bias", (32,)),
    ("head.weight", (2, 32)),
    ("head.bias", (2,)),
]

SMALL = TransformerConfig(n_layer=2, n_head=4, n_emb=32)  # T=16, To=2, cond_dim=20
INF = float("-inf")


def _dp_keys(c: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """DP's state-dict names and shapes for a decoder (``time_as_cond``) config with an MLP condition encoder."""
    E, T, S = c.n_emb, c.horizon, 1 + c.n_obs_steps
    keys = {"_dummy_variable": (0,), "pos_emb": (1, T, E), "cond_pos_emb": (1, S, E)}
    if c.causal_attn:
        keys |= {"mask": (T, T), "memory_mask": (T, S)}
    keys |= {"input_emb.weight": (E, c.input_dim), "input_emb.bias": (E,)}
    keys |= {"cond_obs_emb.weight": (E, c.cond_dim), "cond_obs_emb.bias": (E,)}
    keys |= {"encoder.0.weight": (4 * E, E), "encoder.0.bias": (4 * E,), "encoder.2.weight": (E, 4 * E)}
    keys |= {"encoder.2.bias": (E,)}
    for i in range(c.n_layer):
        p = f"decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            keys |= {p + attn + ".in_proj_weight": (3 * E, E), p + attn + ".in_proj_bias": (3 * E,)}
            keys |= {p + attn + ".out_proj.weight": (E, E), p + attn + ".out_proj.bias": (E,)}
        keys |= {p + "linear1.weight": (4 * E, E), p + "linear1.bias": (4 * E,)}
        keys |= {p + "linear2.weight": (E, 4 * E), p + "linear2.bias": (E,)}
        for norm in ("norm1", "norm2", "norm3"):
            keys |= {p + norm + ".weight": (E,), p + norm + ".bias": (E,)}
    return keys | {
        "ln_f.weight": (E,),
        "ln_f.bias": (E,),
        "head.weight": (c.output_dim, E),
        "head.bias": (c.output_dim,),
    }


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _randomised(config: TransformerConfig, seed: int = 0) -> TransformerForDiffusion:
    """Eval-mode network with every parameter moved off DP's init (zero biases, unit LayerNorms hide mistakes)."""
    torch.manual_seed(seed)
    model = TransformerForDiffusion(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs(config: TransformerConfig, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.horizon, config.input_dim, generator=g)
    t = torch.randint(0, 100, (batch,), generator=g)
    cond = torch.randn(batch, config.n_obs_steps * max(config.cond_dim, 20), generator=g)
    return x, t, cond


def test_small_config_state_dict_matches_diffusion_policy_literally():
    assert list(_shapes(TransformerForDiffusion(SMALL)).items()) == SMALL_DP_KEYS
    assert _dp_keys(SMALL) == dict(SMALL_DP_KEYS)


def test_dp_default_config_state_dict_and_size_match_diffusion_policy():
    """DP's PushT DP-T: 8 layers, 4 heads, n_emb 256 (parameter count of DP's own module built with this config)."""
    config = TransformerConfig(p_drop_attn=0.01)
    model = TransformerForDiffusion(config)
    assert _shapes(model) == _dp_keys(config)
    assert sum(p.numel() for p in model.parameters()) == 8_965_122
    state = {k: torch.randn(s) for k, s in _dp_keys(config).items()}
    model.load_state_dict(state, strict=True)


def test_causal_masks_are_dps():
    model = TransformerForDiffusion(SMALL)
    T, S = 16, 3
    expected = torch.tensor([[0.0 if s <= t else INF for s in range(T)] for t in range(T)])
    assert torch.equal(model.mask, expected)
    # action t may attend condition token s (0 = time, k + 1 = observation k) iff t >= s - 1
    memory = torch.tensor([[0.0 if t >= s - 1 else INF for s in range(S)] for t in range(T)])
    assert torch.equal(model.memory_mask, memory)
    assert model.memory_mask[0].tolist() == [0.0, 0.0, INF]  # the first action does not see the second observation
    assert model.mask.dtype == model.memory_mask.dtype == torch.float32


@pytest.mark.parametrize(
    ("config", "keys"),
    [
        (TransformerConfig(n_layer=1, n_emb=16, causal_attn=False), {"mask", "memory_mask"}),
        # inpainting: the memory is the time token alone, with no memory mask (DP) and no observation embedding
        (TransformerConfig(input_dim=22, output_dim=22, cond_dim=0, obs_as_cond=False, n_layer=1, n_emb=16), None),
    ],
)
def test_masks_are_absent_where_dp_has_none(config, keys):
    state = TransformerForDiffusion(config).state_dict()
    if keys:
        assert not keys & state.keys()
    else:
        assert "mask" in state and "memory_mask" not in state and "cond_obs_emb.weight" not in state
        assert state["cond_pos_emb"].shape == (1, 1, 16)


def test_bert_variant_state_dict():
    """``time_as_cond=False``: DP's encoder-only layout, time as the first trunk token (T = horizon + 1)."""
    config = TransformerConfig(
        input_dim=3, output_dim=3, horizon=8, cond_dim=0, obs_as_cond=False, time_as_cond=False, n_layer=1, n_emb=16
    )
    state = _shapes(TransformerForDiffusion(config))
    assert state["pos_emb"] == (1, 9, 16) and state["mask"] == (9, 9)
    assert {"cond_pos_emb", "memory_mask", "encoder.0.weight"}.isdisjoint(state)
    assert state["encoder.layers.0.self_attn.in_proj_weight"] == (48, 16)
    assert not any(k.startswith("decoder.") for k in state)


def test_action_t_does_not_see_later_actions_or_observations():
    model = _randomised(SMALL)
    x, t, cond = _inputs(SMALL, 2)
    with torch.no_grad():
        base = model(x, t, cond)
        for pos in (0, 5, 14):
            later = x.clone()
            later[:, pos + 1 :] += torch.randn_like(later[:, pos + 1 :])
            out = model(later, t, cond)
            torch.testing.assert_close(out[:, : pos + 1], base[:, : pos + 1], rtol=0, atol=1e-6)
            assert (out[:, pos + 1 :] - base[:, pos + 1 :]).abs().max() > 1e-3  # the change does reach later rows
        # observation 1 (condition token 2) is hidden from action 0 only
        obs1 = cond.clone()
        obs1[:, 20:] += 1.0
        out = model(x, t, obs1)
        torch.testing.assert_close(out[:, 0], base[:, 0], rtol=0, atol=1e-6)
        assert (out[:, 1] - base[:, 1]).abs().max() > 1e-3


def test_without_causal_attention_the_first_action_sees_the_last():
    """The causality test above can fail: the same perturbation does reach row 0 of a non-causal network."""
    config = TransformerConfig(n_layer=2, n_head=4, n_emb=32, causal_attn=False)
    model = _randomised(config)
    x, t, cond = _inputs(config, 2)
    later = x.clone()
    later[:, 1:] += 1.0
    with torch.no_grad():
        assert (model(later, t, cond)[:, 0] - model(x, t, cond)[:, 0]).abs().max() > 1e-3


def test_per_row_timesteps_equal_separate_scalar_calls():
    model = _randomised(SMALL)
    x, _, cond = _inputs(SMALL, 3)
    steps = [99, 37, 0]
    with torch.no_grad():
        batched = model(x, torch.tensor(steps), cond)
        for i, step in enumerate(steps):
            single = model(x[i : i + 1], torch.tensor(step), cond[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model(x[i : i + 1], step, cond[i : i + 1]), single, rtol=0, atol=0)
        torch.testing.assert_close(model(x, torch.tensor(7), cond), model(x, torch.full((3,), 7), cond))
        assert (batched[0] - batched[1]).abs().max() > 1e-3  # the timestep matters


@pytest.mark.parametrize("time_as_cond", [True, False])
def test_without_observation_conditioning_global_cond_is_ignored(time_as_cond):
    config = TransformerConfig(
        input_dim=22, output_dim=22, cond_dim=0, obs_as_cond=False, time_as_cond=time_as_cond, n_layer=2, n_emb=32
    )
    model = _randomised(config)
    x, t, cond = _inputs(config, 3)
    with torch.no_grad():
        out = model(x, t, cond)
        assert torch.equal(model(x, t, torch.randn_like(cond)), out)
        assert torch.equal(model(x, t, cond[:, :0]), out)


class _AddCondition(nn.Module):
    """A stand-in inpainting hook: any dependence on global_cond shows in the output."""

    def forward(self, sample: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        return sample + global_cond[:, :1, None]


def test_inpainting_hook_runs_first_and_adds_no_weights():
    config = TransformerConfig(input_dim=22, output_dim=22, cond_dim=0, obs_as_cond=False, n_layer=1, n_emb=16)
    model = _randomised(config)
    keys = set(model.state_dict())
    x, t, cond = _inputs(config, 2)
    with torch.no_grad():
        plain = model(x, t, cond)
        expected = model(x + cond[:, :1, None], t, cond)
        model.inpainting = _AddCondition()
        assert set(model.state_dict()) == keys
        torch.testing.assert_close(model(x, t, cond), expected, rtol=0, atol=0)
        assert (model(x, t, cond) - plain).abs().max() > 1e-4


def test_dropout_is_active_in_training_and_identity_in_eval():
    model = _randomised(TransformerConfig(n_layer=1, n_emb=16, p_drop_emb=0.2, p_drop_attn=0.3))
    x, t, cond = _inputs(model.config, 2)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), model(x, t, cond))
        model.train()
        assert not torch.equal(model(x, t, cond), model(x, t, cond))


def test_optimizer_groups_follow_dp():
    """DP-T's AdamW grouping: linear and attention weights decay; biases, LayerNorms, positional embeddings not."""
    model = TransformerForDiffusion(SMALL)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = (sorted(names[id(p)] for p in g["params"]) for g in model.get_optim_groups(0.1))
    want = [n for n, _ in SMALL_DP_KEYS if n.endswith("weight") and ".norm" not in n and n != "ln_f.weight"]
    assert decay == sorted(want) and len(want) == 17
    assert sorted(decay + no_decay) == sorted(names.values())
    assert {"pos_emb", "cond_pos_emb", "_dummy_variable", "ln_f.weight"} <= set(no_decay)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside make_dual
@pytest.mark.parametrize("name", ["causal_mlp_encoder", "non_causal_transformer_encoder", "bert_no_condition"])
def test_forward_mode_derivatives_match_finite_differences(name):
    """Newton's ``derivatives=forward_ad`` pushes dual numbers through the eager network (eval, no_grad), where
    torch's fused attention kernels have no forward-mode derivative."""
    model = _randomised(EXPORT_CONFIGS[name]).double()
    x, t, cond = (v.double() if v.is_floating_point() else v for v in _inputs(model.config, 3))
    v = torch.randn_like(x)
    with torch.no_grad(), forward_ad.dual_level():
        dual = model(forward_ad.make_dual(x, v), t, cond)
        primal, tangent = forward_ad.unpack_dual(dual)
        eps = 1e-6
        fd = (model(x + eps * v, t, cond) - model(x - eps * v, t, cond)) / (2 * eps)
        torch.testing.assert_close(primal, model(x, t, cond), rtol=0, atol=1e-12)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)
    assert tangent.abs().max() > 1e-3
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(time_as_cond=False), "time_as_cond"),  # DP asserts time_as_cond when observations condition
        (dict(obs_as_cond=False), "obs_as_cond"),  # cond_dim=20 > 0: DP would condition on observations anyway
        (dict(cond_dim=0), "obs_as_cond"),
        (dict(n_head=3), "n_head"),
        (dict(n_emb=15, n_head=5), "n_emb"),
        (dict(horizon=0), "horizon"),
        (dict(n_cond_layers=-1), "n_cond_layers"),
        (dict(p_drop_attn=1.5), "p_drop_attn"),
        (dict(causal_attn=1), "causal_attn"),
    ],
)
def test_configs_dp_cannot_build_are_refused(changes, field):
    config = TransformerConfig(n_layer=1, n_emb=32)
    for name, value in changes.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=field):
        TransformerForDiffusion(config)


EXPORT_CONFIGS = {
    "causal_mlp_encoder": SMALL,
    # unmasked self-attention and encoder layers: torch's fused eval kernels, which ONNX cannot express
    "non_causal_transformer_encoder": TransformerConfig(n_layer=1, n_emb=32, causal_attn=False, n_cond_layers=1),
    # a network that ignores global_cond still takes it as an input
    "bert_no_condition": TransformerConfig(
        input_dim=22, output_dim=22, cond_dim=0, obs_as_cond=False, time_as_cond=False, n_layer=1, n_emb=32
    ),
}


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_exported_network_matches_eager(engine, name, tmp_path):
    if importlib.util.find_spec(engine) is None:
        pytest.skip(f"{engine} is not installed")
    config = EXPORT_CONFIGS[name]
    model = _randomised(config)
    options = dict(fuse_chains=False, static_shapes=True) if engine == "openvino" else {}
    served, info = compile_denoiser(
        model, engine, sample_shape=(16, config.input_dim), cond_dim=40, threads=1, cache_dir=tmp_path, **options
    )
    assert info.name == engine and info.precision == "f32"
    assert torch.backends.mha.get_fastpath_enabled()  # the export leaves torch's switch as it found it
    for batch in (1, 5, 17):
        x, t, cond = _inputs(config, batch, seed=batch)
        with torch.no_grad():
            eager = model(x, t, cond)
        assert (served(x, t, cond) - eager).abs().max() <= EXACT_TOLERANCE
