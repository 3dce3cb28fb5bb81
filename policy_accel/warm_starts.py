"""Warm starts across control steps: one small class per kind, registered by name like the solvers.

A :class:`WarmStart` is owned by a :class:`~policy_accel.session.Session`. At each inference it prepares the chain
to solve from the previous result (:meth:`WarmStart.prepare`: schedule or its tail, noise, initial state), may own
the solve (:meth:`WarmStart.solve`, Falcon), keeps what the next inference needs (:meth:`WarmStart.update`), and says
what it is: its ``key`` (the config's and results.json's ``warm_start`` value), whether it is exact, and its options
(:meth:`WarmStart.record`, :meth:`WarmStart.label`, :meth:`WarmStart.overrides`). Nothing outside this module lists
the kinds: configs, results, reports and fronts go through :func:`make_warm_start` / :func:`warm_start_of`.

* ``Cold`` (``warm_start=false``): every inference solves from x_T.
* ``Exact`` (``warm_start=true``, ``tail_fill``): the previous solve's warm state (trajectory, plus e.g. Newton's
  Jacobians) shifted by the executed actions is the solver's initial guess; the new tail positions repeat the last
  one (``repeat``) or follow a noise-consistent chain (``chain``, :func:`tail_chain`). The solver still solves this
  inference's chain to its tolerance: the cost changes, not the answer (unless the solver's stopping test is fooled
  by a good guess: warm ParaDiGMS, labelled approximate).
* ``TailRestart`` (APPROXIMATE; ``warm_start=renoise`` with ``renoise_steps=k``, or ``warm_start=rti`` with
  ``rti.*``): the previous clean chunk, shifted, starts the schedule's last k steps, re-noised to step T-k's level
  with this inference's x_T draw (re-noise) or as it is (RTI-DP). Not the sampler's output for any noise.
* ``Falcon`` (APPROXIMATE; ``warm_start=falcon`` with ``falcon.*``): restarts from a buffered partially denoised
  chunk; owns its solve.
* ``AdaptiveRestart`` (APPROXIMATE; ``warm_start=adaptive`` with ``adaptive.*``): a tail restart whose level is chosen
  per inference and per row from how far the observation moved since the previous inference; owns its solve.

The published ones:

* **RTI-DP** (Duan, Yin, Kragic, "Real-time Iteration Scheme for Diffusion Policy", IROS 2025, arXiv:2508.05396;
  code RTI-DP/rti-dp, ``diffusion_unet_lowdim_rti_policy.py``): the first inference of an episode is a full solve;
  every later one takes the previous *clean* chunk, shifted by the executed actions with the last action repeated
  (``rti_sample``: ``cat([guess[:, 1:], guess[:, -1:]])``, shift 1 there because they execute one action), treats it
  as the sample at a low timestep *without adding noise*, and runs the sampler's steps from there with the current
  observation (``steps: [2, 1, 0]`` of DDPM-100 for state PushT: our ``policy=ddpm100 rti.steps=3``). Their "clip"
  variant binarizes the discrete (gripper) action dimensions of the stored guess to +-1/factor (``predict_action``,
  the ``not self.scale`` branch); "scale" needs a rescaled training set (training, so not here). Not implemented:
  their binarization of the *executed* gripper action (an output post-processing, not part of the warm start), and
  step lists that are not the tail of one schedule (e.g. [10, 5, 1, 0]; their DDPM steps then jump levels). The
  paper's contractivity condition for choosing the initial step (its theory section) was not available to us (only
  the abstract and code were); the step count is a knob.

* **Falcon** (Chen et al., "Falcon: Fast Visuomotor Policies via Partial Denoising", ICML 2025, arXiv:2503.00339).
  The paper's code is not public and we could read only its abstract and third-party summaries of its method, so each
  piece below names the summary's description it implements and says where we had to choose:
  (1) a buffer of partially denoised chunks from earlier inferences ("latent buffer"), each shifted to the current
  time; (2) the previous prediction's unexecuted part is the *reference action*; (3) every buffered candidate gets a
  one-step clean estimate with the current observation (one batched network call) and passes when it is within the
  threshold epsilon of the reference; (4) among passing candidates a softmax with temperature picks the start,
  preferring lower noise; (5) with probability delta ("exploration rate") the inference starts from Gaussian noise;
  (6) ``k_min``: candidates too close to the end of the chain are not reused; (7) a bounded buffer that evicts older
  and noisier entries first ("priority queue"). Our choices, not from the paper: the distance is the RMS over the
  overlapping positions in normalized action space; the softmax logits are ``-remaining_steps / temperature``; the
  new tail positions of a shifted entry are the repeated last clean action forward-noised to the entry's level with
  this inference's x_T draw; entries stop being candidates once they no longer overlap the horizon; and the screening
  call's network output is reused as the chosen candidate's first step (the same input, so no extra round).

Both run the remaining steps with whatever solver the session holds (a sequential DDIM/DPM-Solver++/UniPC loop, or a
parallel solver on a one-step chain), so they compose with every sampler family.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Strict

from policy_accel.schedule import Schedule
from policy_accel.schema import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitInterval,
    check_fields,
    check_mapping,
)
from policy_accel.solvers.base import (
    Budget,
    Denoiser,
    Noise,
    Solver,
    SolveResult,
    SolveState,
    shift_chunk,
    step_noise,
)

log = logging.getLogger(__name__)
TAIL_FILLS = ("repeat", "chain")


def tail_chain(schedule: Schedule, clean: torch.Tensor, x_T: torch.Tensor, added_noise: torch.Tensor) -> torch.Tensor:
    """The chain (T+1, *x_T.shape) from ``x_T`` with per-step noise ``added_noise`` (T, ...) for a denoiser that
    predicts ``clean`` (shaped like ``x_T``) at every level: each step's epsilon maps its state to ``clean``."""
    out = torch.empty((schedule.num_steps + 1, *x_T.shape), dtype=x_T.dtype, device=x_T.device)
    out[0] = x_T
    rows = torch.zeros(x_T.shape[0], dtype=torch.long, device=x_T.device)
    for j in range(schedule.num_steps):
        eps = (out[j] - schedule.sqrt_alpha_prod[j] * clean) / schedule.sqrt_beta_prod[j]
        out[j + 1] = schedule.step(out[j], eps, rows + j) + added_noise[j]
    return out


