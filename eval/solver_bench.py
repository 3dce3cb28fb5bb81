"""Offline solver benchmark: named configurations solving the sequential sampler's chain on its noise, batch 1.

    python eval/solver_bench.py                 # DDPM-100, 100 PushT dataset observations
    python eval/solver_bench.py policy=ddim16 n_obs=20
    python eval/solver_bench.py 'configurations=[paradigms,newton_broyden_cold]'

Configurations are named configurations (``configs/experiment/<name>.yaml``,
policy_accel/experiment/configurations.py), each
built by ``build_session`` with this run's sampler (``policy=``: every configuration solves the same chain), task,
device and threads. They are solved cold, so a configuration with a warm start (which needs a closed loop: use
eval/latency.py or eval/rollout.py) is refused; a configuration's round budget is honoured. For each observation
history (drawn from the task's dataset) one noise is drawn; the sequential baseline (the row ``sequential``) and
every configuration solve it in the same process, interleaved, so machine noise hits all of them alike. Writes
``solver_bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import logging
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from policy_accel.data import build_dataset
from policy_accel.errors import ConfigError, report_user_errors
from policy_accel.experiment.build import SessionSetup
from policy_accel.experiment.configurations import build_configuration, check_names
from policy_accel.experiment.outputs import prepare_out_dir, write_json_atomic
from policy_accel.schema import NonNegativeInt, PositiveInt, check_options
from policy_accel.solvers.sequential import SequentialSolver

log = logging.getLogger("solver_bench")
BASELINE = "sequential"
# This tool's own options (configs/solver_bench.yaml); the sampler, task and checkpoint are checked by build_session.
OPTIONS = {
    "n_obs": PositiveInt,
    "seed": NonNegativeInt,
    "threads": PositiveInt,
    "engine": str,
    "repeats": PositiveInt,
    "configurations": list[str],
    "out_dir": str,
}


def dataset_observations(task: DictConfig, n: int, seed: int) -> np.ndarray:
    """``n`` observation histories (n, n_obs_steps, obs_dim) from random windows of the dataset."""
    dataset = build_dataset(task, max_episodes=None)[0]
    if n > len(dataset):
        raise ConfigError(f"n_obs={n} is not allowed: expected at most {len(dataset)} (the dataset's windows)")
    rows = np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)
    return dataset.batch(rows)[0].numpy()


def build_sessions(cfg: DictConfig) -> dict[str, tuple[dict, SessionSetup]]:
    """Every configuration's (description, setup), all on one policy and sampler; warm starts refused."""
    names = check_names(list(cfg.configurations))
    if BASELINE in names:
        raise ConfigError(f"configurations: {BASELINE!r} is the baseline every configuration is compared with")
    shared = {
        "task": cfg.task,
        "policy": cfg.policy,
        "checkpoint": cfg.checkpoint,
        "device": cfg.device,
        "threads": cfg.threads,
        "engine": cfg.engine,
        "check_exactness": False,
    }
    setups, policy = {}, None
    for name in names:
        run_cfg, setup = build_configuration(name, values=shared, policy=policy)
        if setup.session.warm.uses_previous:
            raise ConfigError(
                f"configuration {name!r} sets warm_start={setup.warm_start!r}: a warm start needs the previous "
                "control step, and this benchmark solves each observation cold (use eval/latency.py or eval/rollout.py)"
            )
        policy = setup.policy  # loaded once, by the first configuration's setup
        about = {"experiment": name, "solver": setup.solver.name}
        about["options"] = OmegaConf.to_container(run_cfg.solver.options, resolve=True)
        setups[name] = (about, setup)
    return setups


@torch.inference_mode()
def bench(cfg: DictConfig) -> dict:
    check_options(cfg, OPTIONS)
    out_dir = prepare_out_dir(cfg.out_dir)  # before the work: an unwritable out_dir fails in a second
    torch.set_num_threads(cfg.threads)
    setups = build_sessions(cfg)
    if not setups:
        raise ConfigError("configurations is empty: name at least one of configs/experiment/")
    first = next(iter(setups.values()))[1]
    policy, schedule = first.policy, first.schedule
    baseline = ({"experiment": None, "solver": BASELINE, "options": {}}, None)
    runs = {BASELINE: baseline, **setups}
    observations = dataset_observations(cfg.task, cfg.n_obs, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    stats = {c: {"iterations": [], "nfe": [], "latency_ms": [], "dev": [], "converged": []} for c in runs}
    reference_solver = SequentialSolver()
    log.info("%s, %d observations, configurations %s", cfg.policy.name, cfg.n_obs, list(runs))
    for obs in tqdm(observations, desc="solver bench", dynamic_ncols=True):
        cond = policy.condition(obs[None])
        noise = policy.draw_noise(schedule, 1, generator)
        reference = None
        for c, (_, setup) in runs.items():
            solver = reference_solver if setup is None else setup.solver
            budget = None if setup is None else setup.session.budget
            times = []
            for _ in range(cfg.repeats):
                start = time.perf_counter()
                result = solver.solve(policy.denoiser, schedule, noise, cond, budget=budget)
                times.append(time.perf_counter() - start)
            reference = result.sample if setup is None else reference
            s = stats[c]
            s["iterations"].append(result.iterations)
            s["nfe"].append(result.nfe)
            s["latency_ms"].append(1e3 * float(np.median(times)))
            s["dev"].append(float((result.sample - reference).abs().max()))
            s["converged"].append(result.converged)
    seq_p50 = float(np.median(stats[BASELINE]["latency_ms"]))
    summary = {
        c: {
            **runs[c][0],
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
        "checkpoint": first.checkpoint,
        "schedule": cfg.policy.name,
        "n_obs": int(cfg.n_obs),
        "threads": int(cfg.threads),
        "repeats": int(cfg.repeats),
        "torch": torch.__version__,
        "solvers": summary,
    }
    write_json_atomic(out_dir / "solver_bench.json", results)
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
