"""Warm inference latency on the main thread vs a worker thread, at 1 and 2 torch threads (finding 3).

    .venv/bin/python reports/realtime/threads_probe.py [newton|paradigms]

Replays 3 dataset episodes (6 inferences each, the first cold) through a warm PolicyRunner; prints the median
warm latency, twice per setting.
"""

import statistics
import sys
import threading
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))
from latency import control_sequences, run_configuration  # noqa: E402

from policy_accel.checkpoint import load_policy  # noqa: E402

solver_name = sys.argv[1] if len(sys.argv) > 1 else "newton"
policy = load_policy(ROOT / "checkpoints/pusht")
sequences = control_sequences(OmegaConf.load(ROOT / "configs/task/pusht.yaml"), 3, 6, 8)


def warm_median_ms(threads: int, out: list[float]) -> None:
    torch.set_num_threads(threads)  # per calling thread: OpenMP's thread count is a per-thread setting
    options = {"jacobian": "broyden"} if solver_name == "newton" else {}
    spec = {"solver": solver_name, "options": options, "warm_start": True, "noise": "coupled"}
    rows = run_configuration(policy, spec, sequences, policy.device, profile=False)
    out.append(statistics.median(latency for warm, latency, *_ in rows if warm))


for _ in range(2):
    for threads in (1, 2):
        main: list[float] = []
        warm_median_ms(threads, main)
        worker: list[float] = []
        thread = threading.Thread(target=warm_median_ms, args=(threads, worker))
        thread.start()
        thread.join()
        print(f"{solver_name} threads={threads}: main {main[0]:.1f} ms, worker {worker[0]:.1f} ms", flush=True)
