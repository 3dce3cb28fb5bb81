"""A Diffusion Policy: observation history -> normalized condition -> solver -> action chunk."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from policy_accel.errors import ObservationError
from policy_accel.model.engine import CPU_ENGINES, EngineInfo, compile_denoiser, compile_encoder, resolve_engine
from policy_accel.model.inpainting import ObservationInpainting
from policy_accel.model.normalizer import LinearNormalizer
from policy_accel.model.transformer import TransformerConfig, TransformerForDiffusion, check_transformer_config
from policy_accel.model.unet import ConditionalUnet1D, UNetConfig
from policy_accel.model.vision import EncoderConfig, ImageNormalizer, ObservationEncoder
from policy_accel.observations import (
    Observation,
    ObservationHistory,
    check_observation,
    check_observation_dict,
)
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.schema import check_fields, check_mapping
from policy_accel.solvers.base import Noise, Solver, SolveResult

log = logging.getLogger(__name__)


DENOISERS = ("unet", "transformer")  # Diffusion Policy's ConditionalUnet1D and TransformerForDiffusion (DP-T)


@dataclass
class PolicyConfig:
    """Shapes and training schedule of a Diffusion Policy: its denoiser (``unet`` or ``transformer``, whose
    architecture is the section of that name; the other is None) and how observations condition it (``inpainting``:
    DP's ``obs_as_global_cond=False``, the chunk is ``[action | observation]``; otherwise the network's condition).

    ``encoder`` (an image policy): the observation is a dict of camera images and low-dim keys, and the encoder's
    features of it are the network's condition; ``obs_dim`` is then the total of the encoder's low-dim keys (the
    vector ``obs_normalizer`` normalizes, in the encoder config's ``low_dim`` order)."""

    task: str = "pusht"
    obs_dim: int = 18
    action_dim: int = 2
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    unet: UNetConfig | None = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    denoiser: str = "unet"
    transformer: TransformerConfig | None = None
    inpainting: bool = False
    encoder: EncoderConfig | None = None

    def __post_init__(self) -> None:
        # Types first, then ranges: a config that loads must also run (n_action_steps=0 never ends an episode,
        # "16" as horizon fails deep inside, "no" would read as a true clip_sample).
        check_fields(self, skip=("unet", "schedule", "transformer", "encoder"))
        if self.denoiser not in DENOISERS:
            raise ValueError(f"denoiser={self.denoiser!r} is not one of {list(DENOISERS)}")
        sections = (("unet", UNetConfig), ("schedule", ScheduleConfig), ("transformer", TransformerConfig))
        for name, cls in sections:
            value = getattr(self, name)
            if value is None and name != "schedule" and name != self.denoiser:
                continue  # the other denoiser's section
            if isinstance(value, dict):
                check_mapping(value, cls, f"{name}.")
                setattr(self, name, cls(**value))
            elif isinstance(value, cls):
                check_fields(value, f"{name}.")
            else:
                raise ValueError(f"{name} must be a mapping, got {value!r}")
        other = "transformer" if self.denoiser == "unet" else "unet"
        if getattr(self, other) is not None:
            raise ValueError(f"denoiser={self.denoiser!r} takes no {other} section (set {other}: null)")
        self._check_encoder()
        for name in ("action_dim", "horizon", "n_obs_steps", "n_action_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError("n_obs_steps - 1 + n_action_steps must not exceed horizon")
        if self.inpainting and self.n_obs_steps > self.horizon:
            raise ValueError(f"n_obs_steps={self.n_obs_steps} must not exceed horizon={self.horizon} with inpainting")
        if self.inpainting and self.schedule.thresholding:
            # dynamic thresholding mixes channels: the observed channels' update would reach the actions
            raise ValueError("schedule.thresholding=true is not supported with inpainting (only clip_sample)")
        if self.denoiser == "unet":
            self._check_unet()
        else:
            self._check_transformer()

    @property
    def chunk_dim(self) -> int:
        """Channels of the denoised chunk: the actions, and with inpainting the observations after them."""
        return self.action_dim + (self.obs_dim if self.inpainting else 0)

    @property
    def step_cond_dim(self) -> int:
        """Condition width per observation step: the observation, or the encoder's features of it."""
        return self.obs_dim if self.encoder is None else self.encoder.step_feature_dim()

    @property
    def cond_dim(self) -> int:
        """Width of the condition the denoiser is called with: the flattened normalised observation history, or the
        encoder's features of it (with inpainting it is written into the chunk instead of conditioning the network)."""
        return self.step_cond_dim * self.n_obs_steps

    def _check_encoder(self) -> None:
        """The ``encoder`` section as an :class:`EncoderConfig` (from a config.json mapping), consistent with
        ``obs_dim``; without one, ``obs_dim`` is the observation's size."""
        if self.encoder is None:
            if self.obs_dim < 1:
                raise ValueError(f"obs_dim={self.obs_dim} must be >= 1")
            return
        if isinstance(self.encoder, dict):
            try:
                self.encoder = EncoderConfig.from_dict(self.encoder)
            except ValueError as err:  # "EncoderConfig.width: ..." -> "encoder.width: ..."
                raise ValueError(f"encoder.{str(err).removeprefix('EncoderConfig.')}") from None
        elif not isinstance(self.encoder, EncoderConfig):
            raise ValueError(f"encoder must be a mapping, got {self.encoder!r}")
        if self.obs_dim != self.encoder.low_dim_total:
            raise ValueError(
                f"obs_dim={self.obs_dim} != the encoder's low-dim total {self.encoder.low_dim_total} "
                f"({dict(self.encoder.low_dim)})"
            )
        if self.inpainting:
            raise ValueError(
                "inpainting=true is not supported with an image encoder (Diffusion Policy's image "
                "policies condition the network on the encoder's features)"
            )

    def _check_transformer(self) -> None:
        net = self.transformer
        check_transformer_config(net)
        want = {
            "input_dim": self.chunk_dim,
            "output_dim": self.chunk_dim,
            "horizon": self.horizon,
            "cond_dim": 0 if self.inpainting else self.step_cond_dim,
            "obs_as_cond": not self.inpainting,
        }
        if not self.inpainting:  # the number of observation tokens (an inpainting transformer has none)
            want["n_obs_steps"] = self.n_obs_steps
        for name, value in want.items():
            if getattr(net, name) != value:
                raise ValueError(
                    f"transformer.{name}={getattr(net, name)!r} != {value!r} (from obs_dim={self.obs_dim}, "
                    f"action_dim={self.action_dim}, horizon={self.horizon}, n_obs_steps={self.n_obs_steps}, "
                    f"inpainting={self.inpainting}, step condition width {self.step_cond_dim})"
                )

    def _check_unet(self) -> None:
        unet = self.unet
        for name in ("diffusion_step_embed_dim", "kernel_size", "n_groups"):
            if getattr(unet, name) < 1:
                raise ValueError(f"unet.{name}={getattr(unet, name)} must be >= 1")
        if not unet.down_dims or any(d < 1 for d in unet.down_dims):
            raise ValueError(f"unet.down_dims={unet.down_dims} must be a non-empty list of positive integers")
        if unet.kernel_size % 2 == 0:
            raise ValueError(f"unet.kernel_size={unet.kernel_size} must be odd (same-length convolutions)")
        if any(d % unet.n_groups for d in unet.down_dims):
            raise ValueError(f"unet.n_groups={unet.n_groups} must divide every down_dims entry {unet.down_dims}")
        sched = self.schedule
        if sched.num_train_timesteps < 1:
            raise ValueError(f"schedule.num_train_timesteps={sched.num_train_timesteps} must be >= 1")
        if not 0 < sched.beta_start < sched.beta_end < 1:
            raise ValueError(
                f"schedule.beta_start={sched.beta_start}, beta_end={sched.beta_end}: need 0 < beta_start < beta_end < 1"
            )
        if unet.input_dim != self.chunk_dim:
            what = "action_dim + obs_dim (inpainting)" if self.inpainting else "action_dim"
            raise ValueError(f"unet.input_dim={unet.input_dim} != {what} = {self.chunk_dim}")
        global_cond_dim = 0 if self.inpainting else self.cond_dim
        if unet.global_cond_dim != global_cond_dim:
            what = "0 (inpainting)" if self.inpainting else "obs_dim*n_obs_steps"
            if self.encoder is not None:
                what = "encoder features per step*n_obs_steps"
            raise ValueError(f"unet.global_cond_dim={unet.global_cond_dim} != {what} = {global_cond_dim}")
        if self.horizon % 2 ** (len(unet.down_dims) - 1):
            raise ValueError(f"horizon={self.horizon} must be divisible by 2**(len(down_dims)-1)")

    def to_dict(self) -> dict:
        """JSON-safe (config.json's ``policy`` section): the encoder as its own mapping form."""
        out = asdict(self)
        out["encoder"] = None if self.encoder is None else self.encoder.to_dict()
        return out


def build_denoiser(config: PolicyConfig) -> nn.Module:
    """The denoiser ``config`` describes, untrained, with its inpainting step when the policy inpaints: what
    training and every checkpoint reader load weights into (parameter names are Diffusion Policy's)."""
    model = ConditionalUnet1D(config.unet) if config.denoiser == "unet" else TransformerForDiffusion(config.transformer)
    if config.inpainting:
        model.inpainting = ObservationInpainting(config.action_dim, config.obs_dim, config.n_obs_steps)
    return model


def check_finite_tensors(named: dict[str, torch.Tensor], what: str = "") -> None:
    """Every tensor finite: one NaN weight makes every action NaN, or a solver's starting noise pass as converged."""
    for name, tensor in named.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{what + ' ' if what else ''}tensor {name} has {bad} non-finite value(s) (NaN or inf)")


NORMALIZED_OBSERVATION_LIMIT = 1e6  # normalized units: no real observation is a million training ranges out


class DiffusionPolicy:
    """Holds the denoiser, the normalizers and an image policy's observation encoder; sampling is delegated to a
    solver, which sees only the condition (the encoder runs once per inference, in :meth:`condition`)."""

    def __init__(
        self,
        config: PolicyConfig,
        model: nn.Module,
        obs_normalizer: LinearNormalizer,
        action_normalizer: LinearNormalizer,
        encoder: ObservationEncoder | None = None,
    ):
        if obs_normalizer.dim != config.obs_dim or action_normalizer.dim != config.action_dim:
            raise ValueError(
                f"normalizer dims ({obs_normalizer.dim}, {action_normalizer.dim}) do not match "
                f"config (obs_dim={config.obs_dim}, action_dim={config.action_dim})"
            )
        if (encoder is None) != (config.encoder is None) or encoder is not None and encoder.config != config.encoder:
            raise ValueError("the observation encoder must be built from the config's encoder section (or both None)")
        self.config = config
        self.model = model.eval()
        self.encoder = None if encoder is None else encoder.eval()
        # the source policy's image normalisation (DP: [0, 1] -> [-1, 1]; LeRobot: mean/std), before the encoder
        self.image_normalizer = None if config.encoder is None else ImageNormalizer(config.encoder)
        self._serve_eager()
        self._weight_tensors: list[torch.Tensor] = []
        self.obs_normalizer = obs_normalizer
        self.action_normalizer = action_normalizer
        self.check_finite()

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
        if self.encoder is not None:
            self.encoder.to(device)
            self.image_normalizer.to(device)
        self.obs_normalizer.to(device)
        self.action_normalizer.to(device)
        self._serve_eager()  # a compiled engine belongs to the old device
        return self

    def _serve_eager(self) -> None:
        """The module itself serves the denoiser, and no compiled engine is kept."""
        self._forward = self.model  # what `denoiser` runs: the module, or its compiled engine (use_engine)
        self._encode = self.encoder  # what `condition` runs an image policy's encoder on (use_engine)
        self.engine = EngineInfo(
            "torch",
            torch.__version__,
            "f32",
            torch.get_num_threads(),
            encoder="none" if self.encoder is None else "torch",
        )
        self._compiled: dict[tuple, tuple] = {}  # engines compiled for the weights of _engine_fingerprint
        self._engine_fingerprint: int | None = None
        self._engine_cache_dir: Path | None = None

    def use_engine(
        self,
        engine: str = "auto",
        threads: int | None = None,
        precision: str = "f32",
        cache_dir: Path | None = None,
        fuse_chains: bool = False,
        static_shapes: bool = True,
    ) -> DiffusionPolicy:
        """Serve the denoiser from ``engine`` (``auto``: the fastest exact one for this device; see
        :mod:`policy_accel.model.engine`). The engine holds a copy of the weights as they are now; an in-place
        change of them is recompiled before the next inference (:meth:`sync_engine`). ``precision="bf16"``
        (OpenVINO) is approximate and labelled so in ``self.engine``; ``fuse_chains`` (OpenVINO) runs short
        sequential chains as one program each (exact); ``static_shapes=False`` (OpenVINO) serves every batch size
        from one dynamic-shape program instead of static ones per size bucket (slower; for comparison).
        ``threads`` (default: torch's setting) go to the engine; with a CPU engine torch itself is set to one thread."""
        name = resolve_engine(engine, self.device)
        threads = torch.get_num_threads() if threads is None else threads
        # inference tensors (weights loaded under torch.inference_mode) keep no version counter
        modules = [self.model] if self.encoder is None else [self.model, self.encoder]
        self._weight_tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if not t.is_inference()]
        fingerprint = self._weights_fingerprint()
        if self._engine_fingerprint != fingerprint:
            self._compiled = {}  # compiled for other weights
        key = (name, threads, precision, fuse_chains, static_shapes, str(cache_dir))
        if key not in self._compiled:  # switching back to an engine compiled for these weights costs nothing
            self._compiled[key] = compile_denoiser(
                self.model,
                name,
                sample_shape=self.chunk_shape,
                cond_dim=self.config.cond_dim,
                threads=threads,
                precision=precision,
                cache_dir=cache_dir,
                fuse_chains=fuse_chains,
                static_shapes=static_shapes,
            )
        self._forward, self.engine = self._compiled[key]
        if self.encoder is not None:
            encoder_key = ("encoder", name, threads, str(cache_dir))
            if encoder_key not in self._compiled:
                self._compiled[encoder_key] = compile_encoder(
                    self.encoder, name, n_obs_steps=self.config.n_obs_steps, threads=threads, cache_dir=cache_dir
                )
            self._encode, encoder_engine = self._compiled[encoder_key]
            compile_s = self.engine.compile_s + getattr(self._encode, "compile_s", 0.0)
            self.engine = replace(self.engine, encoder=encoder_engine, compile_s=compile_s)
        self._engine_fingerprint, self._engine_cache_dir = fingerprint, cache_dir
        # A CPU engine takes the threads; torch keeps one for the sampler's small steps around the calls (its idle
        # OpenMP threads otherwise spin on the cores the engine needs: DDIM-10 12.5 vs 14.5 ms per inference here).
        torch.set_num_threads(1 if name in CPU_ENGINES else threads)
        return self

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return (self.config.horizon, self.config.chunk_dim)

    def schedule(self, **overrides) -> Schedule:
        """The training schedule, or a sampler variant of it (e.g. ``kind="ddim", num_inference_steps=10``)."""
        return Schedule(replace(self.config.schedule, **overrides), self.device)

    @property
    def denoiser(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``denoiser(sample, timestep, global_cond) -> eps``: the module, or the engine serving it (which may also
        offer whole compiled chains to the sequential solver)."""
        return self._forward

    def observation_history(self) -> ObservationHistory:
        """An empty history that checks each observation as this policy takes it (a vector of ``obs_dim``, or a dict
        of the encoder's cameras and low-dim keys) and pads as DP does."""
        if self.config.encoder is None:
            return ObservationHistory(self.config.n_obs_steps, self.config.obs_dim)
        return ObservationHistory(self.config.n_obs_steps, layout=self.config.encoder)

    def check_observation(
        self, obs: Observation, lead: tuple[int | None, ...], what: str = "observation"
    ) -> Observation:
        """``obs`` checked as this policy's observations with leading axes ``lead`` (e.g. ``(None,)``: a batch of
        steps): ``(*lead, obs_dim)``, or a dict of the encoder's keys (:func:`check_observation_dict`)."""
        if self.config.encoder is None:
            return check_observation(obs, (*lead, self.config.obs_dim), what)
        return check_observation_dict(obs, self.config.encoder, lead, what)

    def condition(self, obs_history: Observation) -> torch.Tensor:
        """Raw observation history -> the (B, cond_dim) condition. Low-dim: (B, n_obs_steps, obs_dim), normalized
        and flattened. With an encoder: a dict of (B, n_obs_steps, ...) arrays, each camera's images float in [0, 1]
        and (C, H, W) per step (as DP's environments give them), each low-dim key's raw values; the encoder's
        features of the normalized images and low-dim values, computed once here (never per denoising call)."""
        # the check every entry path runs
        obs = self.check_observation(obs_history, (None, self.config.n_obs_steps), "observation history")
        encoder = self.config.encoder
        if encoder is None:
            return self._normalized(torch.as_tensor(obs).to(self.device, torch.float32)).reshape(len(obs), -1)
        images = {name: torch.as_tensor(obs[name]).to(self.device, torch.float32) for name in encoder.camera_names}
        low_dim = None
        if encoder.low_dim:  # one vector in the encoder's low_dim order: what obs_normalizer normalizes
            parts = [torch.as_tensor(obs[name]).to(self.device, torch.float32) for name in encoder.low_dim_names]
            low_dim = self._normalized(torch.cat(parts, dim=-1))
        with torch.inference_mode():
            return self._encode(self.image_normalizer(images), low_dim)

    def _normalized(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, n_obs_steps, obs_dim) raw low-dim observations -> normalized, refused when far outside training."""
        cond = check_observation(self.obs_normalizer.normalize(obs), tuple(obs.shape), "normalized observation")
        far = cond.abs() > NORMALIZED_OBSERVATION_LIMIT
        if far.any():  # refused on every engine alike (eager PyTorch overflows to NaN there, a compiled graph may not)
            b, t, d = (int(i) for i in torch.nonzero(far)[0])
            raise ObservationError(
                f"the normalized observation reaches {float(cond.abs().max()):.3g} at [batch {b}, step {t}, dim {d}] "
                f"(the training data spans [-1, 1]; limit {NORMALIZED_OBSERVATION_LIMIT:g}): check the observation's "
                "units and layout"
            )
        return cond

    def sync_engine(self) -> None:
        """Recompile the engine when the module's weights changed since it was compiled (an engine holds a copy):
        once per inference, so that a policy whose weights were edited in place never runs the old ones."""
        if self.engine.name != "torch" and self._weights_fingerprint() != self._engine_fingerprint:
            log.warning("the denoiser's weights changed since engine %s compiled them: recompiling", self.engine.name)
            self.use_engine(
                self.engine.name,
                self.engine.threads,
                self.engine.precision,
                self._engine_cache_dir,
                self.engine.fused_chains,
            )

    def _weights_fingerprint(self) -> int:
        """How often the weight tensors were changed in place (torch counts in-place writes, load_state_dict's copies
        included): cheap enough to compare once per inference (the tensors are listed once per engine)."""
        return sum(t._version for t in self._weight_tensors)

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming a non-finite weight, or a non-finite or zero normalizer scale: such a policy
        returns NaN actions, or a solver's starting noise passes as converged (weights can change after loading)."""
        state = dict(self.model.state_dict())
        # DP-T's attention masks are additive: 0 where attention is allowed, -inf where not, nothing else
        masks = {k: state.pop(k) for k in list(state) if k.endswith("mask")}
        for key, mask in masks.items():
            if not ((mask == 0) | (mask == float("-inf"))).all():
                raise ValueError(f"denoiser tensor {key} is an attention mask with values other than 0 and -inf")
        check_finite_tensors(state, "denoiser")
        if self.encoder is not None:
            check_finite_tensors(self.encoder.state_dict(), "encoder")
        for name, norm in (("obs", self.obs_normalizer), ("action", self.action_normalizer)):
            check_finite_tensors({f"normalizer.{name}.scale": norm.scale, f"normalizer.{name}.offset": norm.offset})
            if (norm.scale == 0).any():  # unnormalize divides by it
                zero = [int(i) for i in torch.nonzero(norm.scale == 0).flatten()]
                raise ValueError(f"tensor normalizer.{name}.scale is zero at dims {zero} (the map is not invertible)")

    def draw_noise(self, schedule: Schedule, batch: int, generator: torch.Generator | None = None) -> Noise:
        return Noise.draw(schedule.num_steps, (batch, *self.chunk_shape), generator, device="cpu").to_device(
            self.device
        )

    def actions(self, normalized_chunk: torch.Tensor) -> np.ndarray:
        """Normalized chunk (B, H, chunk_dim) -> the executed raw actions (B, n_action_steps, A): DP executes the
        chunk from the newest observation's step (``n_obs_steps - 1``)."""
        start = self.config.n_obs_steps - 1
        return self._raw(normalized_chunk[:, start : start + self.config.n_action_steps])

    def reserve(self, normalized_chunk: torch.Tensor) -> np.ndarray:
        """Normalized chunk (B, H, chunk_dim) -> the raw predictions after the executed actions (B, rest, A): what
        a real-time controller plays when the next chunk is late."""
        return self._raw(normalized_chunk[:, self.config.n_obs_steps - 1 + self.config.n_action_steps :])

    def _raw(self, normalized_actions: torch.Tensor) -> np.ndarray:
        actions = normalized_actions[..., : self.config.action_dim]  # an inpainting chunk also holds observations
        return self.action_normalizer.unnormalize(actions).detach().cpu().numpy()

    def predict_action(
        self,
        obs_history: Observation,
        solver: Solver,
        schedule: Schedule | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[np.ndarray, SolveResult]:
        """One cold inference with fresh noise: executed actions (B, n_action_steps, A) and the solve's stats."""
        schedule = schedule or self.schedule()
        self.sync_engine()
        cond = self.condition(obs_history)
        noise = self.draw_noise(schedule, cond.shape[0], generator)
        with torch.inference_mode():
            result = solver.solve(self.denoiser, schedule, noise, cond)
        return self.actions(result.sample), result
