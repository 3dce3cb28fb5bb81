"""Diffusion Policy's time-series diffusion transformer (``TransformerForDiffusion``, "DP-T").

The module tree and the parameter/buffer names mirror Diffusion Policy's, so the ``model.*`` part of a DP-T workspace
state dict (prefix stripped) loads with ``strict=True``; that includes ``_dummy_variable``, the empty parameter DP's
``ModuleAttrMixin`` adds to every such module, and the causal ``mask`` / ``memory_mask`` buffers, which DP saves with
the weights. Like the U-Net, ``forward`` takes the toolkit's denoiser protocol: a per-row timestep vector (one call
evaluates many (sample, timestep) pairs, which the parallel solvers batch over) and the flattened observation history.

Layouts (DP's, selected by the config as DP selects them):

* ``time_as_cond`` (the shipped configs): condition tokens ``[time, obs_0 .. obs_{To-1}]`` (``[time]`` alone when
  observations are inpainted instead) go through ``encoder`` (an MLP, or a transformer encoder when
  ``n_cond_layers > 0``) into the memory of a pre-norm ``nn.TransformerDecoder`` over the action tokens.
* ``time_as_cond=False``: a BERT-like encoder over ``[time, action tokens]``, no condition (DP refuses observations
  here too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import forward_ad

from policy_accel.model.unet import SinusoidalPosEmb


@dataclass
class TransformerConfig:
    """Architecture of DP-T; names follow Diffusion Policy's constructor."""

    input_dim: int = 2  # action_dim, or action_dim + obs_dim with inpainting
    output_dim: int = 2
    horizon: int = 16
    n_obs_steps: int = 2  # DP's n_obs_steps argument (number of condition observation tokens)
    cond_dim: int = 20  # per-step observation dim when observations condition the network; 0 = none (inpainting)
    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.3
    causal_attn: bool = True
    time_as_cond: bool = True
    obs_as_cond: bool = True
    n_cond_layers: int = 0


def check_transformer_config(config: TransformerConfig) -> None:
    """Refuse what DP refuses (or silently reinterprets, or fails on later) with one message naming the field: at
    construction and when a policy's config is read (``PolicyConfig``)."""
    for name in ("input_dim", "output_dim", "horizon", "n_obs_steps", "n_layer", "n_head", "n_emb"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"transformer.{name}={value!r} must be an integer >= 1")
    for name in ("cond_dim", "n_cond_layers"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"transformer.{name}={value!r} must be an integer >= 0")
    for name in ("p_drop_emb", "p_drop_attn"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"transformer.{name}={value!r} must be a probability in [0, 1]")
    for name in ("causal_attn", "time_as_cond", "obs_as_cond"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"transformer.{name}={getattr(config, name)!r} must be a bool")
    if config.n_emb % 2 or config.n_emb < 4:
        # the sinusoidal timestep embedding fills n_emb with half sines, half cosines (and divides by half - 1)
        raise ValueError(f"transformer.n_emb={config.n_emb} must be an even number >= 4")
    if config.n_emb % config.n_head:
        raise ValueError(f"transformer.n_head={config.n_head} must divide n_emb={config.n_emb}")
    if config.obs_as_cond != (config.cond_dim > 0):
        # DP derives obs_as_cond from cond_dim > 0 and ignores its own argument: a disagreement is a mistake here
        raise ValueError(
            f"transformer.obs_as_cond={config.obs_as_cond} disagrees with cond_dim={config.cond_dim}: observations "
            "condition the network exactly when cond_dim > 0 (cond_dim=0 with inpainting)"
        )
    if config.obs_as_cond and not config.time_as_cond:
        raise ValueError(
            "transformer.time_as_cond=False is only possible without observation conditioning (Diffusion Policy "
            "asserts time_as_cond when obs_as_cond): set obs_as_cond=False, cond_dim=0"
        )


def _additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """DP's float attention mask: 0 where attention is allowed, -inf where it is not."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


@contextlib.contextmanager
def _unfused_attention(math_sdpa: bool = False):
    """torch's eval-mode fused attention kernels (``aten::_native_multi_head_attention``, taken by unmasked
    self-attention, and ``aten::_transformer_encoder_layer_fwd``) have no ONNX form and no forward-mode derivative:
    exports and dual-number calls (Newton's ``derivatives=forward_ad``) take the ordinary path, the same arithmetic;
    ``math_sdpa`` also swaps the CPU flash-attention kernel (no forward-mode derivative) for the composite one. Plain
    eager calls keep torch's choice, as in DP."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if math_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _has_tangent(*tensors: torch.Tensor) -> bool:
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors if isinstance(t, torch.Tensor))


