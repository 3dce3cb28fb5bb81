"""A Diffusion Policy: observation history -> normalized condition -> solver -> action chunk."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from policy_accel.normalizer import LinearNormalizer
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers.base import Budget, Noise, Solver, SolveResult
from policy_accel.unet import ConditionalUnet1D, UNetConfig


@dataclass
class PolicyConfig:
    """Shapes and training schedule of a low-dim FiLM Diffusion Policy."""

    task: str = "pusht"
    obs_dim: int = 18
    action_dim: int = 2
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**self.unet)
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleConfig(**self.schedule)
        if self.unet.input_dim != self.action_dim:
            raise ValueError(f"unet.input_dim={self.unet.input_dim} != action_dim={self.action_dim}")
        if self.unet.global_cond_dim != self.obs_dim * self.n_obs_steps:
            raise ValueError(
                f"unet.global_cond_dim={self.unet.global_cond_dim} != "
                f"obs_dim*n_obs_steps={self.obs_dim * self.n_obs_steps}"
            )
        if self.horizon % 2 ** (len(self.unet.down_dims) - 1):
            raise ValueError(f"horizon={self.horizon} must be divisible by 2**(len(down_dims)-1)")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError("n_obs_steps - 1 + n_action_steps must not exceed horizon")

    def to_dict(self) -> dict:
        return asdict(self)


class DiffusionPolicy:
    """Holds the denoiser and normalizers; sampling is delegated to a solver."""

    def __init__(
        self,
        config: PolicyConfig,
        model: ConditionalUnet1D,
        obs_normalizer: LinearNormalizer,
        action_normalizer: LinearNormalizer,
    ):
        if obs_normalizer.dim != config.obs_dim or action_normalizer.dim != config.action_dim:
            raise ValueError(
                f"normalizer dims ({obs_normalizer.dim}, {action_normalizer.dim}) do not match "
                f"config (obs_dim={config.obs_dim}, action_dim={config.action_dim})"
            )
        self.config = config
        self.model = model.eval()
        self._forward = self.model  # what `denoiser` runs: the module, or its CUDA graphs
        self.obs_normalizer = obs_normalizer
        self.action_normalizer = action_normalizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> DiffusionPolicy:
        if torch.device(device).type == "cuda":
            # Exactness is checked in float32: TF32 convolutions (PyTorch's cuDNN default) carry ~1e-3 relative
            # error, which moves samples off the CPU's and ruins the finite-difference Jacobians of Newton.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model.to(device)
        self.obs_normalizer.to(device)
        self.action_normalizer.to(device)
        self._forward = self.model  # captured graphs belong to the old device
        return self

    def use_cuda_graphs(self) -> DiffusionPolicy:
        """Replay the denoiser from CUDA graphs (one per padded batch size; see policy_accel.graphs)."""
        from policy_accel.graphs import GraphedDenoiser

        self._forward = GraphedDenoiser(self.model)
        return self

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return (self.config.horizon, self.config.action_dim)

    def schedule(self, **overrides) -> Schedule:
        """The training schedule, or a sampler variant of it (e.g. ``kind="ddim", num_inference_steps=10``)."""
        return Schedule(replace(self.config.schedule, **overrides), self.device)

    def denoiser(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        return self._forward(sample, timestep, global_cond)

    def condition(self, obs_history: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, n_obs_steps, obs_dim) raw observations -> (B, n_obs_steps * obs_dim) normalized condition."""
        obs = torch.as_tensor(np.asarray(obs_history) if not torch.is_tensor(obs_history) else obs_history)
        expected = (self.config.n_obs_steps, self.config.obs_dim)
        if obs.ndim != 3 or tuple(obs.shape[1:]) != expected:
            raise ValueError(
                f"observation history must have shape (B, {expected[0]}, {expected[1]}), got {tuple(obs.shape)}"
            )
        if not torch.isfinite(obs).all():
            raise ValueError("observation history contains NaN or inf")
        obs = obs.to(self.device, torch.float32)
        return self.obs_normalizer.normalize(obs).reshape(obs.shape[0], -1)

    def draw_noise(self, schedule: Schedule, batch: int, generator: torch.Generator | None = None) -> Noise:
        return Noise.draw(schedule.num_steps, (batch, *self.chunk_shape), generator, device="cpu").to_device(
            self.device
        )

    @torch.inference_mode()
    def sample(
        self,
        global_cond: torch.Tensor,
        solver: Solver,
        schedule: Schedule,
        noise: Noise,
        init: torch.Tensor | None = None,
        budget: Budget | None = None,
        carry: dict | None = None,
    ) -> SolveResult:
        """Solve the denoising chain in normalized action space."""
        return solver.solve(self.denoiser, schedule, noise, global_cond, init=init, budget=budget, carry=carry)

    def actions(self, normalized_chunk: torch.Tensor) -> np.ndarray:
        """Normalized chunk (B, H, A) -> the executed raw actions (B, n_action_steps, A)."""
        start = self.config.n_obs_steps - 1
        chunk = self.action_normalizer.unnormalize(normalized_chunk[:, start : start + self.config.n_action_steps])
        return chunk.detach().cpu().numpy()

    def predict_action(
        self,
        obs_history: np.ndarray | torch.Tensor,
        solver: Solver,
        schedule: Schedule | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, SolveResult]:
        """One cold inference with fresh noise: executed actions (B, n_action_steps, A) and the solve's stats."""
        schedule = schedule or self.schedule()
        cond = self.condition(obs_history)
        noise = self.draw_noise(schedule, cond.shape[0], generator)
        result = self.sample(cond, solver, schedule, noise)
        return self.actions(result.sample), result
