"""Offline solver benchmark: every solver on the same noise as the sequential sampler, batch 1.

    python eval/solver_bench.py                 # DDPM-100, 100 PushT dataset observations
    python eval/solver_bench.py policy=ddim16 n_obs=20

For each observation history (drawn from the task's dataset) one noise is drawn; the sequential
baseline and every configuration solve it in the same process, interleaved, so machine noise hits
all of them alike. Writes ``solver_bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy_accel.checkpoint import load_policy  # noqa: E402
from policy_accel.errors import ConfigError, report_user_errors  # noqa: E402
from policy_accel.solvers import make_solver  # noqa: E402
from policy_accel.train import build_dataset  # noqa: E402

log = logging.getLogger("solver_bench")


def dataset_observations(task: DictConfig, n: int, seed: int) -> np.ndarray:
    """``n`` observation histories (n, n_obs_steps, obs_dim) from random windows of the dataset."""
    dataset = build_dataset(task, max_episodes=None)[0]
    rows = np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)
    return dataset.batch(rows)[0].numpy()


def bench(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint)
    schedule = policy.schedule(**cfg.policy.schedule)
    unknown = [c for c in cfg.configurations if c not in cfg.solvers]
    if unknown:
        raise ConfigError(f"unknown configurations {unknown}; defined: {list(cfg.solvers)}")
    names = ["sequential", *[c for c in cfg.configurations if c != "sequential"]]
    solvers = {c: make_solver(cfg.solvers[c].name, **OmegaConf.to_container(cfg.solvers[c].options)) for c in names}
    observations = dataset_observations(cfg.task, cfg.n_obs, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    stats = {c: {"iterations": [], "nfe": [], "latency_ms": [], "dev": [], "converged": []} for c in names}
    log.info("%s, %d observations, configurations %s", cfg.policy.name, cfg.n_obs, names)
    for obs in tqdm(observations, desc="solver bench", dynamic_ncols=True):
        cond = policy.condition(obs[None])
        noise = policy.draw_noise(schedule, 1, generator)
        reference = None
        for c in names:
            times = []
            for _ in range(cfg.repeats):
                start = time.perf_counter()
                result = policy.sample(cond, solvers[c], schedule, noise)
                times.append(time.perf_counter() - start)
            reference = result.sample if c == "sequential" else reference
            s = stats[c]
            s["iterations"].append(result.iterations)
            s["nfe"].append(result.nfe)
            s["latency_ms"].append(1e3 * float(np.median(times)))
            s["dev"].append(float((result.sample - reference).abs().max()))
            s["converged"].append(result.converged)
    seq_p50 = float(np.median(stats["sequential"]["latency_ms"]))
    summary = {
        c: {
            "solver": cfg.solvers[c].name,
            "options": OmegaConf.to_container(cfg.solvers[c].options),
            "iterations_mean": float(np.mean(s["iterations"])),
            "iterations_p95": float(np.percentile(s["iterations"], 95)),
            "nfe_mean": float(np.mean(s["nfe"])),
            "latency_ms_p50": float(np.median(s["latency_ms"])),
            "latency_ms_p95": float(np.percentile(s["latency_ms"], 95)),
            "speedup_vs_sequential_p50": seq_p50 / float(np.median(s["latency_ms"])),
            "max_abs_dev": float(np.max(s["dev"])),
            "converged_frac": float(np.mean(s["converged"])),
        }
        for c, s in stats.items()
    }
    results = {
        "checkpoint": str(cfg.checkpoint),
        "schedule": cfg.policy.name,
        "n_obs": int(cfg.n_obs),
        "threads": int(cfg.threads),
        "repeats": int(cfg.repeats),
        "torch": torch.__version__,
        "solvers": summary,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "solver_bench.json").write_text(json.dumps(results, indent=2))
    print(f"\n{cfg.policy.name}, batch 1, {cfg.n_obs} observations, {cfg.threads} threads")
    print("| configuration | iterations mean | p95 | nfe mean | p50 ms | p95 ms | speed-up | max abs dev | converged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, s in summary.items():
        print(
            f"| {c} | {s['iterations_mean']:.1f} | {s['iterations_p95']:.0f} | {s['nfe_mean']:.0f} | "
            f"{s['latency_ms_p50']:.1f} | {s['latency_ms_p95']:.1f} | {s['speedup_vs_sequential_p50']:.2f}x | "
            f"{s['max_abs_dev']:.1e} | {s['converged_frac']:.0%} |"
        )
    print(f"results written to {out_dir / 'solver_bench.json'}")
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="solver_bench")
@report_user_errors
def main(cfg: DictConfig) -> None:
    bench(cfg)


if __name__ == "__main__":
    main()
