"""Latency-vs-reward sweep: run configurations (``configs/experiment/<name>.yaml``) closed loop on the same
test seeds, then write the aggregated report (policy_accel/experiment/results.py).

Each configuration runs in two passes, and each pass is ONE Hydra multirun of eval/rollout.py over all the
configurations (``rollout.py -m +experiment=a,b,...``), dispatched by whichever Hydra launcher the pass names:

* the *score* pass runs every seed with episodes batched ``score_env_batch`` at a time (one batched inference
  per control step for the group; exact solvers return the same actions as at batch 1, up to tolerance). It
  measures no latency, so its jobs run side by side (``score_launcher``: joblib locally, or Ray on a cluster).
* the *latency* pass runs the first ``latency_episodes`` seeds at batch 1, what a robot sees, and gives
  latency, iterations and network calls. Timing jobs must not share the machine: ``latency_launcher`` runs one
  job at a time (Hydra's basic launcher, or ``[hydra/launcher=joblib,hydra.launcher.n_jobs=1]``).

Set ``score_env_batch=1 latency_episodes=50`` for a single batch-1 pass. ``passes=[score]`` runs only the score pass
(e.g. while the machine is busy), a later ``passes=[latency]`` the timed one on a quiet machine; both then merge.
Before the first job, every configuration's setup is built as its jobs will build it (``build_session``), so a bad
option or checkpoint fails at once.

    python eval/benchmark.py                                   # the default configurations, 50 seeds
    python eval/benchmark.py n_episodes=5 out_dir=/tmp/bench   # a quick look
    python eval/benchmark.py task=lift out_dir=reports/lift    # any task of configs/task/, same sweep
    python eval/benchmark.py "score_launcher=['hydra/launcher=ray']"   # score pass on Ray (ray.init config:
    # hydra.launcher.ray.init.address=auto joins a running cluster; default: a local instance)

Layout: ``<out_dir>/runs/<name>/passes/{score,latency}/results.json`` (the multirun jobs),
``<out_dir>/runs/<name>/results.json`` (merged), ``<out_dir>/report.md``. Resumable: run the same command
again; a job whose results.json exists is skipped (``rollout.py skip_existing=true``), a configuration whose
merged results.json exists is not launched at all, and the report always aggregates whatever finished.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from policy_accel.errors import ConfigError, report_user_errors
from policy_accel.experiment.build import run_id
from policy_accel.experiment.configurations import (
    STEPS_KEY,
    build_configuration,
    check_names,
    configuration_names,
    resolve,
)
from policy_accel.experiment.outputs import claim_out_dir, write_json_atomic
from policy_accel.experiment.results import load_results, read_results, write_report
from policy_accel.experiment.results_schema import SCHEMA_VERSION
from policy_accel.model.engine import resolve_engine
from policy_accel.schema import NonNegativeInt, PositiveInt, check_options

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("benchmark")
# This tool's own options (configs/benchmark.yaml), checked before any job; each configuration by build_session.
OPTIONS = {
    "n_episodes": PositiveInt,
    "start_seed": NonNegativeInt,
    "latency_episodes": PositiveInt,
    "score_env_batch": PositiveInt,
    "score_threads": PositiveInt,
    "threads": PositiveInt,
    "passes": list[str],
    "only": list[str] | None,
    "score_launcher": list[str],
    "latency_launcher": list[str],
    "out_dir": str,
    "checkpoint": str,
}


def _load(path: Path) -> dict | None:
    """A finished job's results.json, checked against its schema; None while there is none."""
    return read_results(path) if path.is_file() else None


def job_overrides(
    cfg: DictConfig, seeds: list[int], env_batch: int, threads: int, engine: str | None = None
) -> list[str]:
    """The overrides every rollout job of a pass gets on top of its configuration (``engine``: instead of the
    sweep's, e.g. to check a configuration without compiling its network)."""
    return [
        f"task={cfg.task.name}",
        f"checkpoint={cfg.checkpoint}",
        f"seeds=[{','.join(map(str, seeds))}]",
        f"env_batch={env_batch}",
        f"threads={threads}",
        f"engine={engine or cfg.engine}",
        f"engine_precision={cfg.engine_precision}",
        f"engine_fuse={str(cfg.engine_fuse).lower()}",
        "skip_existing=true",
    ]


def check_configurations(cfg: DictConfig, names: list[str], passes: list[tuple]) -> None:
    """Build every configuration's setup as each pass's jobs will (``build_session``) before the first job starts:
    a bad option or checkpoint fails here, in seconds, with its name, not in every job of a pass."""
    resolve_engine(cfg.engine, "cpu")  # once: the jobs' engine is the same for every configuration
    for name in names:
        for _, seeds, env_batch, threads, _ in passes:
            build_configuration(name, job_overrides(cfg, seeds, env_batch, threads, engine="torch"))


