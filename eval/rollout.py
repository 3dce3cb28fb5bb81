"""Closed-loop rollouts of a Diffusion Policy checkpoint with a chosen solver.

    python eval/rollout.py task=pusht solver=paradigms
    python eval/rollout.py task=pusht solver=newton policy=ddpm100 warm_start=true n_episodes=5
    python eval/rollout.py -m solver=sequential,paradigms warm_start=false,true   # a sweep

Writes ``results.json`` (score = mean over episodes of max reward, success rate, per-inference
latency and iteration statistics, per-episode results) into the run directory.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from policy_accel.checkpoint import load_policy  # noqa: E402
from policy_accel.evaluation import run_episodes  # noqa: E402
from policy_accel.runner import PolicyRunner  # noqa: E402
from policy_accel.solvers import make_solver  # noqa: E402
from policy_accel.solvers.base import Budget  # noqa: E402
from policy_accel.tasks import env_factory  # noqa: E402

log = logging.getLogger("rollout")


def rollout(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    make_env = env_factory(cfg.task.name)
    solver = make_solver(cfg.solver.name, **OmegaConf.to_container(cfg.solver.options))
    policy = load_policy(cfg.checkpoint, device=cfg.device)
    schedule = policy.schedule(**cfg.policy.schedule)
    time_s = None if cfg.budget.time_ms is None else cfg.budget.time_ms / 1e3
    budget = Budget(cfg.budget.max_iterations, time_s)
    runner = PolicyRunner(
        policy, solver, schedule, cfg.warm_start, cfg.solver.noise, budget, check_exactness=cfg.check_exactness
    )
    seeds = list(cfg.seeds) if cfg.seeds is not None else list(range(cfg.start_seed, cfg.start_seed + cfg.n_episodes))
    if not seeds:
        raise ValueError("no episodes to run: n_episodes must be >= 1 or seeds non-empty")
    log.info(
        "task %s, checkpoint %s, %s with %s (%s), warm_start=%s, noise=%s, %d episodes, env_batch %d",
        cfg.task.name,
        cfg.checkpoint,
        cfg.policy.name,
        solver.name,
        dict(cfg.solver.options),
        cfg.warm_start,
        cfg.solver.noise,
        len(seeds),
        cfg.env_batch,
    )
    outcome = run_episodes(make_env, runner, seeds, cfg.env_batch, record_video=cfg.save_video)
    results = {
        "task": cfg.task.name,
        "solver": solver.name,
        "policy": cfg.policy.name,
        "solver_options": OmegaConf.to_container(cfg.solver.options),
        "warm_start": bool(cfg.warm_start),
        "noise": cfg.solver.noise,
        "checkpoint": str(cfg.checkpoint),
        "env_batch": cfg.env_batch,
        "threads": cfg.threads,
        "device": str(cfg.device),
        **outcome.summary(),
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if cfg.save_video and outcome.frames:
        from PIL import Image

        images = [Image.fromarray(f) for f in outcome.frames]
        images[0].save(out_dir / "episode0.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    lat, it = results["latency_ms"], results["iterations"]
    print(
        "\n| task | sampler | solver | warm | noise | episodes | score | success | p50 ms | p95 ms | iterations | nfe |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {results['task']} | {results['policy']} | {results['solver']} | {results['warm_start']} | "
        f"{results['noise']} | "
        f"{results['n_episodes']} | {results['score']:.3f} | {results['success_rate']:.0%} | {lat['p50']:.1f} | "
        f"{lat['p95']:.1f} | {it['mean']:.1f} | {results['nfe']['mean']:.0f} |"
    )
    if results["max_abs_dev"] is not None:
        print(f"max |action - sequential action| over all inferences (normalized): {results['max_abs_dev']:.2e}")
    if results["unconverged_inferences"]:
        print(f"warning: {results['unconverged_inferences']} inferences hit their budget before converging")
    print(f"results written to {out_dir / 'results.json'}")
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="rollout")
def main(cfg: DictConfig) -> None:
    rollout(cfg)


if __name__ == "__main__":
    main()
