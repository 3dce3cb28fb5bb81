"""Aggregate rollout results into one table and plots (rows and report: policy_accel/experiment/results.py).

    python eval/report.py reports/pusht_cpu/runs --out reports/pusht_cpu
    python eval/report.py multirun/rollout/<stamp> --out reports/my_sweep   # a Hydra multirun (any launcher)

Reads ``<dir>/<run>/results.json`` for every run directory under the given directories (a benchmark's
``runs/<name>/``, a multirun's ``<job number>/``). Runs whose results.json is missing (unfinished, failed) or
cut off are skipped with a warning, so an interrupted sweep aggregates what finished, and re-aggregating after
it is resumed loses nothing; one that breaks the results schema (a NaN or non-numeric score, latency or count) is
an error naming the file and the field. Writes ``results.csv``, ``report.md``, ``latency_vs_reward.png`` (score against
median latency per control step, Pareto frontier drawn) and ``latency_distribution.png``.

APPROXIMATE configurations (``approximate: true`` in results.json, e.g. ``warm_start=renoise``) are labelled
"(approx.)", drawn hollow, and kept out of the exact Pareto front; the front over everything is reported beside it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from policy_accel.errors import ConfigError, report_user_errors
from policy_accel.experiment.outputs import prepare_out_dir
from policy_accel.experiment.results import load_results, write_report


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="directories searched for results.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="PushT: latency vs reward")
    parser.add_argument("--command", default=None, help="the command that produced the runs, quoted in the report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    prepare_out_dir(args.out, key="--out")
    rows = load_results(args.dirs)
    if not rows:
        raise ConfigError(f"no results.json under {', '.join(map(str, args.dirs))}")
    try:
        write_report(rows, args.out, args.title, args.command)
    except OSError as err:
        raise ConfigError(f"--out {args.out} cannot be written: {err.filename}: {err.strerror or err}") from None
    print(f"{len(rows)} configurations -> {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
