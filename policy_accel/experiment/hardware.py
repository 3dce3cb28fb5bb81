"""The machine a measurement ran on, in one line: every latency figure is recorded next to it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def hardware(device: torch.device, threads: int) -> str:
    """CPU model and logical cores (from /proc/cpuinfo where there is one), torch version, intra-op threads, and
    the GPU's name when ``device`` is CUDA: latencies mean nothing without it."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = f"{names[0]} ({len(names)} logical cores)" if names else cpu
    text = f"CPU: {cpu}, torch {torch.__version__}, {threads} intra-op threads"
    if device.type == "cuda":
        text = f"GPU: {torch.cuda.get_device_name(device)}; {text}"
    return text
