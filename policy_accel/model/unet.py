"""Diffusion Policy's FiLM-conditioned 1-D temporal U-Net (``ConditionalUnet1D``).

The module tree mirrors Diffusion Policy's so that its state dicts load with ``strict=True``
(local conditioning, unused by every shipped low-dim config, is not supported).
``forward`` takes a per-row timestep vector: one call can evaluate many (sample, timestep)
pairs, which is what the parallel solvers batch over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
from pydantic import Strict
from torch import nn


@dataclass
class UNetConfig:
    """Architecture of the denoiser; the names follow Diffusion Policy's constructor."""

    input_dim: int = 2
    global_cond_dim: int = 36
    diffusion_step_embed_dim: int = 128
    down_dims: Annotated[list[int], Strict(False)] = field(default_factory=lambda: [64, 128, 256])  # or a tuple
    kernel_size: int = 5
    n_groups: int = 8
    cond_predict_scale: bool = True


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000) / (half - 1)))
        arg = t.float()[:, None] * freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Unsqueeze(nn.Module):
    """Stands in for DP's einops ``Rearrange('b t -> b t 1')`` (no parameters, same index)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1)


class ConditionalResidualBlock1D(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int, cond_predict_scale: bool
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Conv1dBlock(in_ch, out_ch, kernel_size, n_groups), Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)]
        )
        self.out_channels = out_ch
        self.cond_predict_scale = cond_predict_scale
        cond_channels = 2 * out_ch if cond_predict_scale else out_ch
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, cond_channels), _Unsqueeze())
        self.residual_conv = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.blocks[0](x)
        embed = self.cond_encoder(cond)
        if self.cond_predict_scale:
            embed = embed.reshape(embed.shape[0], 2, self.out_channels, 1)
            out = embed[:, 0] * out + embed[:, 1]
        else:
            out = out + embed
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class Downsample1d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalUnet1D(nn.Module):
    """Predicts the noise in an action chunk ``(B, horizon, input_dim)`` given per-row timesteps
    ``(B,)`` and a flattened observation history ``(B, global_cond_dim)``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        dsed = config.diffusion_step_embed_dim
        all_dims = [config.input_dim, *config.down_dims]
        start_dim = config.down_dims[0]
        cond_dim = dsed + config.global_cond_dim
        block = dict(
            cond_dim=cond_dim,
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
            cond_predict_scale=config.cond_predict_scale,
        )

        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        in_out = list(zip(all_dims[:-1], all_dims[1:], strict=True))
        mid_dim = all_dims[-1]
        self.mid_modules = nn.ModuleList(
            [
                ConditionalResidualBlock1D(mid_dim, mid_dim, **block),
                ConditionalResidualBlock1D(mid_dim, mid_dim, **block),
            ]
        )
        self.down_modules = nn.ModuleList()
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= len(in_out) - 1
            self.down_modules.append(
                nn.ModuleList(
                    [
                        ConditionalResidualBlock1D(dim_in, dim_out, **block),
                        ConditionalResidualBlock1D(dim_out, dim_out, **block),
                        Downsample1d(dim_out) if not is_last else nn.Identity(),
                    ]
                )
            )
        self.up_modules = nn.ModuleList()
        for dim_in, dim_out in reversed(in_out[1:]):
            self.up_modules.append(
                nn.ModuleList(
                    [
                        ConditionalResidualBlock1D(dim_out * 2, dim_in, **block),
                        ConditionalResidualBlock1D(dim_in, dim_in, **block),
                        Upsample1d(dim_in),
                    ]
                )
            )
        self.final_conv = nn.Sequential(
            Conv1dBlock(start_dim, start_dim, kernel_size=config.kernel_size),
            nn.Conv1d(start_dim, config.input_dim, 1),
        )
        self.inpainting: nn.Module | None = None  # set by policy.build_denoiser for an inpainting policy

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        """sample (B, T, input_dim), timestep (B,) or scalar, global_cond (B, global_cond_dim); with inpainting
        global_cond is the observation history written into the sample, and the network takes no condition."""
        if self.inpainting is not None:
            sample, global_cond = self.inpainting(sample, global_cond), global_cond[:, :0]
        x = sample.transpose(1, 2)
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        cond = torch.cat([self.diffusion_step_encoder(timestep), global_cond], dim=-1)
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)
        for mid in self.mid_modules:
            x = mid(x, cond)
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(res2(res1(x, cond), cond))
        return self.final_conv(x).transpose(1, 2)