class TransformerForDiffusion(nn.Module):
    """Predicts the noise in an action chunk ``(B, horizon, input_dim)`` given per-row timesteps ``(B,)`` and a
    flattened observation history ``(B, n_obs_steps * cond_dim)``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        check_transformer_config(config)
        self.config = config
        c = config
        # token counts as DP computes them: time is a trunk token without time_as_cond, else a condition token
        T = c.horizon if c.time_as_cond else c.horizon + 1
        T_cond = (1 + (c.n_obs_steps if c.obs_as_cond else 0)) if c.time_as_cond else 0
        self.T, self.T_cond, self.horizon = T, T_cond, c.horizon
        self.time_as_cond, self.obs_as_cond, self.encoder_only = c.time_as_cond, c.obs_as_cond, T_cond == 0

        # DP-T inherits ModuleAttrMixin, whose empty parameter is in every DP-T state dict
        self._dummy_variable = nn.Parameter(torch.empty(0))
        self.input_emb = nn.Linear(c.input_dim, c.n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, T, c.n_emb))
        self.drop = nn.Dropout(c.p_drop_emb)
        self.time_emb = SinusoidalPosEmb(c.n_emb)
        self.cond_obs_emb = nn.Linear(c.cond_dim, c.n_emb) if c.obs_as_cond else None
        self.cond_pos_emb = None
        self.decoder = None

        def layer_args() -> dict:
            return dict(
                d_model=c.n_emb,
                nhead=c.n_head,
                dim_feedforward=4 * c.n_emb,
                dropout=c.p_drop_attn,
                activation="gelu",
                batch_first=True,
                norm_first=True,  # pre-norm, as DP ("important for stability")
            )

        if self.encoder_only:
            # nested tensors are never used with norm_first; saying so silences torch's warning (no numeric effect)
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer_args()), num_layers=c.n_layer, enable_nested_tensor=False
            )
        else:
            self.cond_pos_emb = nn.Parameter(torch.zeros(1, T_cond, c.n_emb))
            if c.n_cond_layers > 0:
                self.encoder = nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(**layer_args()), num_layers=c.n_cond_layers, enable_nested_tensor=False
                )
            else:
                self.encoder = nn.Sequential(
                    nn.Linear(c.n_emb, 4 * c.n_emb), nn.Mish(), nn.Linear(4 * c.n_emb, c.n_emb)
                )
            self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer_args()), num_layers=c.n_layer)

        # buffers, so they travel with DP's weights: action t sees tokens <= t; and with observation tokens,
        # condition token s (s = 0 is time, s = k + 1 is obs k) iff t >= s - 1. None (not buffers) otherwise, as DP.
        steps = torch.arange(T)
        mask = _additive_mask(steps[None, :] <= steps[:, None]) if c.causal_attn else None
        self.register_buffer("mask", mask)
        memory_mask = None
        if c.causal_attn and c.time_as_cond and c.obs_as_cond:
            memory_mask = _additive_mask(steps[:, None] >= torch.arange(T_cond)[None, :] - 1)
        self.register_buffer("memory_mask", memory_mask)

        self.ln_f = nn.LayerNorm(c.n_emb)
        self.head = nn.Linear(c.n_emb, c.output_dim)
        self._init_like_dp()
        self.inpainting: nn.Module | None = None  # set by the policy builder for inpainting policies

    def _init_like_dp(self) -> None:
        """DP's initialisation (GPT-style N(0, 0.02) weights, zero biases), so freshly trained networks match."""
        for module in self.modules():
            if isinstance(module, nn.Linear):  # includes the attention output projections
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)
        if self.cond_obs_emb is not None:
            nn.init.normal_(self.cond_pos_emb, mean=0.0, std=0.02)  # DP leaves it zero without observation tokens

    def get_optim_groups(self, weight_decay: float) -> list[dict]:
        """DP-T's AdamW parameter groups: weights of linear and attention layers decay; biases, LayerNorm weights,
        the positional embeddings and ``_dummy_variable`` do not (DP's ``get_optim_groups``)."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                decays = name.endswith("weight") and isinstance(module, nn.Linear | nn.MultiheadAttention)
                (decay if decays else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        """sample (B, H, input_dim), timestep (B,) or scalar, global_cond (B, n_obs_steps * cond_dim) — flattened
        observation history, the toolkit's denoiser protocol; reshaped to DP's (B, n_obs_steps, cond_dim) tokens."""
        if self.inpainting is not None:
            sample = self.inpainting(sample, global_cond)
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if not exporting:
            if _has_tangent(sample, global_cond):
                with _unfused_attention(math_sdpa=True):
                    return self._denoise(sample, timestep, global_cond)
            return self._denoise(sample, timestep, global_cond)
        with _unfused_attention():
            out = self._denoise(sample, timestep, global_cond)
        if self.cond_obs_emb is None and self.inpainting is None:
            # the network ignores global_cond, and an export would drop the input the engines feed: keep it, adding
            # an exact zero (a sum over none of its columns)
            out = out + global_cond[:, :0].sum(dim=-1).to(out.dtype)[:, None, None]
        return out

    def _denoise(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        tokens = self.input_emb(sample)
        time_token = self.time_emb(timestep).to(tokens.dtype).unsqueeze(1)  # (B, 1, n_emb)

        if self.encoder_only:  # BERT over [time, actions]
            x = torch.cat([time_token, tokens], dim=1)
            x = self.drop(x + self.pos_emb[:, : x.shape[1]])
            x = self.encoder(src=x, mask=self.mask)[:, 1:]
        else:
            cond = time_token
            if self.cond_obs_emb is not None:  # otherwise (inpainting) the memory is the time token alone
                # an explicit batch, not unflatten: ONNX export would bake the example's batch into the graph
                obs = global_cond.reshape(sample.shape[0], self.config.n_obs_steps, self.config.cond_dim)
                cond = torch.cat([cond, self.cond_obs_emb(obs.to(tokens.dtype))], dim=1)
            memory = self.encoder(self.drop(cond + self.cond_pos_emb[:, : cond.shape[1]]))
            x = self.drop(tokens + self.pos_emb[:, : tokens.shape[1]])
            x = self.decoder(tgt=x, memory=memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(x))