def multirun(
    cfg: DictConfig, names: list[str], pass_name: str, seeds: list[int], env_batch: int, threads: int, launcher
) -> int:
    """``rollout.py -m`` over ``names`` into ``<out_dir>/runs/<name>/passes/<pass_name>/``: one sweep over the
    configurations with files of their own, one per family over its members' step counts; the worst exit status."""
    files, members = [], {}
    for name in names:
        experiment, member = resolve(name)
        if member:
            members.setdefault(experiment, []).append(member[0].split("=", 1)[1])
        else:
            files.append(experiment)
    sweeps = [(",".join(files), [], "${hydra.runtime.choices.experiment}")] if files else []
    sweeps += [(family, [f"{STEPS_KEY}={','.join(steps)}"], "${configuration}") for family, steps in members.items()]
    status = 0
    for experiment, sweep, run_name in sweeps:
        command = [
            sys.executable,
            str(ROOT / "eval" / "rollout.py"),
            "--multirun",
            *launcher,
            f"+experiment={experiment}",
            *sweep,
            *job_overrides(cfg, seeds, env_batch, threads),
            f"hydra.sweep.dir={Path(cfg.out_dir).resolve() / 'runs'}",
            f"hydra.sweep.subdir={run_name}/passes/{pass_name}",
        ]
        log.info("%s pass: %s", pass_name, " ".join(command[1:]))
        status = max(status, subprocess.run(command).returncode)
    return status


def merge(score: dict, latency: dict) -> dict:
    """Score and success from the score pass; latency, iterations and exactness from the batch-1 pass."""
    merged = dict(score)
    for key in ("latency_ms", "iterations", "nfe", "latencies_ms", "unconverged_inferences", "warm_inferences"):
        merged[key] = latency[key]
    if "condition_ms" in latency:  # runs from before the field have none
        merged["condition_ms"] = latency["condition_ms"]
    devs = [d for d in (score.get("max_abs_dev"), latency.get("max_abs_dev")) if d is not None]
    merged["max_abs_dev"] = max(devs) if devs else None
    merged["approximate"] = bool(score.get("approximate")) or bool(latency.get("approximate"))
    merged["latency_seeds"] = latency["seeds"]
    merged["score_env_batch"] = score["env_batch"]
    # The timing conditions are the latency pass's (batch 1, its threads), not the batched score pass's.
    merged["latency_threads"] = latency.get("threads")
    if latency.get("hardware") is not None:
        merged["hardware"] = latency["hardware"]
    # ... and so is the engine that served the network; the score pass's is kept beside it (scores are the same
    # within noise on any exact engine: that is what the paired score passes check)
    merged["engine"] = latency.get("engine", {"name": "torch", "precision": "f32"})
    merged["engine_info"] = latency.get("engine_info")
    merged["score_engine"] = score.get("engine", {"name": "torch", "precision": "f32"})
    return merged


def run_sweep(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    unknown = sorted(set(cfg.passes) - {"score", "latency", "single"})
    if unknown:
        raise ConfigError(f"passes: unknown pass {', '.join(unknown)}; allowed: score, latency, single")
    names = configuration_names() if cfg.only is None else check_names(list(cfg.only))
    seeds = list(range(cfg.start_seed, cfg.start_seed + cfg.n_episodes))
    latency_seeds = seeds[: cfg.latency_episodes]
    if cfg.score_env_batch == 1 and len(latency_seeds) == len(seeds):  # one batch-1 pass gives everything
        passes = [("single", seeds, 1, cfg.threads, cfg.latency_launcher)]
    else:
        passes = [
            ("score", seeds, cfg.score_env_batch, cfg.score_threads, cfg.score_launcher),
            ("latency", latency_seeds, 1, cfg.threads, cfg.latency_launcher),
        ]
    todo = []
    for name in names:
        if _load(out / "runs" / name / "results.json") is None:
            todo.append(name)
        else:
            log.info("%s: done already, skipped", name)
    failed = []
    if todo:
        check_configurations(cfg, todo, passes)
        for pass_name, pass_seeds, env_batch, threads, launcher in passes:
            if pass_name not in cfg.passes:
                log.info("%s pass: not run now (passes=%s)", pass_name, list(cfg.passes))
                continue
            # A failed job does not stop the other pass: whatever finished is kept and merged below.
            if multirun(cfg, todo, pass_name, pass_seeds, env_batch, threads, OmegaConf.to_container(launcher)):
                failed.append(pass_name)
    for name in todo:
        run_dir = out / "runs" / name
        done = [_load(run_dir / "passes" / p[0] / "results.json") for p in passes]
        if any(r is None for r in done):
            log.warning("%s: unfinished, left out of the report (run the same command again to resume)", name)
            continue
        results = done[0] if len(done) == 1 else merge(*done)
        write_json_atomic(run_dir / "results.json", {**results, "schema_version": SCHEMA_VERSION})
    command = "python eval/benchmark.py " + " ".join(sys.argv[1:])
    rows = load_results([out / "runs"])
    if rows:
        write_report(rows, out, f"{cfg.task.name}: latency vs reward (CPU)", command.strip())
        log.info("report written to %s", out / "report.md")
    if failed:
        raise SystemExit(f"jobs failed in the {' and '.join(failed)} pass(es); the report holds the finished runs")


@report_user_errors
def main() -> None:
    """Hydra-style overrides on the command line (configs/benchmark.yaml)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose("benchmark", overrides=sys.argv[1:])
    except (HydraException, OmegaConfBaseException) as err:  # an unknown key or a bad override: Hydra's message
        raise ConfigError(str(err).replace("\n", " ")) from None
    check_options(cfg, OPTIONS)  # before the claim and any job
    with claim_out_dir(cfg.out_dir, run_id(cfg)):  # held for the whole sweep: a concurrent one is refused
        run_sweep(cfg)


if __name__ == "__main__":
    main()
