"""Rollout results as report rows, Pareto fronts and the aggregated report (table and plots).

Every sweep's ``<dir>/<run>/results.json`` (eval/rollout.py writes them) is read here, once: ``eval/report.py``
aggregates a directory of runs, ``eval/benchmark.py`` writes its sweep's report and ``eval/front.py`` picks
latency-budget winners, all from the same rows. Runs whose results.json is missing (unfinished, failed) or cut off
are skipped with a warning, so an interrupted sweep aggregates what finished; one that breaks the schema
(policy_accel/experiment/results_schema.py: a NaN or non-numeric score, latency or count) is an error naming the
file and the field, never ranked, plotted or averaged.

APPROXIMATE configurations (``approximate: true`` in results.json, e.g. ``warm_start=renoise``) are labelled
"(approx.)", drawn hollow, and kept out of the exact Pareto front; the front over everything is reported beside it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure  # no pyplot: the library never picks the caller's plotting backend

from policy_accel.experiment.outputs import save_figure_atomic, write_text_atomic
from policy_accel.experiment.results_schema import check_results
from policy_accel.warm_starts import warm_start_of

log = logging.getLogger(__name__)
COLUMNS = [
    "label",
    "policy",
    "solver",
    "warm_start",
    "renoise_steps",
    "warm_options",
    "approximate",
    "noise",
    "n_episodes",
    "score",
    "success_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "iterations_mean",
    "iterations_p95",
    "nfe_mean",
    "max_abs_dev",
    "unconverged",
    "all_converged",
]


def label(r: dict) -> str:
    """Short name of a configuration; approximate ones end in "(approx.)"."""
    opts = r.get("solver_options") or {}
    jac = f"[{opts['jacobian']}]" if "jacobian" in opts else ""
    warm = warm_start_of(r).label()
    noise = f" {r.get('noise', 'fresh')}" if r.get("noise", "fresh") != "fresh" else ""
    approx = " (approx.)" if r.get("approximate", False) else ""
    return f"{r['policy']} {r['solver']}{jac}{warm}{noise}{approx}"


def options_cell(options: dict | None) -> str:
    """A warm start's options as one results.csv cell (JSON, sorted keys; empty when it has none)."""
    return "" if options is None else json.dumps(options, sort_keys=True)


def _row(r: dict) -> dict:
    return {
        "label": label(r),
        "policy": r["policy"],
        "solver": r["solver"],
        "warm_start": r["warm_start"],
        "approximate": bool(r.get("approximate", False)),  # results.json from before the flag: exact
        "renoise_steps": r.get("renoise_steps"),
        "warm_options": options_cell(r.get("warm_options")),
        "solver_options": r.get("solver_options") or {},
        "noise": r.get("noise", "fresh"),
        "n_episodes": r["n_episodes"],
        "score": r["score"],
        "success_rate": r["success_rate"],
        "latency_p50_ms": r["latency_ms"]["p50"],
        "latency_p95_ms": r["latency_ms"]["p95"],
        # the observation-to-condition share of each inference (an image policy's encoder); None for older runs
        "condition_p50_ms": (r.get("condition_ms") or {}).get("p50"),
        "iterations_mean": r["iterations"]["mean"],
        "iterations_p95": r["iterations"]["p95"],
        "nfe_mean": r["nfe"]["mean"],
        "max_abs_dev": r.get("max_abs_dev"),
        "unconverged": r.get("unconverged_inferences", 0),
        # Every configuration here solves its sampler's chain exactly (to tolerance) unless it hit a budget.
        "all_converged": r.get("unconverged_inferences", 0) == 0,
        "_latencies": r.get("latencies_ms", []),
        # per-seed max reward (paired statistics in eval/front.py); results.json without episodes give {}
        "_episode_scores": {int(e["seed"]): float(e["max_reward"]) for e in r.get("episodes") or []},
        "_schedule": r.get("schedule"),
        "_warm_options": r.get("warm_options"),
        "_tail_fill": r.get("tail_fill"),
        "_seeds": r["seeds"],
        "_latency_seeds": r.get("latency_seeds", r["seeds"]),
        "_experiment": r.get("experiment"),
        "_overrides": r.get("overrides"),
        "_hardware": r.get("hardware"),
        # what served the network: for latency (a benchmark's batch-1 pass) and for the score (its score pass)
        "_engine": (r.get("engine") or {"name": "torch"})["name"],
        "_score_engine": (r.get("score_engine") or r.get("engine") or {"name": "torch"})["name"],
    }


def read_results(path: Path) -> dict | None:
    """One results.json checked against its schema; None (with a warning) when it is missing or cut off mid-write.

    Raises :class:`~policy_accel.errors.ResultsError` (file and field named) when it breaks the schema.
    """
    if not path.is_file():
        log.warning("%s: no results.json (unfinished or failed run), skipped", path.parent)
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: invalid (%s: %s), skipped", path, type(e).__name__, e)
        return None
    check_results(path, data)
    return data


def read_run(path: Path) -> dict | None:
    """The report row of one results.json (see :func:`read_results`)."""
    data = read_results(path)
    return None if data is None else _row(data)


