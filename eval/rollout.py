"""Closed-loop rollouts of a Diffusion Policy checkpoint with a chosen solver.

    python eval/rollout.py task=pusht solver=paradigms
    python eval/rollout.py task=pusht solver=newton policy=ddpm100 warm_start=true n_episodes=5
    python eval/rollout.py -m solver=sequential,paradigms warm_start=false,true   # a sweep
    python eval/rollout.py task=pusht policy.path=PATH solver=paradigms   # your own DP / LeRobot checkpoint
    python eval/rollout.py -m hydra/launcher=joblib +experiment=seq_ddim4,paradigms   # jobs in parallel
    python eval/rollout.py solver=sequential policy=ddim10 warm_start=renoise renoise_steps=3   # APPROXIMATE

Writes ``results.json`` (score = mean over episodes of max reward, success rate, per-inference
latency and iteration statistics, per-episode results) into the run directory, with what reproduces
and labels it: ``approximate`` (true for ``warm_start=renoise``: not the sampler's output for any noise; and for
warm-started paradigms, whose stopping test a good guess passes early; and for any run in which an inference
stopped at its budget before converging),
``overrides`` (this job's command-line overrides), ``experiment`` and ``hardware``.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import hardware  # noqa: E402

from policy_accel.checkpoint import load_policy  # noqa: E402
from policy_accel.evaluation import run_episodes  # noqa: E402
from policy_accel.policy import DiffusionPolicy  # noqa: E402
from policy_accel.runner import PolicyRunner  # noqa: E402
from policy_accel.solvers import make_solver  # noqa: E402
from policy_accel.solvers.base import Budget  # noqa: E402
from policy_accel.tasks import env_factory  # noqa: E402

log = logging.getLogger("rollout")


def warm_start_value(cfg: DictConfig) -> bool | str:
    """``warm_start`` as results.json records it: false, true (exact) or "renoise" (approximate)."""
    return cfg.warm_start if isinstance(cfg.warm_start, str) else bool(cfg.warm_start)


def job_overrides() -> tuple[list[str], str | None]:
    """This job's command-line overrides and its ``+experiment`` name (empty/None outside a Hydra job), so a
    results.json says how to reproduce it."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return [], None
    return list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices.get("experiment")


def finished_run(cfg: DictConfig, seeds: list[int], checkpoint: str) -> dict | None:
    """``skip_existing``: the results.json already in ``out_dir`` when it is a finished run of this configuration,
    None when there is none (or it was cut off mid-write). One that records another configuration is an error:
    a re-launched sweep must map every job to the same directory (same overrides, same ``hydra.sweep.dir``)."""
    path = Path(cfg.out_dir) / "results.json"
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict):
        return None
    this = {
        "task": cfg.task.name,
        "solver": cfg.solver.name,
        "policy": cfg.policy.name,
        "solver_options": OmegaConf.to_container(cfg.solver.options),
        "warm_start": warm_start_value(cfg),
        "renoise_steps": cfg.renoise_steps,
        "tail_fill": cfg.tail_fill,
        "noise": cfg.solver.noise,
        "checkpoint": str(checkpoint),
        "env_batch": cfg.env_batch,
        "threads": cfg.threads,
        "seeds": seeds,
    }
    older = {"tail_fill": "repeat"}  # results written before the option existed used this
    differ = {k: (done.get(k, older.get(k)), v) for k, v in this.items() if done.get(k, older.get(k)) != v}
    if differ:
        raise ValueError(f"skip_existing: {path} holds another run; (found, this run): {differ}")
    return done


def check_task_dims(policy: DiffusionPolicy, task: DictConfig, checkpoint: str) -> None:
    """Refuse a policy whose observation/action sizes differ from the task's: it was trained for something else."""
    got = (policy.config.obs_dim, policy.config.action_dim)
    want = (task.obs_dim, task.action_dim)
    if got != want:
        raise ValueError(
            f"checkpoint {checkpoint} expects obs_dim={got[0]}, action_dim={got[1]}, but task {task.name!r} has "
            f"obs_dim={want[0]}, action_dim={want[1]}: the policy was trained for another task or observation layout"
        )


