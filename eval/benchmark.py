"""Latency-vs-reward sweep: run every configuration of ``configs/benchmark.yaml`` closed loop on the
same test seeds at batch 1, then write the aggregated report (eval/report.py).

    python eval/benchmark.py                                   # all configurations, 50 seeds
    python eval/benchmark.py n_episodes=5 out_dir=/tmp/bench   # a quick look

Resumable: a configuration whose ``runs/<name>/results.json`` exists is not run again. Runs are
sequential on purpose: two runs side by side on a small CPU would distort the latencies measured.
"""

from __future__ import annotations

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


def run_sweep(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    names = list(cfg.configurations) if cfg.only is None else list(cfg.only)
    unknown = [n for n in names if n not in cfg.configurations]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; defined: {', '.join(cfg.configurations)}")
    for name in names:
        overrides = cfg.configurations[name]
        run_dir = out / "runs" / name
        if (run_dir / "results.json").exists():
            log.info("%s: done already, skipped", name)
            continue
        log.info("%s: %s", name, " ".join(overrides))
        run_cfg = compose(
            "rollout",
            overrides=[
                f"task={cfg.task}",
                *overrides,
                f"n_episodes={cfg.n_episodes}",
                f"threads={cfg.threads}",
                f"check_exactness={cfg.check_exactness}",
                f"out_dir={run_dir}",
            ],
        )
        rollout(run_cfg)
    command = "python eval/benchmark.py " + " ".join(sys.argv[1:])
    write_report(load_results([out / "runs"]), out, f"{cfg.task}: latency vs reward (CPU, batch 1)", command.strip())
    log.info("report written to %s", out / "report.md")


def main() -> None:
    """Hydra-style overrides on the command line; composed here so each run's config composes too."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        run_sweep(compose("benchmark", overrides=sys.argv[1:]))


if __name__ == "__main__":
    main()
