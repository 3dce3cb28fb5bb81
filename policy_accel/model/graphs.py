"""CUDA graphs for the denoiser: one captured graph per fixed batch size ("bucket").

At the batch sizes a policy runs (1 to a few thousand rows), a Diffusion Policy U-Net call on a GPU
is bound by launching its ~150 small kernels, not by arithmetic. A CUDA graph replays them with a
single launch. Graphs need fixed shapes, so every call is padded up to the next bucket (rows past
the caller's batch are ignored) and calls larger than the biggest bucket are split.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd import forward_ad

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class GraphedDenoiser:
    """Drop-in ``denoiser(sample, timestep, global_cond)`` that replays a CUDA graph per bucket."""

    def __init__(self, model: nn.Module, buckets: Sequence[int] = DEFAULT_BUCKETS, warmup: int = 2):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.model = model
        self.buckets = sorted(set(buckets))
        self.warmup = warmup
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        if forward_ad.unpack_dual(sample).tangent is not None:
            return self.model(sample, timestep, global_cond)  # forward-mode Jacobians: a graph replays no tangents
        return self._replay(sample, timestep, global_cond)

    @torch.inference_mode()
    def _replay(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        n = sample.shape[0]
        largest = self.buckets[-1]
        if n > largest:
            parts = [
                self._replay(sample[i : i + largest], timestep[i : i + largest], global_cond[i : i + largest])
                for i in range(0, n, largest)
            ]
            return torch.cat(parts)
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        graph, (x, t, c), out = self._graphs.get(bucket) or self._capture(bucket, sample, timestep, global_cond)
        x[:n].copy_(sample)
        t[:n].copy_(timestep)
        c[:n].copy_(global_cond)
        graph.replay()
        return out[:n].clone()

    def _capture(self, bucket: int, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor):
        """Record the model at batch ``bucket`` (static input buffers, output written in place)."""
        x = torch.zeros((bucket, *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
        t = torch.zeros((bucket,), dtype=timestep.dtype, device=sample.device)
        c = torch.zeros((bucket, *cond.shape[1:]), dtype=cond.dtype, device=sample.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.model(x, t, c)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(x, t, c)
        self._graphs[bucket] = (graph, (x, t, c), out)
        return self._graphs[bucket]