@dataclass(frozen=True)
class RTIConfig:
    """RTI-DP's knobs: ``steps`` = how many of the schedule's last steps run from the guess (DDPM-100 with 3 is
    their [2, 1, 0]); ``discrete_dims`` = action dimensions binarized in the guess to +-1/``discrete_factor``."""

    steps: PositiveInt = 3
    discrete_dims: Annotated[tuple[NonNegativeInt, ...], Strict(False)] = ()  # a config's list is accepted
    discrete_factor: PositiveFloat = 1.0

    def __post_init__(self) -> None:
        check_fields(self, "rti.")
        object.__setattr__(self, "discrete_dims", tuple(self.discrete_dims))

    def validate(self, schedule: Schedule, action_dim: int) -> None:
        if not 1 <= self.steps <= schedule.num_steps:
            raise ValueError(f"rti.steps={self.steps} must be in [1, {schedule.num_steps}] (the schedule's last steps)")
        bad = [d for d in self.discrete_dims if d >= action_dim]
        if bad:
            raise ValueError(f"rti.discrete_dims {bad} are not action dimensions (action_dim={action_dim})")


def rti_guess(previous_sample: torch.Tensor, shift: int, config: RTIConfig) -> torch.Tensor:
    """The shifted previous clean chunk (last action repeated), discrete dims binarized (RTI-DP's clip variant)."""
    guess = shift_chunk(previous_sample, shift)
    for d in config.discrete_dims:
        value = 1.0 / config.discrete_factor
        guess[..., d] = torch.where(guess[..., d] > 0, value, -value)
    return guess


@dataclass(frozen=True)
class FalconConfig:
    """Falcon's knobs: ``threshold`` (epsilon, RMS distance in normalized action units), ``temperature`` (of the
    softmax over passing candidates; 0 = always the least noisy), ``explore`` (delta, probability of a cold start),
    ``min_steps`` (k_min: a candidate must leave at least this many steps to run), ``max_steps`` (candidates leave at
    most this many; None = any level below pure noise), ``buffer`` (entries kept)."""

    threshold: PositiveFloat = 0.1
    temperature: NonNegativeFloat = 1.0
    explore: UnitInterval = 0.0
    min_steps: PositiveInt = 1
    max_steps: PositiveInt | None = None
    buffer: PositiveInt = 16

    def __post_init__(self) -> None:
        check_fields(self, "falcon.")

    def validate(self, schedule: Schedule) -> None:
        """The ranges that depend on the schedule (types and fixed ranges are checked at construction)."""
        T = schedule.num_steps
        if not 1 <= self.min_steps <= T - 1:
            raise ValueError(f"falcon.min_steps={self.min_steps} must be in [1, {T - 1}] for a {T}-step schedule")
        if self.max_steps is not None and not self.min_steps <= self.max_steps <= T - 1:
            raise ValueError(f"falcon.max_steps={self.max_steps} must be in [min_steps={self.min_steps}, {T - 1}]")


@dataclass
class FalconEntry:
    """One buffered partially denoised chunk: the state at schedule step ``step``'s level, shifted to now."""

    step: int
    state: torch.Tensor  # (B, H, A)
    valid: torch.Tensor  # (B,) bool: rows whose chain passed this level
    age: int = 0  # inferences since it was stored


@dataclass
class FalconState:
    """Falcon's state across control steps: the buffer and the last clean chunk (the next reference)."""

    entries: list[FalconEntry] = field(default_factory=list)
    previous_sample: torch.Tensor | None = None


