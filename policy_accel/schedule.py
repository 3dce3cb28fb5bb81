"""Denoising schedules as batched, noise-free step functions.

Diffusers' schedulers define the chain; this module turns one configured scheduler into per-step
coefficient tables, so that a solver can apply step ``j`` to a whole window of states at once
(each row with its own step index) and add the pre-drawn noise itself:

    y_{j+1} = step(y_j, eps_theta(y_j, t_j), j) + noise_scale[j] * z_j

The arithmetic follows diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step`` (eta = 0)
operation by operation, so a chain built from it matches a plain diffusers loop to float round-off.

The multistep samplers ``dpmpp2m`` (DPM-Solver++ 2M) and ``unipc`` (UniPC-bh2) are not one-step chains: each step
also uses earlier steps' clean predictions. Their schedules hold the levels (timesteps, alphas) and per-step
coefficient tables (``Schedule.multistep``, see :mod:`policy_accel.multistep`); ``step`` refuses them, so only the
sequential solver (which runs :func:`policy_accel.multistep.solve_multistep`) samples them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from policy_accel.multistep import MULTISTEP_KINDS, build_tables, dynamic_threshold
from policy_accel.schema import check_fields

SCHEDULE_KINDS = ("ddpm", "ddim", *MULTISTEP_KINDS)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' defaults: DP's DDPM/DDIM use "leading"; DPMSolverMultistep/UniPCMultistep default to "linspace".
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp2m": "linspace", "unipc": "linspace"}


@dataclass
class ScheduleConfig:
    """Diffusion Policy's scheduler settings; ``kind`` and ``num_inference_steps`` pick the sampler.

    ``clip_sample`` clamps the predicted clean sample to [-1, 1] (DP trains with it; for the multistep kinds it is
    diffusers' dynamic thresholding at ``sample_max_value=1.0``, which reduces to that clamp). ``thresholding`` replaces
    the clamp by diffusers' dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1,
    sample_max_value), x0 <- clamp(x0, -s, s) / s. ``timestep_spacing`` None is the kind's diffusers default.
    """

    kind: str = "ddpm"
    num_inference_steps: int = 100
    num_train_timesteps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self)  # types first (a command-line "no" is not false), then ranges
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; valid: {', '.join(SCHEDULE_KINDS)}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={self.num_inference_steps} must be in [1, {self.num_train_timesteps}]"
            )
        if self.prediction_type != "epsilon":
            raise ValueError(f"prediction_type={self.prediction_type!r} is not supported (only 'epsilon')")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {self.timestep_spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)} or null"
            )
        if self.kind == "ddpm" and self.spacing != "leading":
            raise ValueError(f"timestep_spacing={self.timestep_spacing!r} is not supported for ddpm (only 'leading')")
        if self.thresholding and not (0 < self.dynamic_thresholding_ratio <= 1 and self.sample_max_value >= 1):
            raise ValueError(
                f"thresholding needs 0 < dynamic_thresholding_ratio <= 1 and sample_max_value >= 1, got "
                f"{self.dynamic_thresholding_ratio}, {self.sample_max_value}"
            )

    @property
    def spacing(self) -> str:
        """The timestep spacing in effect (``timestep_spacing``, or the kind's diffusers default)."""
        return self.timestep_spacing or DEFAULT_SPACING[self.kind]

    def make_scheduler(self) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler | UniPCMultistepScheduler:
        """The diffusers scheduler this schedule reproduces, with timesteps set."""
        common = dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            timestep_spacing=self.spacing,
            dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
        )
        if self.kind in MULTISTEP_KINDS:
            # No clip_sample in these schedulers: clamping x0 to [-1, 1] is their thresholding at max value 1.0.
            threshold = dict(
                thresholding=self.thresholding or self.clip_sample,
                sample_max_value=self.sample_max_value if self.thresholding else 1.0,
            )
            cls = DPMSolverMultistepScheduler if self.kind == "dpmpp2m" else UniPCMultistepScheduler
            extra = dict(algorithm_type="dpmsolver++", solver_type="midpoint") if self.kind == "dpmpp2m" else {}
            scheduler = cls(solver_order=2, lower_order_final=True, final_sigmas_type="zero", **common, **threshold,
                            **extra)  # fmt: skip
        else:
            common.update(
                clip_sample=self.clip_sample, thresholding=self.thresholding, sample_max_value=self.sample_max_value
            )
            if self.kind == "ddpm":
                scheduler = DDPMScheduler(variance_type="fixed_small", **common)
            else:
                scheduler = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)
        scheduler.set_timesteps(self.num_inference_steps)
        return scheduler


