"""The machine a measurement ran on, in one line: every latency figure is recorded next to it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

_ISA = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512-BF16"), ("amx_tile", "AMX"))


def hardware(device: torch.device, threads: int) -> str:
    """CPU model and logical cores (from /proc/cpuinfo where there is one), torch version, intra-op threads, and
    the GPU's name when ``device`` is CUDA: latencies mean nothing without it."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if "model name" in line]
        flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
        # the vector units an engine can use: the same model name has come with and without them
        isa = [name for flag, name in _ISA if flag in flags]
        cpu = f"{names[0]} ({len(names)} logical cores{', ' + ' '.join(isa) if isa else ''})" if names else cpu
    text = f"CPU: {cpu}, torch {torch.__version__}, {threads} intra-op threads"
    if device.type == "cuda":
        text = f"GPU: {torch.cuda.get_device_name(device)}; {text}"
    return text
