"""U-Net call time over batch sizes 100, 99, ..., 1 (three passes), as the solvers' shrinking windows call it.

P=reports/latency/cpu_checkpoint_kernel_cache/vary_batch_probe.py
.venv/bin/python $P                                         # policy_accel's 8192
ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 .venv/bin/python $P    # oneDNN's default
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from policy_accel.checkpoint import load_policy  # noqa: E402  (the import sets the cache size unless set)

torch.set_num_threads(2)
policy = load_policy(Path(__file__).resolve().parents[3] / "checkpoints/pusht")
H, A = policy.chunk_shape
cond_dim = policy.config.unet.global_cond_dim


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


print("ONEDNN_PRIMITIVE_CACHE_CAPACITY =", os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], f"rss {rss_mb():.0f} MB")
with torch.inference_mode():
    for rep in range(3):
        sizes = range(100, 0, -1)
        calls = [(torch.randn(b, H, A), torch.randint(0, 100, (b,)), torch.randn(b, cond_dim)) for b in sizes]
        start = time.perf_counter()
        for x, t, c in calls:
            policy.model(x, t, c)
        per_call = (time.perf_counter() - start) * 1e3 / len(calls)
        print(f"pass {rep}: {per_call:.2f} ms per call, rss {rss_mb():.0f} MB", flush=True)
