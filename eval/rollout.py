"""Closed-loop rollouts of a Diffusion Policy checkpoint with a chosen solver.

    python eval/rollout.py task=pusht solver=paradigms
    python eval/rollout.py task=pusht solver=newton policy=ddpm100 warm_start=true n_episodes=5
    python eval/rollout.py -m solver=sequential,paradigms warm_start=false,true   # a sweep
    python eval/rollout.py task=pusht checkpoint=PATH solver=paradigms   # your own DP / LeRobot checkpoint
    python eval/rollout.py -m hydra/launcher=joblib +experiment=seq_ddpm100,paradigms   # jobs in parallel
    python eval/rollout.py solver=sequential policy=ddim10 warm_start=renoise renoise_steps=3   # APPROXIMATE

Writes ``results.json`` (score = mean over episodes of max reward, success rate, per-inference
latency and iteration statistics, per-episode results) into the run directory, with what reproduces
and labels it: ``approximate`` (true for an approximate warm start: re-noise, RTI-DP, Falcon, ...; and for
warm-started paradigms, whose stopping test a good guess passes early; and for any run in which an inference
stopped at its budget before converging),
``overrides`` (this job's command-line overrides), ``experiment`` and ``hardware``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from policy_accel.errors import ConfigError, report_user_errors
from policy_accel.experiment.build import (
    SessionSetup,
    build_session,
    cfg_bool,
    cfg_int,
    differences,
    run_id,
)
from policy_accel.experiment.episodes import outcome_from_dict, outcome_to_dict, run_episodes
from policy_accel.experiment.hardware import hardware
from policy_accel.experiment.outputs import claim_out_dir, write_json_atomic
from policy_accel.experiment.results_schema import SCHEMA_VERSION, check_results
from policy_accel.experiment.tasks import env_factory

log = logging.getLogger("rollout")
PROGRESS_FILE = "episodes.partial.json"  # finished episodes of an unfinished run: a re-run resumes from them
# results.json written before these keys were recorded ran with these values, unless an override said otherwise
LEGACY_DEFAULTS = {
    "tail_fill": "repeat",
    "renoise_steps": None,
    "warm_options": None,
    "budget": {"max_iterations": None, "time_ms": None},
    "check_exactness": False,
    "device": "cpu",
    "engine": {"name": "torch", "precision": "f32"},  # runs before engines existed were eager PyTorch
}
LEGACY_OVERRIDE_KEYS = ("budget.", "check_exactness", "policy.schedule", "task.max_episode_steps", "+policy.schedule")


def job_overrides(cfg: DictConfig) -> tuple[list[str], str | None]:
    """This job's command-line overrides and its configuration's name (a family member's from its file's
    ``configuration`` key, else the ``+experiment`` name; empty/None outside a Hydra job), so a results.json says
    how to reproduce it."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return [], None
    return list(hydra_cfg.overrides.task), cfg.get("configuration") or hydra_cfg.runtime.choices.get("experiment")


def run_identity(cfg: DictConfig, setup: SessionSetup, env_batch: int) -> dict:
    """Every setting that changes a result, as results.json records it: runs are the same only if all agree."""
    budget = setup.session.budget
    return {
        "task": cfg.task.name,
        "max_episode_steps": cfg.task.max_episode_steps,
        "solver": setup.solver.name,
        "policy": cfg.policy.name,
        "schedule": setup.schedule.describe(),
        "solver_options": OmegaConf.to_container(cfg.solver.options),
        **setup.session.warm.record(),  # warm_start, renoise_steps, warm_options, tail_fill
        "noise": setup.session.noise,
        "budget": {
            "max_iterations": None if budget is None else budget.max_iterations,
            "time_ms": None if budget is None or budget.time_s is None else cfg.budget.time_ms,
        },
        "check_exactness": setup.session.check_exactness,
        "checkpoint": setup.checkpoint,
        "env_batch": env_batch,
        "threads": setup.threads,
        "device": setup.device,
        "engine": {"name": setup.policy.engine.name, "precision": setup.policy.engine.precision},
        "seeds": setup.seeds,
    }


def recorded_differences(found: dict, this: dict) -> dict:
    """How a recorded run (results.json or the progress file) differs from this one; {} when it is this run."""
    legacy = {**LEGACY_DEFAULTS, "schedule": this["schedule"], "max_episode_steps": this["max_episode_steps"]}
    differ = differences(found, this, legacy)
    if "schedule" not in found:  # written before the identity was recorded: its overrides say what it changed
        changed = [o for o in found.get("overrides") or [] if o.lstrip("+~").startswith(LEGACY_OVERRIDE_KEYS)]
        if changed:
            differ["overrides"] = (changed, "(compared field by field)")
    return differ


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or cut off mid-write by an older version
    return data if isinstance(data, dict) else None


def check_existing(out_dir: Path, identity: dict, skip_existing: bool) -> tuple[dict | None, dict | None]:
    """(finished results to reuse with ``skip_existing``, finished episodes of an interrupted run to resume).

    A results.json or progress file that records another run is an error, raised before anything runs: a second
    run with other seeds or solver options must never overwrite the first one's results.
    """
    done = _read_json(out_dir / "results.json")
    if done is not None:
        differ = recorded_differences(done, identity)
        if differ:
            raise ConfigError(
                f"{out_dir / 'results.json'} holds another run, which this one would overwrite; (found, this run): "
                f"{differ}. Pass another out_dir=..., or delete that results.json"
            )
        if skip_existing:
            check_results(out_dir / "results.json", done)  # reused as this run's results: checked like any read
            return done, None
    partial = _read_json(out_dir / PROGRESS_FILE)
    if partial is not None:
        differ = recorded_differences(partial.get("run") or {}, identity)
        if differ:
            raise ConfigError(
                f"{out_dir / PROGRESS_FILE} holds finished episodes of another run; (found, this run): {differ}. "
                "Pass another out_dir=..., or delete that file"
            )
    return None, partial