def load_results(dirs: list[Path]) -> list[dict]:
    """One row per run directory directly under each of ``dirs``; unfinished or broken runs are left out."""
    rows = []
    for d in dirs:
        if not d.is_dir():
            log.warning("%s is not a directory, skipped", d)
            continue
        for run in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            row = read_run(run / "results.json")
            if row is not None:
                rows.append({**row, "_dir": run.name})  # the run's name (a benchmark experiment's, say)
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """Configurations no other beats on both latency (lower) and score (higher).

    Callers pass the exact rows for the exact front (approximate ones change the answer, so they get their own)."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["latency_p50_ms"], -r["score"])):
        if r["score"] > best:
            front.append(r)
            best = r["score"]
    return front


def pareto_mark(r: dict, front: list[dict], overall: list[dict], any_approx: bool) -> str:
    """'*' on the exact front, '+' on the front over all configurations (only shown when some are approximate)."""
    mark = "*" if any(r is f for f in front) else ""
    if any_approx and any(r is f for f in overall):
        mark += "+"
    return mark


def write_report(rows: list[dict], out: Path, title: str, command: str | None) -> None:
    """``results.csv``, ``report.md`` (quoting ``command``, the one that made the runs), ``latency_vs_reward.png``
    and ``latency_distribution.png`` for ``rows`` in ``out``: a report is only outputs, each naming its command."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["latency_p50_ms"])
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", table.getvalue())
    baseline = next((r for r in rows if r["policy"] == "ddpm100" and r["solver"] == "sequential"), None)
    front = pareto([r for r in rows if not r["approximate"]])
    overall = pareto(rows)
    any_approx = any(r["approximate"] for r in rows)

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in rows:
        points = ax.scatter(r["latency_p50_ms"], r["score"], s=30)
        if r["approximate"]:  # hollow: not the sampler's output for its noise
            points.set_facecolor("none")
            points.set_edgecolor(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0])
        ax.annotate(
            r["label"], (r["latency_p50_ms"], r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.plot(
        [r["latency_p50_ms"] for r in front],
        [r["score"] for r in front],
        "k--",
        lw=1,
        label="Pareto frontier (exact)" if any_approx else "Pareto frontier",
    )
    if any_approx:
        ax.plot(
            [r["latency_p50_ms"] for r in overall],
            [r["score"] for r in overall],
            ":",
            color="tab:red",
            lw=1,
            label="Pareto frontier incl. approximate",
        )
    ax.set_xscale("log")
    ax.set_xlabel("median latency per control step, batch 1 (ms, log)")
    ax.set_ylabel("score (mean max reward)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure_atomic(fig, out / "latency_vs_reward.png", dpi=120)

    with_lat = [r for r in rows if r["_latencies"]]
    if with_lat:
        fig = Figure(figsize=(7, 0.35 * len(with_lat) + 1.5))
        ax = fig.subplots()
        ax.boxplot(
            [r["_latencies"] for r in with_lat], orientation="horizontal", showfliers=True, flierprops={"markersize": 2}
        )
        ax.set_yticks(range(1, len(with_lat) + 1), [r["label"] for r in with_lat], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("latency per inference (ms, log)")
        fig.tight_layout()
        save_figure_atomic(fig, out / "latency_distribution.png", dpi=120)

    lines = [f"# {title}", ""]
    if command:
        lines += ["Made by:", "", f"    {command}", ""]
    seeds = sorted({tuple(r["_seeds"]) for r in rows})
    lat_seeds = sorted({tuple(r["_latency_seeds"]) for r in rows})
    lines += [
        f"Score and success over seeds {', '.join(f'{s[0]}-{s[-1]} ({len(s)})' for s in seeds)}; latency, "
        f"iterations and network calls per control step at batch 1 over seeds "
        f"{', '.join(f'{s[0]}-{s[-1]} ({len(s)})' for s in lat_seeds)}.",
        "",
    ]
    if any_approx:
        lines += [
            "Configurations marked (approx.) are APPROXIMATE (re-noised warm starts): their chunks are not the "
            "sampler's output for any noise. They are kept out of the exact Pareto front (*); + marks the front "
            "over all configurations.",
            "",
        ]
    lines += [
        "| configuration | score | success | p50 ms | p95 ms | vs seq. DDPM-100 | iterations (mean / p95) | "
        "nfe | max dev | all converged | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{baseline['latency_p50_ms'] / r['latency_p50_ms']:.2f}x" if baseline else "–"
        dev = "–" if r["max_abs_dev"] is None else f"{r['max_abs_dev']:.1e}"
        lines.append(
            f"| {r['label']} | {r['score']:.3f} | {r['success_rate']:.0%} | {r['latency_p50_ms']:.1f} | "
            f"{r['latency_p95_ms']:.1f} | {ratio} | {r['iterations_mean']:.1f} / {r['iterations_p95']:.0f} | "
            f"{r['nfe_mean']:.0f} | {dev} | {'yes' if r['all_converged'] else 'no'} | "
            f"{pareto_mark(r, front, overall, any_approx)} |"
        )
    lines += ["", "![latency vs reward](latency_vs_reward.png)", ""]
    if with_lat:
        lines += ["![latency distribution](latency_distribution.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
