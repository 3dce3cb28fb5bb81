"""Counting what a solve dispatches outside the network: operators (each one a kernel launch on a GPU, where
they, not arithmetic, set a round's overhead) and host reads (each one a device synchronisation).

    counter = OpCounter()
    with counter:
        solver.solve(counter.wrap(denoiser), schedule, noise, cond)
    counter.ops, counter.host_reads, counter.network_calls

Operators are counted with a ``TorchDispatchMode``: every ATen operator that reaches the dispatcher, views
included, except those dispatched inside the wrapped denoiser. Host reads are the operators that hand a value to
the host (``aten._local_scalar_dense`` and the ``item`` / ``is_nonzero`` that wrap it: ``item``, ``bool``, ``int``,
``float``), those whose output shape depends
on values (``nonzero``, boolean-mask indexing: a sync on a GPU), copies off an accelerator, plus reads that never
pass through the dispatcher on a CPU (``tolist``, numpy views), which library code reports with
:func:`note_host_read` at the call site.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from policy_accel.data import load_demonstrations
from policy_accel.observations import ObservationHistory

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # as in policy_accel.solvers.base

aten = torch.ops.aten
_SYNCING = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
}
_ACTIVE: list[OpCounter] = []


def note_host_read(n: int = 1) -> None:
    """Report ``n`` host reads the dispatcher cannot see (``tolist``, numpy) to the counter in use, if any."""
    for counter in _ACTIVE:
        counter.host_reads += n


def read_to_host(tensor: torch.Tensor) -> list:
    """The tensor's values as a flat Python list: one host read, counted whether or not the dispatcher sees it
    (a copy off an accelerator is an operator; a CPU tensor's numpy view is not, so it is counted here)."""
    if tensor.numel() == 1:
        return [tensor.item()]  # aten.item: seen by the dispatcher
    if tensor.device.type == "cpu":
        note_host_read()
        return tensor.flatten().tolist()
    return tensor.cpu().flatten().tolist()  # aten._to_copy off the device: seen by the dispatcher


def _reads_to_host(func, args) -> bool:
    if func in _SYNCING:
        return True
    if func is aten.index.Tensor:  # a boolean mask index becomes nonzero(): a data-dependent shape
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if func in (aten._to_copy.default, aten.copy_.default):
        source = args[0] if func is aten._to_copy.default else args[1]
        return isinstance(source, torch.Tensor) and source.device.type != "cpu" and not source.is_meta
    return False


class OpCounter(TorchDispatchMode):
    """Counts operators and host reads dispatched outside the network calls of a :meth:`wrap`-ped denoiser."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads = 0
        self.network_calls = 0
        self.by_name: Counter[str] = Counter()
        self._inside_network = 0

    def __enter__(self) -> OpCounter:
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_network:
            self.ops += 1
            self.by_name[func.__name__] += 1
            if _reads_to_host(func, args):
                self.host_reads += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        """The denoiser, with its own operators left out of the counts (one network call each)."""

        def counted(sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
            self.network_calls += 1
            self._inside_network += 1
            try:
                return denoiser(sample, timestep, global_cond)
            finally:
                self._inside_network -= 1

        return counted


def control_sequences(
    dataset: str,
    obs_keys: list[str] | None,
    n_episodes: int,
    n_inferences: int,
    n_action_steps: int,
    n_obs_steps: int,
) -> list[np.ndarray]:
    """Per dataset episode, the observation histories (n_inferences, n_obs_steps, obs_dim) a robot would see at its
    first inferences, one every ``n_action_steps`` frames (padded at the start as in a rollout: the histories come
    from :class:`~policy_accel.observations.ObservationHistory`): real observations for timing and counting solves."""
    demos = load_demonstrations(dataset, obs_keys)
    obs = demos["obs"]
    sequences, start = [], 0
    for end in demos["episode_ends"][:n_episodes]:
        frames = [min(start + k * n_action_steps, end - 1) for k in range(n_inferences)]
        history, wanted, seen = ObservationHistory(n_obs_steps), set(frames), {}
        for f in range(start, frames[-1] + 1):
            history.push(obs[f])
            if f in wanted:
                seen[f] = history.stacked()
        sequences.append(np.stack([seen[f] for f in frames]))
        start = end
    return sequences


@dataclass
class SolveRecord:
    """One solve as a :class:`ProfiledSolver` saw it."""

    warm: bool
    rounds: int
    solve_s: float
    network_s: float
    ops: int | None = None
    host_reads: int | None = None


class ProfiledSolver:
    """A solver that records each solve it runs: wall time and time inside the network (the device synchronised
    around each call), or, with ``count=True``, operators and host reads outside the network (:class:`OpCounter`;
    counting slows the solve, so its times are not kept). It implements the solver protocol, so a
    :class:`~policy_accel.session.Session` drives it exactly as it drives the solver it wraps."""

    def __init__(self, solver, count: bool = False):
        self.solver, self.count = solver, count
        self.name, self.exact_warm_start = solver.name, solver.exact_warm_start
        self.records: list[SolveRecord] = []

    def solve(self, denoiser: Denoiser, schedule, noise, global_cond, warm=None, budget=None, trace=None):
        device = noise.x_T.device
        network = [0.0]

        def timed(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            _sync(device)
            start = time.perf_counter()
            out = denoiser(x, t, c)
            _sync(device)
            network[0] += time.perf_counter() - start
            return out

        counter = OpCounter() if self.count else None
        _sync(device)
        start = time.perf_counter()
        with counter if counter is not None else contextlib.nullcontext():
            net = counter.wrap(timed) if counter is not None else timed
            result = self.solver.solve(net, schedule, noise, global_cond, warm, budget, trace)
        _sync(device)
        record = SolveRecord(warm is not None, result.iterations, time.perf_counter() - start, network[0])
        if counter is not None:
            record.ops, record.host_reads = counter.ops, counter.host_reads
        self.records.append(record)
        return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