class Schedule:
    """Per-step coefficients of one sampler (T steps), as tensors indexed by step number.

    ``first_step`` > 0 keeps only the sampler's steps ``first_step..T-1`` (see :meth:`tail`): every kept
    step keeps its own timestep and alphas, so the truncated chain is the full chain's last steps.
    """

    def __init__(self, config: ScheduleConfig, device: torch.device | str = "cpu", first_step: int = 0):
        self.config = config
        scheduler = config.make_scheduler()
        ac = scheduler.alphas_cumprod
        timesteps = scheduler.timesteps.long()
        one = torch.tensor(1.0)
        n = len(timesteps)
        if not 0 <= first_step < n:
            raise ValueError(f"first_step={first_step} must be in [0, {n - 1}] for a {n}-step {config.kind} schedule")
        self.first_step = first_step
        self.device = torch.device(device)
        self.is_multistep = config.kind in MULTISTEP_KINDS
        self.multistep = None
        if self.is_multistep:
            self._init_multistep(scheduler, timesteps, first_step)
            return
        rows = []
        for j, t in enumerate(timesteps.tolist()):
            if config.kind == "ddpm":
                prev = timesteps[j + 1].item() if j + 1 < n else -1
            else:
                prev = t - config.num_train_timesteps // config.num_inference_steps
            a_t = ac[t]
            a_prev = ac[prev] if prev >= 0 else one
            beta_prod_t = 1 - a_t
            beta_prod_prev = 1 - a_prev
            current_alpha = a_t / a_prev
            current_beta = 1 - current_alpha
            # DDPM posterior variance (fixed_small); also the tolerance scale ParaDiGMS uses for DDIM.
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * current_beta, min=1e-20)
            if config.kind == "ddpm":
                c_x0 = (a_prev**0.5 * current_beta) / beta_prod_t
                c_y = current_alpha**0.5 * beta_prod_prev / beta_prod_t
                noise_scale = variance**0.5 if t > 0 else torch.tensor(0.0)
            else:
                c_x0 = a_prev**0.5
                c_y = (1 - a_prev) ** 0.5  # multiplies epsilon
                noise_scale = torch.tensor(0.0)
            rows.append([a_t**0.5, beta_prod_t**0.5, c_x0, c_y, noise_scale, variance, (a_prev / a_t) ** 0.5])
        table = torch.tensor(rows, dtype=torch.float32)[first_step:]
        timesteps = timesteps[first_step:]
        self.timesteps = timesteps.to(device)
        self.sqrt_alpha_prod = table[:, 0].to(device)
        self.sqrt_beta_prod = table[:, 1].to(device)
        self.coef_x0 = table[:, 2].to(device)
        self.coef_y = table[:, 3].to(device)
        self.noise_scale = table[:, 4].to(device)
        self.variance = table[:, 5].to(device)
        # Coefficient of y in the step's linear (unclipped) part; ParaTAA unrolls steps with it.
        self.linear_coef = table[:, 6].to(device)
        self.is_ode = config.kind == "ddim"

    def _init_multistep(self, scheduler, timesteps: torch.Tensor, first_step: int) -> None:
        """Levels and coefficient tables of a multistep sampler, from diffusers' own sigmas for these timesteps."""
        sigmas = scheduler.sigmas.double()  # (n + 1,): sqrt((1 - abar) / abar) at each timestep, then 0
        alpha = 1 / (sigmas**2 + 1) ** 0.5
        self.timesteps = timesteps[first_step:].to(self.device)
        self.sqrt_alpha_prod = alpha[first_step:-1].float().to(self.device)
        self.sqrt_beta_prod = (sigmas * alpha)[first_step:-1].float().to(self.device)
        self.noise_scale = torch.zeros(len(self.timesteps), device=self.device)
        # Not one-step chains: the one-step coefficients parallel solvers use do not exist (NaN, and `step` refuses).
        nan = torch.full((len(self.timesteps),), float("nan"), device=self.device)
        self.coef_x0 = self.coef_y = self.variance = self.linear_coef = nan
        self.is_ode = True
        self.multistep = build_tables(self.config.kind, sigmas.numpy(), first_step)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def is_tail(self) -> bool:
        """True for a truncated schedule (:meth:`tail`): it starts at a noise level below pure noise."""
        return self.first_step > 0

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.config, device, self.first_step)

    def tail(self, k: int) -> Schedule:
        """The last ``k`` steps of this schedule, each with its own timestep and coefficients.

        Used to finish a sample that was re-noised to step ``T-k``'s level (an approximate warm start):
        a chain over ``tail(k)`` started from the full chain's state ``y_{T-k}`` ends at the full sample.
        """
        if not 1 <= k <= self.num_steps:
            raise ValueError(f"tail length k={k} must be in [1, {self.num_steps}]")
        return Schedule(self.config, self.device, self.first_step + self.num_steps - k)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Forward process q(x_t | x_0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at step ``index``'s timestep."""
        return self.sqrt_alpha_prod[index] * x0 + self.sqrt_beta_prod[index] * eps

    def predict_x0(self, y: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Clipped prediction of the clean sample; rows of ``y`` use step ``index`` (shape (N,))."""
        s0 = self.sqrt_alpha_prod[index].view(-1, *([1] * (y.ndim - 1)))
        s1 = self.sqrt_beta_prod[index].view(-1, *([1] * (y.ndim - 1)))
        x0 = (y - s1 * eps) / s0
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        return x0

    def step(self, y: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Deterministic part of step ``index`` for every row: posterior mean (DDPM) or DDIM(eta=0)."""
        if self.is_multistep:
            raise ValueError(
                f"{self.config.kind} is a multistep sampler (each step uses earlier steps' predictions), not a "
                "one-step chain: only solver=sequential runs it"
            )
        shape = (-1, *([1] * (y.ndim - 1)))
        x0 = self.predict_x0(y, eps, index)
        c_x0 = self.coef_x0[index].view(shape)
        c_y = self.coef_y[index].view(shape)
        if self.is_ode:
            # diffusers' DDIM keeps the network's epsilon (use_clipped_model_output=False), as DP does.
            return c_x0 * x0 + c_y * eps
        return c_x0 * x0 + c_y * y

    def describe(self) -> dict:
        return {**asdict(self.config), **({"first_step": self.first_step} if self.first_step else {})}