def falcon_age(
    state: FalconState, schedule: Schedule, shift: int, x_T: torch.Tensor, horizon: int
) -> list[FalconEntry]:
    """Shift every entry by ``shift`` (new tail: last clean action noised to the entry's level with ``x_T``'s tail),
    drop those that no longer overlap the horizon."""
    last = state.previous_sample[..., -1:, :].expand(*x_T.shape[:-2], shift, x_T.shape[-1])
    kept = []
    for e in state.entries:
        if (e.age + 1) * shift >= horizon:
            continue
        fill = schedule.sqrt_alpha_prod[e.step] * last + schedule.sqrt_beta_prod[e.step] * x_T[..., -shift:, :]
        kept.append(FalconEntry(e.step, shift_chunk(e.state, shift, fill), e.valid, e.age + 1))
    return kept


def falcon_candidates(entries: list[FalconEntry], schedule: Schedule, config: FalconConfig) -> list[FalconEntry]:
    """Entries whose remaining step count is in [min_steps, max_steps], newest then least noisy first, at most
    ``buffer`` of them (the priority queue evicts older and noisier entries first)."""
    T = schedule.num_steps
    top = config.max_steps if config.max_steps is not None else T - 1
    usable = [e for e in entries if config.min_steps <= T - e.step <= top]
    return sorted(usable, key=lambda e: (e.age, T - e.step))[: config.buffer]


