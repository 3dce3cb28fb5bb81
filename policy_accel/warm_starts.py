"""Published training-free warm starts across control steps, both APPROXIMATE (not the sampler's output for any noise).

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

import math
import time
from dataclasses import dataclass, field
from typing import Annotated

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
)
from policy_accel.solvers.base import Budget, Denoiser, Noise, Solver, SolveResult

WARM_START_ALGORITHMS = ("rti", "falcon")


def shift_chunk(x: torch.Tensor, shift: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Shift (..., H, A) left by ``shift`` along H; the new tail repeats the last entry, or is ``fill``."""
    tail = x[..., -1:, :].expand(*x.shape[:-2], shift, x.shape[-1]) if fill is None else fill
    return torch.cat([x[..., shift:, :], tail], dim=-2)


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
    guess = shift_chunk(previous_sample, shift).clone()
    for d in config.discrete_dims:
        value = 1.0 / config.discrete_factor
        guess[..., d] = torch.where(guess[..., d] > 0, value, -value)
    return guess


def rti_chain(
    schedule: Schedule, previous_sample: torch.Tensor, noise: Noise, shift: int, config: RTIConfig
) -> tuple[Schedule, Noise]:
    """RTI-DP's chain: the schedule's last ``steps`` steps, started from the guess itself (no re-noising; unlike our
    ``warm_start=renoise``). Each step keeps its own ``z`` row of this inference's noise (DDPM steps stay stochastic,
    as in their ``scheduler.step(..., generator=...)``)."""
    tail = schedule.tail(config.steps)
    return tail, Noise(rti_guess(previous_sample, shift, config), noise.z[noise.z.shape[0] - tail.num_steps :])


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


def remaining(budget: Budget | None, started: float) -> Budget | None:
    """What is left of ``budget`` at this moment of an inference that began at ``started`` (``time.perf_counter``):
    its time shrinks by what was spent (at least one round still runs: a spent budget stops after it)."""
    if budget is None or budget.time_s is None:
        return budget
    return Budget(budget.max_iterations, max(budget.time_s - (time.perf_counter() - started), 1e-9))


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
    if state.previous_sample is not None and state.previous_sample.shape[0] == B:
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
        result = solver.solve(call, chain, Noise(start, z), cond[idx], budget=remaining(budget, started))
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
