"""U-Net call time at fixed batch sizes: eager vs torch.compile (inductor, dynamic shapes) vs TorchScript
(trace + freeze + optimize_for_inference), 2 threads, with each backend's max deviation from eager.

    .venv/bin/python reports/latency/cpu_checkpoint_kernel_cache/backend_probe.py   # ~3 min (compile: ~80 s)
"""

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from policy_accel.checkpoint import load_policy  # noqa: E402

torch.set_num_threads(2)
policy = load_policy(ROOT / "checkpoints/pusht")
model = policy.model.eval()
H, A = policy.chunk_shape
cond_dim = policy.config.unet.global_cond_dim


def inputs(b: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(b)
    sample, cond = torch.randn(b, H, A, generator=g), torch.randn(b, cond_dim, generator=g)
    return sample, torch.randint(0, 100, (b,), generator=g), cond


def median_ms(f, b: int, n: int) -> float:
    x = inputs(b)
    for _ in range(3):
        f(*x)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f(*x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


with torch.inference_mode():
    start = time.perf_counter()
    compiled = torch.compile(model, dynamic=True)
    for b in (1, 7, 100):
        print(f"compile b={b}: max dev {(model(*inputs(b)) - compiled(*inputs(b))).abs().max().item():.1e}")
    print(f"compile warm-up {time.perf_counter() - start:.0f} s")
    scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, inputs(4), check_trace=False)))
    for b in (1, 100):
        print(f"torchscript b={b}: max dev {(model(*inputs(b)) - scripted(*inputs(b))).abs().max().item():.1e}")
    for name, f in (("eager", model), ("compile", compiled), ("torchscript", scripted)):
        row = {b: median_ms(f, b, 30 if b < 64 else 15) for b in (1, 8, 32, 64, 100)}
        print(f"{name:12s}", "  ".join(f"b={b}: {ms:.2f} ms" for b, ms in row.items()), flush=True)