def rollout(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    make_env = partial(
        env_factory(cfg.task.name), max_episode_steps=cfg.task.max_episode_steps, render_offscreen=cfg.save_video
    )
    solver = make_solver(cfg.solver.name, **OmegaConf.to_container(cfg.solver.options))
    checkpoint = cfg.policy.get("path") or cfg.checkpoint
    policy = load_policy(checkpoint, device=cfg.device, trust_pickle=bool(cfg.policy.get("trust_pickle", False)))
    check_task_dims(policy, cfg.task, checkpoint)
    native = policy.config.schedule
    schedule = policy.schedule(**cfg.policy.schedule)
    if (schedule.config.kind, schedule.config.num_inference_steps) != (native.kind, native.num_inference_steps):
        log.info(
            "sampler %s (%s, %d steps) replaces the checkpoint's own (%s, %d steps); policy=native keeps it",
            cfg.policy.name,
            schedule.config.kind,
            schedule.config.num_inference_steps,
            native.kind,
            native.num_inference_steps,
        )
    time_s = None if cfg.budget.time_ms is None else cfg.budget.time_ms / 1e3
    budget = Budget(cfg.budget.max_iterations, time_s)
    runner = PolicyRunner(
        policy,
        solver,
        schedule,
        warm_start_value(cfg),
        cfg.solver.noise,
        budget,
        check_exactness=cfg.check_exactness,
        renoise_steps=cfg.renoise_steps,
        tail_fill=cfg.tail_fill,
    )
    if runner.renoise:
        log.warning(
            "APPROXIMATE warm start (renoise, last %d of %d steps): chunks are not the sampler's output for any "
            "noise; results.json records approximate=true",
            cfg.renoise_steps,
            schedule.num_steps,
        )
    seeds = list(cfg.seeds) if cfg.seeds is not None else list(range(cfg.start_seed, cfg.start_seed + cfg.n_episodes))
    if not seeds:
        raise ValueError("no episodes to run: n_episodes must be >= 1 or seeds non-empty")
    if cfg.skip_existing and (done := finished_run(cfg, seeds, checkpoint)) is not None:
        log.info("%s already holds this run's results.json: skipped (skip_existing=true)", cfg.out_dir)
        return done
    log.info(
        "task %s, checkpoint %s, %s with %s (%s), warm_start=%s, noise=%s, %d episodes, env_batch %d",
        cfg.task.name,
        checkpoint,
        cfg.policy.name,
        solver.name,
        dict(cfg.solver.options),
        warm_start_value(cfg),
        cfg.solver.noise,
        len(seeds),
        cfg.env_batch,
    )
    overrides, experiment = job_overrides()
    outcome = run_episodes(make_env, runner, seeds, cfg.env_batch, record_video=cfg.save_video)
    summary = outcome.summary()
    results = {
        "task": cfg.task.name,
        "solver": solver.name,
        "policy": cfg.policy.name,
        "solver_options": OmegaConf.to_container(cfg.solver.options),
        "warm_start": warm_start_value(cfg),
        "renoise_steps": cfg.renoise_steps,
        "tail_fill": cfg.tail_fill,
        # an inference stopped by its budget returned an estimate, not the sampler's output
        "approximate": runner.approximate or summary["unconverged_inferences"] > 0,
        "noise": cfg.solver.noise,
        "checkpoint": str(checkpoint),
        "env_batch": cfg.env_batch,
        "threads": cfg.threads,
        "device": str(cfg.device),
        "hardware": hardware(torch.device(cfg.device), cfg.threads),
        "overrides": overrides,
        "experiment": experiment,
        **summary,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json.tmp").write_text(json.dumps(results, indent=2))
    (out_dir / "results.json.tmp").replace(out_dir / "results.json")  # atomic: a killed run leaves no partial file
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
        f"| {results['task']} | {results['policy']} | {results['solver']} | "
        f"{results['warm_start']}{' (approx.)' if results['approximate'] else ''} | "
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
