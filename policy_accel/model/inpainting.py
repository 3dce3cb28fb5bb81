"""Inpainting conditioning (Diffusion Policy's ``obs_as_global_cond=False``): the chunk is ``[action | observation]``
on the last axis, and the observed entries are overwritten with the clean normalised observations before every
denoiser call.

Why inside the denoiser: the overwrite is part of every step of DP's sampler, so a solver that solves the chain
``y_{j+1} = step_j(y_j) + xi_j`` must see it in ``step_j``. Putting it at the network's input makes the network
output the one DP computes; the step's update of the observed channels themselves is never read (they are overwritten
again before the next call, and the policy executes only action channels), and the update is per entry (clip, not
dynamic thresholding, which the policy refuses with inpainting), so the action channels equal DP's exactly. Every
solver and warm start then works unchanged: a denoiser is a denoiser.
"""

from __future__ import annotations

import torch
from torch import nn


class ObservationInpainting(nn.Module):
    """Overwrite the first ``n_obs_steps`` rows of the observation channels with the condition. No parameters, so a
    network holding it keeps Diffusion Policy's state-dict names."""

    def __init__(self, action_dim: int, obs_dim: int, n_obs_steps: int):
        super().__init__()
        self.action_dim, self.obs_dim, self.n_obs_steps = action_dim, obs_dim, n_obs_steps

    def forward(self, sample: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        """sample (B, H, action_dim + obs_dim), global_cond (B, n_obs_steps * obs_dim) -> the inpainted sample.
        Written with concatenations (no in-place write) so the module exports to ONNX as it runs."""
        B, A, To = sample.shape[0], self.action_dim, self.n_obs_steps
        observed = global_cond.reshape(B, To, self.obs_dim).to(sample.dtype)
        obs = torch.cat([observed, sample[:, To:, A:]], dim=1)
        return torch.cat([sample[..., :A], obs], dim=-1)

    def extra_repr(self) -> str:
        return f"action_dim={self.action_dim}, obs_dim={self.obs_dim}, n_obs_steps={self.n_obs_steps}"