def rollout(cfg: DictConfig) -> dict:
    env_batch = cfg_int(cfg, "env_batch", minimum=1)
    save_video, skip_existing = cfg_bool(cfg, "save_video"), cfg_bool(cfg, "skip_existing")
    cfg_int(cfg, "task.max_episode_steps", minimum=1)
    make_env = partial(
        env_factory(cfg.task.name), max_episode_steps=cfg.task.max_episode_steps, render_offscreen=save_video
    )
    setup = build_session(cfg)
    policy, schedule, session = setup.policy, setup.schedule, setup.session
    native = policy.config.schedule
    if (schedule.config.kind, schedule.config.num_inference_steps) != (native.kind, native.num_inference_steps):
        log.info(
            "sampler %s (%s, %d steps) replaces the checkpoint's own (%s, %d steps); policy=native keeps it",
            cfg.policy.name,
            schedule.config.kind,
            schedule.config.num_inference_steps,
            native.kind,
            native.num_inference_steps,
        )
    if session.approximate:  # whatever makes it so: the warm start, a warm solver's stopping test, the engine
        log.warning(
            "APPROXIMATE configuration (%s, engine %s %s): chunks are not the sampler's output for their noise; "
            "results.json records approximate=true",
            " ".join(session.warm.overrides()),
            policy.engine.name,
            policy.engine.precision,
        )
    # Held from before the directory is read until the last write (released on any exit): a concurrent run into
    # the same directory is refused at once instead of overwriting this one's results.
    with claim_out_dir(cfg.out_dir, run_id(cfg)) as out_dir:
        return run_claimed(cfg, setup, out_dir, make_env, env_batch, save_video, skip_existing)


def run_claimed(
    cfg: DictConfig,
    setup: SessionSetup,
    out_dir: Path,
    make_env: Callable[[], object],
    env_batch: int,
    save_video: bool,
    skip_existing: bool,
) -> dict:
    """The episodes and results.json of :func:`rollout`, in an output directory this process holds."""
    session, seeds, checkpoint = setup.session, setup.seeds, setup.checkpoint
    identity = run_identity(cfg, setup, env_batch)
    done, partial_run = check_existing(out_dir, identity, skip_existing)
    if done is not None:
        log.info("%s already holds this run's results.json: skipped (skip_existing=true)", cfg.out_dir)
        return done
    finished = outcome_from_dict(partial_run) if partial_run is not None else None
    if finished is not None:
        log.info("resuming: %d of %d episodes finished already (%s)", len(finished.episodes), len(seeds), PROGRESS_FILE)
    log.info(
        "task %s, checkpoint %s, %s with %s (%s), warm_start=%s, noise=%s, %d episodes, env_batch %d",
        cfg.task.name,
        checkpoint,
        cfg.policy.name,
        setup.solver.name,
        dict(cfg.solver.options),
        setup.warm_start,
        session.noise,
        len(seeds),
        env_batch,
    )
    overrides, experiment = job_overrides(cfg)

    def keep(outcome) -> None:
        write_json_atomic(out_dir / PROGRESS_FILE, {"run": identity, **outcome_to_dict(outcome)})

    try:
        outcome = run_episodes(
            make_env, session, seeds, env_batch, record_video=save_video, finished=finished, on_group=keep
        )
    except KeyboardInterrupt:
        kept = _read_json(out_dir / PROGRESS_FILE)
        n = len(kept["episodes"]) if kept else 0
        sys.stderr.write(
            f"interrupted: {n} of {len(seeds)} finished episodes kept in {out_dir / PROGRESS_FILE}; run the same "
            "command again to resume\n"
        )
        raise SystemExit(130) from None
    summary = outcome.summary()
    results = {
        "schema_version": SCHEMA_VERSION,
        **identity,
        # an inference stopped by its budget returned an estimate, not the sampler's output
        "approximate": session.approximate or summary["unconverged_inferences"] > 0,
        "engine_info": setup.policy.engine.to_dict(),
        "hardware": hardware(torch.device(setup.device), setup.threads),
        "overrides": overrides,
        "experiment": experiment,
        **summary,
    }
    write_json_atomic(out_dir / "results.json", results)  # atomic: a killed run leaves no partial file
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    if save_video and outcome.frames:
        from PIL import Image

        images = [Image.fromarray(f) for f in outcome.frames]
        images[0].save(out_dir / "episode0.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    lat, it = results["latency_ms"], results["iterations"]
    print(
        "\n| task | sampler | solver | warm | noise | episodes | score | success | p50 ms | p95 ms | condition p50 ms "
        "| iterations | nfe |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {results['task']} | {results['policy']} | {results['solver']} | "
        f"{results['warm_start']}{' (approx.)' if results['approximate'] else ''} | "
        f"{results['noise']} | "
        f"{results['n_episodes']} | {results['score']:.3f} | {results['success_rate']:.0%} | {lat['p50']:.1f} | "
        f"{lat['p95']:.1f} | {results['condition_ms']['p50']:.2f} | {it['mean']:.1f} | {results['nfe']['mean']:.0f} |"
    )
    if results["max_abs_dev"] is not None:
        print(f"max |action - sequential action| over all inferences (normalized): {results['max_abs_dev']:.2e}")
    if results["unconverged_inferences"]:
        print(f"warning: {results['unconverged_inferences']} inferences hit their budget before converging")
    print(f"results written to {out_dir / 'results.json'}")
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="rollout")
@report_user_errors
def main(cfg: DictConfig) -> None:
    rollout(cfg)


if __name__ == "__main__":
    main()