def falcon_select(
    estimates: torch.Tensor,
    reference: torch.Tensor,
    remaining: torch.Tensor,
    valid: torch.Tensor,
    keep: int,
    config: FalconConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per batch row, the chosen candidate index, or -1 for a cold start.

    ``estimates`` (C, B, H, A) one-step clean estimates, ``reference`` (B, H, A), ``remaining`` (C,) steps left,
    ``valid`` (C, B); only the first ``keep`` positions (the overlap with the previous chunk) are compared."""
    C, B = estimates.shape[:2]
    dist = (estimates[:, :, :keep] - reference[:, :keep]).pow(2).flatten(2).mean(-1).sqrt()  # (C, B)
    passing = valid & (dist < config.threshold)
    if config.temperature == 0:  # greedy: the passing candidate(s) with the fewest remaining steps
        logits = torch.where(passing, -remaining.view(C, 1).float(), -math.inf)
        logits = torch.where(logits == logits.max(0).values, 0.0, -math.inf)
    else:
        logits = torch.where(passing, -remaining.view(C, 1).float() / config.temperature, -math.inf)
    device = estimates.device  # the draws come from the session's CPU generator, then move beside the estimates
    u = torch.rand(B, generator=generator).to(device)
    explore = torch.rand(B, generator=generator).to(device) < config.explore
    choice = torch.full((B,), -1, dtype=torch.long, device=device)
    for b in range(B):
        if explore[b] or not passing[:, b].any():
            continue
        p = torch.softmax(logits[:, b], 0)
        choice[b] = int(torch.searchsorted(p.cumsum(0), u[b].clamp(max=p.sum() - 1e-7)).clamp(max=C - 1))
    return choice


class _FirstCall:
    """The denoiser, except that a call on exactly ``(x, t)`` returns the already computed ``eps`` (Falcon's
    screening call is the chosen candidate's first step)."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        self.denoiser, self.x, self.t, self.eps = denoiser, x, t, eps
        self.reused = 0  # rows served from the screening call (not network evaluations of this solve)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.eps is not None and x.shape == self.x.shape and torch.equal(t, self.t) and torch.equal(x, self.x):
            eps, self.eps = self.eps, None
            self.reused = x.shape[0]
            return eps
        return self.denoiser(x, t, cond)


def falcon_solve(
    state: FalconState,
    denoiser: Denoiser,
    solver: Solver,
    schedule: Schedule,
    noise: Noise,
    cond: torch.Tensor,
    shift: int,
    config: FalconConfig,
    generator: torch.Generator,
    budget: Budget | None = None,
) -> tuple[SolveResult, FalconState, dict]:
    """One Falcon inference (a cold solve when the buffer is empty): the result, the new state, and per-row
    ``start_steps`` (schedule step each row started from; 0 = cold) for the record."""
    started = time.perf_counter()
    B, H = noise.x_T.shape[:2]
    T = schedule.num_steps
    device = noise.x_T.device  # everything built here lives beside the policy's tensors
    choice = torch.full((B,), -1, dtype=torch.long, device=device)
    candidates: list[FalconEntry] = []
    screen_eps = None
    screened_rounds = 0
    if state.previous_sample is not None:  # the session resets the warm start when its batch changes
        candidates = falcon_candidates(falcon_age(state, schedule, shift, noise.x_T, H), schedule, config)
    if candidates:
        states = torch.stack([c.state for c in candidates])  # (C, B, H, A)
        steps = torch.tensor([c.step for c in candidates], device=device)
        rows = steps.repeat_interleave(B)
        flat = states.reshape(-1, *states.shape[2:])
        screen_eps = denoiser(flat, schedule.timesteps[rows], cond.repeat(len(candidates), 1))
        estimates = schedule.predict_x0(flat, screen_eps, rows).view_as(states)
        screen_eps = screen_eps.view_as(states)
        screened_rounds = 1
        reference = shift_chunk(state.previous_sample, shift)
        valid = torch.stack([c.valid for c in candidates])
        choice = falcon_select(estimates, reference, T - steps, valid, H - shift, config, generator)
    sample = torch.empty_like(noise.x_T)
    start_steps = torch.zeros(B, dtype=torch.long, device=device)
    rounds = torch.zeros(B, dtype=torch.long, device=device)
    nfe = screened_rounds * len(candidates) * B
    new_entries: list[FalconEntry] = []
    stops, residual = [], 0.0
    for c in sorted(set(choice.tolist())):
        idx = (choice == c).nonzero().flatten()
        if c < 0:  # cold: the whole chain from x_T (a screening round, if any, was spent)
            chain, start, call = schedule, noise.x_T[idx], denoiser
            z = noise.z[:, idx]
            first = 0
        else:
            first = candidates[c].step
            chain = schedule.tail(T - first)
            start = candidates[c].state[idx]
            z = noise.z[first:, idx]
            call = _FirstCall(denoiser, start, schedule.timesteps[first].expand(len(idx)), screen_eps[c, idx])
        # one budget for the whole inference: the screening call and the groups before this one are charged to it
        result = solver.solve(call, chain, Noise(start, z), cond[idx], budget=budget and budget.remaining(started))
        sample[idx] = result.sample
        start_steps[idx] = first
        spent = screened_rounds if c < 0 else 0
        rounds[idx] = torch.tensor(result.rounds_per_row(), device=device) + spent
        nfe += result.nfe - getattr(call, "reused", 0)
        stops.append(result.stop_reason)
        residual = max(residual, result.residual)
        for j in range(result.trajectory.shape[0] - 1):  # every level this group passed through, for the buffer
            level = torch.zeros_like(noise.x_T)
            level[idx] = result.trajectory[j]
            valid = torch.zeros(B, dtype=torch.bool, device=device)
            valid[idx] = True
            new_entries.append(FalconEntry(first + j, level, valid))
    merged: dict[int, FalconEntry] = {}
    for e in new_entries:  # groups that passed the same level share one entry
        if e.step in merged:
            m = merged[e.step]
            m.state = torch.where(e.valid.view(-1, 1, 1), e.state, m.state)
            m.valid = m.valid | e.valid
        else:
            merged[e.step] = e
    entries = falcon_candidates(list(merged.values()) + candidates, schedule, config)  # the bounded buffer
    stop = next((s for s in stops if s != "converged"), "converged")
    result = SolveResult(
        sample=sample,
        trajectory=torch.stack([sample]),
        iterations=int(rounds.max()),
        nfe=int(nfe),
        converged=stop == "converged",
        residual=residual,
        wall_time_s=time.perf_counter() - started,
        stop_reason=stop,
        row_iterations=rounds.tolist(),
    )
    return result, FalconState(entries, sample.clone()), {"start_steps": start_steps.tolist()}


# ------------------------------------------------------------------------------------------------
# the protocol and the kinds
# ------------------------------------------------------------------------------------------------


@dataclass
class Chain:
    """What one inference solves: a schedule (the sampler's, or its tail), its noise (``x_T`` is the start), and for
    an exact warm start the solver's warm state (initial trajectory, e.g. Newton's Jacobians). ``warm``: it starts
    from the previous inference."""

    schedule: Schedule
    noise: Noise
    state: SolveState | None = None
    warm: bool = False


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _override(key: str, value: Any) -> str:
    """A Hydra override for ``key`` (lists, null and booleans as YAML)."""
    return f"{key}={json.dumps(_plain(value)) if isinstance(value, list | tuple | bool) or value is None else value}"


class WarmStart:
    """One kind of warm start (the base is the protocol; subclasses register with :func:`register`).

    ``key``: the config's ``warm_start`` value and results.json's. ``exact``: every chunk is the sampler's output for
    its noise (within the solver's tolerance); :meth:`approximate` also asks the solver. ``uses_previous``: it
    needs a closed loop (every kind but ``Cold``). ``checkable``: the session's
    ``check_exactness`` can re-solve the prepared chain sequentially (not Falcon: its chains are per row).
    ``options_key``: the config mapping of its knobs (``rti``, ``falcon``, ...), None when it has none there.
    """

    key: ClassVar[bool | str]
    uses_previous: ClassVar[bool] = True  # starts from the previous inference (all but Cold)
    exact: ClassVar[bool] = False
    checkable: ClassVar[bool] = True
    options_key: ClassVar[str | None] = None
    tail_fill: str = "repeat"  # the config's tail_fill, recorded as given (only Exact uses it)

    def __init__(self) -> None:
        self.previous: SolveResult | None = None

    # -- built from a config, checked against the session it serves --------------------------------------------
    @classmethod
    def options_key_for(cls, key: bool | str) -> str | None:
        """The config mapping of ``key``'s knobs (a class may serve several keys)."""
        return cls.options_key

    @classmethod
    def from_config(cls, key: bool | str, renoise_steps: int | None, tail_fill: str, options: dict | None) -> WarmStart:
        return cls()

    def bind(self, schedule: Schedule, action_dim: int, solver: Solver) -> None:
        """Check the knobs against the session's sampler, action size and solver (raises ``ValueError``)."""

    def approximate(self, solver: Solver) -> bool:
        return not self.exact

    def chains(self, schedule: Schedule) -> list[Schedule]:
        """The sequential chains this warm start runs (compiled by ``Session.prepare`` when the engine can)."""
        return [schedule]

    # -- one inference ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the episode: the next inference is cold."""
        self.previous = None

    def prepare(self, schedule: Schedule, noise: Noise, shift: int, cond: torch.Tensor) -> Chain:
        """The chain to solve for this inference's ``noise`` and normalized observation ``cond`` (B, C), after
        ``shift`` executed actions."""
        return Chain(schedule, noise)

    def solve(
        self,
        solver: Solver,
        denoiser: Denoiser,
        chain: Chain,
        cond: torch.Tensor,
        budget: Budget | None,
        generator: torch.Generator,
    ) -> tuple[SolveResult, bool]:
        """(the solve of ``chain``, whether it was warm)."""
        result = solver.solve(denoiser, chain.schedule, chain.noise, cond, warm=chain.state, budget=budget)
        return result, chain.warm

    def update(self, result: SolveResult) -> None:
        """Keep what the next inference starts from."""
        self.previous = result

    # -- what it is, for results, labels and commands -----------------------------------------------------------
    def options(self) -> dict | None:
        """The knobs results.json records as ``warm_options`` (None: none there)."""
        return None

    def record(self) -> dict:
        """results.json's fields for this warm start (the names runs have always recorded)."""
        return {
            "warm_start": self.key,
            "renoise_steps": None,
            "warm_options": self.options(),
            "tail_fill": self.tail_fill,
        }

    def label(self) -> str:
        """Its part of a configuration's short name (" warm", " renoise-k2", ...)."""
        return ""

    def overrides(self) -> list[str]:
        """The eval/rollout.py arguments that select it."""
        prefix = self.options_key_for(self.key)
        return [_override("warm_start", self.key)] + [
            _override(f"{prefix}.{k}", v) for k, v in (self.options() or {}).items()
        ]


WARM_STARTS: list[type[WarmStart]] = []


def register(cls: type[WarmStart]) -> type[WarmStart]:
    WARM_STARTS.append(cls)
    return cls


def _keys(cls: type[WarmStart]) -> tuple[bool | str, ...]:
    return getattr(cls, "keys", (cls.key,))


def _class_of(warm_start: Any) -> type[WarmStart] | None:
    for cls in WARM_STARTS:  # booleans by identity: 1 and 1.0 are not true
        for key in _keys(cls):
            if warm_start is key or isinstance(key, str) and isinstance(warm_start, str) and warm_start == key:
                return cls
    return None


def warm_start_choices() -> str:
    """The ``warm_start`` values, for messages: "false, true (exact) or renoise, rti, ... (approximate)"."""
    exact = [str(k).lower() for c in WARM_STARTS if c.exact for k in _keys(c)]
    approx = [str(k) for c in WARM_STARTS if not c.exact for k in _keys(c)]
    return f"{', '.join(exact)} (exact) or {', '.join(approx)} (approximate)"


def is_warm_start(value: Any) -> bool:
    """Whether ``value`` names a registered warm start (true/false as booleans only)."""
    return _class_of(value) is not None


def options_key(warm_start: Any) -> str | None:
    """The config mapping that holds ``warm_start``'s knobs (``rti``, ``falcon``, ...), None if it has none."""
    cls = _class_of(warm_start)
    return None if cls is None else cls.options_key_for(warm_start)


def make_warm_start(
    warm_start: bool | str,
    renoise_steps: int | None = None,
    tail_fill: str = "repeat",
    options: dict | None = None,
) -> WarmStart:
    """The warm start a config names (``warm_start``, ``renoise_steps``, ``tail_fill``, the knobs' mapping)."""
    cls = _class_of(warm_start)
    if cls is None:
        raise ValueError(f"unknown warm_start {warm_start!r}; valid: {warm_start_choices()}")
    if renoise_steps is not None and warm_start != "renoise":
        raise ValueError(f"renoise_steps={renoise_steps} is only used with warm_start='renoise'")
    if options and options_key(warm_start) is None:
        takes = " or ".join(repr(k) for c in WARM_STARTS for k in _keys(c) if options_key(k) is not None)
        raise ValueError(f"warm_options {options} are only used with warm_start={takes}")
    warm = cls.from_config(warm_start, renoise_steps, tail_fill, options)
    warm.tail_fill = tail_fill  # recorded as runs always have (results.json identity), used by Exact alone
    return warm


def warm_start_of(record: dict) -> WarmStart:
    """The warm start a results.json (or a report row) recorded, to label and reproduce it (not checked against a
    sampler: old runs stay readable)."""
    options = record["_warm_options"] if "_warm_options" in record else record.get("warm_options")  # a report row's
    cls = _class_of(record["warm_start"])
    if cls is None:
        raise ValueError(f"unknown warm_start {record['warm_start']!r}; valid: {warm_start_choices()}")
    tail_fill = (record["_tail_fill"] if "_tail_fill" in record else record.get("tail_fill")) or "repeat"
    warm = cls.from_config(record["warm_start"], record.get("renoise_steps"), tail_fill, options)
    warm.tail_fill = tail_fill
    return warm


@register
class Cold(WarmStart):
    """No warm start: every inference solves the sampler's chain from x_T."""

    key = False
    uses_previous = False
    exact = True

    def overrides(self) -> list[str]:
        return ["warm_start=false"]


@register
class Exact(WarmStart):
    """The previous solve's warm state, shifted, as the solver's initial guess: the same answer, cheaper."""

    key = True
    exact = True

    def __init__(self, tail_fill: str = "repeat"):
        super().__init__()
        if tail_fill not in TAIL_FILLS:
            raise ValueError(f"tail_fill={tail_fill!r} is not allowed: expected one of {', '.join(TAIL_FILLS)}")
        self.tail_fill = tail_fill

    @classmethod
    def from_config(cls, key, renoise_steps, tail_fill, options) -> Exact:
        return cls(tail_fill)

    def bind(self, schedule: Schedule, action_dim: int, solver: Solver) -> None:
        if not solver.exact_warm_start:
            log.warning(
                f"warm-started {solver.name} is not reliably exact: its stopping test compares successive iterates, "
                "which a good guess passes early (measured up to 0.24 off at tau 0.01); its results are labelled "
                "approximate; prefer solver=newton"
            )

    def approximate(self, solver: Solver) -> bool:
        # Warm paradigms' stopping test compares successive iterates: not reliably exact (0.24 off on Can).
        return not solver.exact_warm_start

    def prepare(self, schedule: Schedule, noise: Noise, shift: int, cond: torch.Tensor) -> Chain:
        if self.previous is None:
            return Chain(schedule, noise)
        result = self.previous
        # The solver's warm state (trajectory, plus e.g. Newton's Jacobians) shifted by the executed actions.
        state = (result.state or SolveState(result.trajectory)).shifted(shift)
        init = state.trajectory  # the shifted copy: its start and tail are rewritten for this inference
        init[0] = noise.x_T
        if self.tail_fill == "chain":
            keep = noise.x_T.shape[-2] - shift
            clean = result.sample[:, -1:, :].expand(-1, shift, -1)
            tail_noise = step_noise(schedule, noise)[:, :, keep:, :]
            init[:, :, keep:, :] = tail_chain(schedule, clean, noise.x_T[:, keep:, :], tail_noise)
        return Chain(schedule, noise, state, warm=True)

    def label(self) -> str:
        return " warm"

    def overrides(self) -> list[str]:
        return ["warm_start=true"] + ([f"tail_fill={self.tail_fill}"] if self.tail_fill != "repeat" else [])


def restart_chain(tail: Schedule, guess: torch.Tensor, noise: Noise, renoise: bool) -> Chain:
    """The chain of ``tail`` (a schedule's last steps) started from ``guess``, re-noised to the tail's first level
    with ``noise.x_T`` (``renoise``) or as it is; the tail steps keep their own ``z`` rows of ``noise``."""
    start = tail.add_noise(guess, noise.x_T, 0) if renoise else guess
    return Chain(tail, Noise(start, noise.z[noise.z.shape[0] - tail.num_steps :]), warm=True)


@register
class TailRestart(WarmStart):
    """APPROXIMATE: the previous clean chunk, shifted by the executed actions (discrete dimensions binarized), starts
    the schedule's last ``steps`` steps; ``renoise``: first re-noised to step T-steps' level with the forward process
    q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps = this inference's x_T draw (``warm_start=renoise``);
    else taken as that level's sample as it is (RTI-DP, ``warm_start=rti``). Each tail step keeps its own ``z`` row of
    this inference's noise, so the generator is consumed exactly as in a cold solve. The first inference of an
    episode is a full cold solve."""

    keys = ("renoise", "rti")

    def __init__(
        self, steps: int | None, renoise: bool, discrete_dims: tuple[int, ...] = (), discrete_factor: float = 1.0
    ):
        super().__init__()
        self.renoise = renoise
        self.config = RTIConfig(**({"steps": steps} if steps is not None else {}), discrete_dims=discrete_dims,
                                discrete_factor=discrete_factor) if not renoise else None  # fmt: skip
        self.steps = steps if renoise else self.config.steps
        self._tail: Schedule | None = None

    @property
    def key(self) -> str:  # type: ignore[override]
        return "renoise" if self.renoise else "rti"

    @classmethod
    def options_key_for(cls, key: bool | str) -> str | None:
        return None if key == "renoise" else "rti"  # re-noise's one knob is the top-level renoise_steps

    @classmethod
    def from_config(cls, key, renoise_steps, tail_fill, options) -> TailRestart:
        if key == "renoise":
            return cls(renoise_steps, renoise=True)
        options = dict(options or {})
        check_mapping(options, RTIConfig, "rti.", owner="warm_start='rti'")
        config = RTIConfig(**options)
        return cls(config.steps, False, config.discrete_dims, config.discrete_factor)

    def bind(self, schedule: Schedule, action_dim: int, solver: Solver) -> None:
        T = schedule.num_steps
        if self.renoise:
            if self.steps is None or not 1 <= self.steps <= T:
                raise ValueError(
                    f"warm_start='renoise' needs renoise_steps in [1, {T}] (the schedule's last steps to run), got "
                    f"{self.steps!r}"
                )
        else:
            self.config.validate(schedule, action_dim)
        self._tail = schedule.tail(self.steps)

    def chains(self, schedule: Schedule) -> list[Schedule]:
        return [schedule, self._tail]

    def guess(self, shift: int) -> torch.Tensor:
        """The shifted previous clean chunk (last action repeated), discrete dimensions binarized."""
        if self.config is None:
            return shift_chunk(self.previous.sample, shift)
        return rti_guess(self.previous.sample, shift, self.config)

    def prepare(self, schedule: Schedule, noise: Noise, shift: int, cond: torch.Tensor) -> Chain:
        if self.previous is None:
            return Chain(schedule, noise)
        return restart_chain(self._tail, self.guess(shift), noise, self.renoise)

    def options(self) -> dict | None:
        return None if self.config is None else {k: _plain(v) for k, v in asdict(self.config).items()}

    def record(self) -> dict:
        return {**super().record(), "renoise_steps": self.steps if self.renoise else None}

    def label(self) -> str:
        return f" {self.key}-k{self.steps}"

    def overrides(self) -> list[str]:
        if self.renoise:
            return ["warm_start=renoise", f"renoise_steps={self.steps}"]
        return super().overrides()


@register
class Falcon(WarmStart):
    """APPROXIMATE: Falcon's restart from a buffered partially denoised chunk (:func:`falcon_solve`)."""

    key = "falcon"
    checkable = False
    options_key = "falcon"

    def __init__(self, config: FalconConfig | None = None):
        super().__init__()
        self.config = config or FalconConfig()
        self.state = FalconState()
        self._shift = 0

    @classmethod
    def from_config(cls, key, renoise_steps, tail_fill, options) -> Falcon:
        options = dict(options or {})
        check_mapping(options, FalconConfig, "falcon.", owner="warm_start='falcon'")
        return cls(FalconConfig(**options))

    def bind(self, schedule: Schedule, action_dim: int, solver: Solver) -> None:
        self.config.validate(schedule)

    def reset(self) -> None:
        super().reset()
        self.state = FalconState()

    def prepare(self, schedule: Schedule, noise: Noise, shift: int, cond: torch.Tensor) -> Chain:
        self._shift = shift
        return Chain(schedule, noise)

    def solve(self, solver, denoiser, chain, cond, budget, generator) -> tuple[SolveResult, bool]:
        result, self._next, info = falcon_solve(
            self.state, denoiser, solver, chain.schedule, chain.noise, cond, self._shift, self.config, generator, budget
        )
        return result, any(s > 0 for s in info["start_steps"])  # warm when any row restarted from the buffer

    def update(self, result: SolveResult) -> None:
        super().update(result)
        self.state = self._next

    def options(self) -> dict:
        return asdict(self.config)

    def label(self) -> str:
        return f" falcon-e{self.config.threshold}"


@dataclass(frozen=True)
class AdaptiveConfig:
    """The per-inference restart level's knobs: ``min_steps`` (tail steps when the observation did not move),
    ``max_steps`` (when it moved by ``scale`` or more; None = the whole schedule, i.e. a cold solve from x_T),
    ``scale`` (RMS change of the normalized observation history between two inferences that asks for
    ``max_steps``), ``renoise`` (re-noise the guess to the tail's first level, or start from it as it is)."""

    min_steps: PositiveInt = 2
    max_steps: PositiveInt | None = None
    scale: PositiveFloat = 0.1
    renoise: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "adaptive.")

    def validate(self, schedule: Schedule) -> None:
        T = schedule.num_steps
        top = T if self.max_steps is None else self.max_steps
        if not 1 <= self.min_steps <= top <= T:
            raise ValueError(
                f"adaptive.min_steps={self.min_steps} and max_steps={self.max_steps} must satisfy 1 <= min_steps <= "
                f"max_steps <= {T} (the schedule's steps)"
            )


@register
class AdaptiveRestart(WarmStart):
    """APPROXIMATE: a :class:`TailRestart` whose restart level is chosen per inference and per row from how far the
    observation moved since the previous inference: k = min_steps + (max_steps - min_steps) * min(1, d / scale)
    (rounded), d = RMS change of the normalized observation history. Little motion, a short tail from the shifted
    previous chunk; much motion (a contact, a grasp: where the shifted chunk is a poor guess), a restart near or at
    pure noise (k = T is the cold solve of that row). Rows with the same k are solved together, one budget for all."""

    key = "adaptive"
    checkable = False  # rows may solve different chains
    options_key = "adaptive"

    def __init__(self, config: AdaptiveConfig | None = None):
        super().__init__()
        self.config = config or AdaptiveConfig()
        self._cond: torch.Tensor | None = None  # the previous inference's normalized observation history
        self._pending: tuple | None = None

    @classmethod
    def from_config(cls, key, renoise_steps, tail_fill, options) -> AdaptiveRestart:
        options = dict(options or {})
        check_mapping(options, AdaptiveConfig, "adaptive.", owner="warm_start='adaptive'")
        return cls(AdaptiveConfig(**options))

    def bind(self, schedule: Schedule, action_dim: int, solver: Solver) -> None:
        self.config.validate(schedule)
        T = schedule.num_steps
        top = T if self.config.max_steps is None else self.config.max_steps
        self._tails = {k: schedule.tail(k) for k in range(self.config.min_steps, top + 1) if k < T}

    def chains(self, schedule: Schedule) -> list[Schedule]:
        return [schedule, *self._tails.values()]

    def reset(self) -> None:
        super().reset()
        self._cond = None

    def levels(self, cond: torch.Tensor, T: int) -> torch.Tensor:
        """(B,) tail steps per row, from the observation's RMS change since the previous inference."""
        c = self.config
        top = T if c.max_steps is None else c.max_steps
        moved = (cond - self._cond).pow(2).mean(-1).sqrt()
        return (c.min_steps + (top - c.min_steps) * (moved / c.scale).clamp(max=1.0)).round().long()

    def prepare(self, schedule: Schedule, noise: Noise, shift: int, cond: torch.Tensor) -> Chain:
        levels = None if self.previous is None else self.levels(cond, schedule.num_steps)
        guess = None if self.previous is None else shift_chunk(self.previous.sample, shift)
        self._pending = (cond, levels, guess)
        return Chain(schedule, noise, warm=levels is not None)

    def solve(self, solver, denoiser, chain, cond, budget, generator) -> tuple[SolveResult, bool]:
        _, levels, guess = self._pending
        if levels is None:
            return super().solve(solver, denoiser, chain, cond, budget, generator)
        started = time.perf_counter()
        schedule, noise = chain.schedule, chain.noise
        T = schedule.num_steps
        sample = torch.empty_like(noise.x_T)
        rounds = [0] * noise.x_T.shape[0]
        nfe, stops, residual = 0, [], 0.0
        for k in sorted(set(levels.tolist())):
            idx = (levels == k).nonzero().flatten()
            rows = Noise(noise.x_T[idx], noise.z[:, idx])
            part = (
                Chain(schedule, rows)
                if k >= T
                else restart_chain(self._tails[k], guess[idx], rows, self.config.renoise)
            )
            result = solver.solve(
                denoiser, part.schedule, part.noise, cond[idx], budget=budget and budget.remaining(started)
            )
            sample[idx] = result.sample
            for i, n in zip(idx.tolist(), result.rounds_per_row(), strict=True):
                rounds[i] = n
            nfe += result.nfe
            stops.append(result.stop_reason)
            residual = max(residual, result.residual)
        stop = next((s for s in stops if s != "converged"), "converged")
        result = SolveResult(
            sample=sample,
            trajectory=torch.stack([sample]),
            iterations=max(rounds),
            nfe=nfe,
            converged=stop == "converged",
            residual=residual,
            wall_time_s=time.perf_counter() - started,
            stop_reason=stop,
            row_iterations=rounds,
        )
        return result, bool((levels < T).any())

    def update(self, result: SolveResult) -> None:
        super().update(result)
        self._cond = self._pending[0]

    def options(self) -> dict:
        return asdict(self.config)

    def label(self) -> str:
        c = self.config
        return f" adaptive-k{c.min_steps}-{c.max_steps or 'T'}-s{c.scale}{'' if c.renoise else '-rti'}"


__all__ = [
    "AdaptiveConfig",
    "AdaptiveRestart",
    "Chain",
    "Cold",
    "Exact",
    "Falcon",
    "FalconConfig",
    "RTIConfig",
    "TAIL_FILLS",
    "TailRestart",
    "WarmStart",
    "make_warm_start",
    "options_key",
    "register",
    "tail_chain",
    "warm_start_choices",
    "is_warm_start",
    "warm_start_of",
]
