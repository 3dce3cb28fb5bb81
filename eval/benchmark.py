"""Latency-vs-reward sweep: run every configuration of ``configs/benchmark.yaml`` closed loop on the
same test seeds, then write the aggregated report (eval/report.py).

Each configuration runs in two passes: a *score* pass over all seeds with episodes batched
``score_env_batch`` at a time (one batched inference per control step for the group; exact solvers
return the same actions as at batch 1, up to tolerance), and a *latency* pass at batch 1, what a robot
sees, over the first ``latency_episodes`` seeds, which gives latency, iterations and network calls.
Set ``score_env_batch=1 latency_episodes=50`` for a single batch-1 pass.

    python eval/benchmark.py                                   # all configurations, 50 seeds
    python eval/benchmark.py n_episodes=5 out_dir=/tmp/bench   # a quick look

Resumable: a configuration whose ``runs/<name>/results.json`` exists is not run again. Runs are
sequential on purpose: two runs side by side on a small CPU would distort the latencies measured.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from report import load_results, write_report  # noqa: E402
from rollout import rollout  # noqa: E402

log = logging.getLogger("benchmark")


def _run(cfg: DictConfig, overrides: list[str], run_dir: Path, seeds: list[int], env_batch: int) -> dict:
    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    run_cfg = compose(
        "rollout",
        overrides=[
            f"task={cfg.task}",
            f"threads={cfg.threads}",
            f"check_exactness={cfg.check_exactness}",
            *overrides,
            f"seeds=[{','.join(map(str, seeds))}]",
            f"env_batch={env_batch}",
            f"out_dir={run_dir}",
        ],
    )
    return rollout(run_cfg)


def merge(score: dict, latency: dict) -> dict:
    """Score and success from the score pass; latency, iterations and exactness from the batch-1 pass."""
    merged = dict(score)
    for key in ("latency_ms", "iterations", "nfe", "latencies_ms", "unconverged_inferences", "warm_inferences"):
        merged[key] = latency[key]
    devs = [d for d in (score.get("max_abs_dev"), latency.get("max_abs_dev")) if d is not None]
    merged["max_abs_dev"] = max(devs) if devs else None
    merged["latency_seeds"] = latency["seeds"]
    merged["score_env_batch"] = score["env_batch"]
    return merged


def run_sweep(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    names = list(cfg.configurations) if cfg.only is None else list(cfg.only)
    unknown = [n for n in names if n not in cfg.configurations]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; defined: {', '.join(cfg.configurations)}")
    seeds = list(range(cfg.start_seed, cfg.start_seed + cfg.n_episodes))
    latency_seeds = seeds[: cfg.latency_episodes]
    for name in names:
        run_dir = out / "runs" / name
        if (run_dir / "results.json").exists():
            log.info("%s: done already, skipped", name)
            continue
        overrides = list(cfg.configurations[name])
        log.info("%s: %s", name, " ".join(overrides))
        if cfg.score_env_batch == 1 and len(latency_seeds) == len(seeds):
            results = _run(cfg, overrides, run_dir / "passes" / "single", seeds, 1)
        else:
            score = _run(cfg, overrides, run_dir / "passes" / "score", seeds, cfg.score_env_batch)
            results = merge(score, _run(cfg, overrides, run_dir / "passes" / "latency", latency_seeds, 1))
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    command = "python eval/benchmark.py " + " ".join(sys.argv[1:])
    write_report(load_results([out / "runs"]), out, f"{cfg.task}: latency vs reward (CPU)", command.strip())
    log.info("report written to %s", out / "report.md")


def main() -> None:
    """Hydra-style overrides on the command line; composed here so each run's config composes too."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        run_sweep(compose("benchmark", overrides=sys.argv[1:]))


if __name__ == "__main__":
    main()
