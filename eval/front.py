"""Latency-budget front: for each per-control-step budget, the best sequential sampler that fits against the best
toolkit configuration (parallel solvers and/or APPROXIMATE re-noised warm starts) that fits.

    python eval/benchmark.py out_dir=reports/pusht_front_runs 'only=${front}'   # the runs (configs/benchmark.yaml)
    python eval/front.py reports/pusht_front_runs/runs --out reports/pusht_front

Reads every ``<dir>/<run>/results.json`` (as eval/report.py does) and writes ``<out>.json``:

    {"hardware": str, "n_seeds": int,
     "budgets": {"<ms>": {"sequential": {"name", "overrides", "latency_ms_p50", "score"} | null,
                          "toolkit":    {"name", "overrides", "latency_ms_p50", "score"} | null}}}

plus ``<out>.md`` (one row per budget with the score difference) and ``<out>.png`` (score against median latency,
log x; the sequential front, the exact toolkit front and the front over everything drawn). A configuration "fits"
a budget when its median batch-1 latency is at most the budget. Toolkit names say "(exact)" or "(approximate)":
approximate ones are not the sampler's output for any noise and never count toward an exact claim.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

from report import load_results, pareto  # noqa: E402

log = logging.getLogger("front")
BUDGETS_MS = (5, 10, 20, 40, 80, 160)
EXPERIMENTS = ROOT / "configs" / "experiment"
# Overrides that choose how a run is executed or where it writes, not which configuration it is.
RUN_CONTROL = ("seeds", "n_episodes", "start_seed", "env_batch", "threads", "skip_existing", "out_dir", "save_video")


def is_toolkit(row: dict) -> bool:
    """Toolkit = a parallel solver or an approximate warm start; plain sequential sampling is the baseline."""
    return row["solver"] != "sequential" or row["approximate"]


def experiment_name(row: dict) -> str | None:
    """The ``+experiment`` that made the run: recorded in results.json, or the benchmark's run directory name."""
    if row.get("_experiment"):
        return row["_experiment"]
    if (EXPERIMENTS / f"{row.get('_dir')}.yaml").is_file():
        return row["_dir"]
    return None


def config_overrides(row: dict) -> list[str]:
    """The eval/rollout.py arguments that reproduce the configuration (run-control overrides left out)."""
    recorded = row.get("_overrides")
    if recorded:
        keep = []
        for o in recorded:
            key = o.split("=", 1)[0].lstrip("+~")
            if key in RUN_CONTROL or key.startswith(("hydra.", "hydra/")):
                continue
            keep.append(o)
        return keep
    name = experiment_name(row)
    if name is not None:
        return [f"+experiment={name}"]
    # Older results.json without overrides or experiment: rebuild them from the recorded fields.
    warm = row["warm_start"]
    out = [f"solver={row['solver']}", f"policy={row['policy']}"]
    out.append(f"warm_start={warm}" if isinstance(warm, str) else f"warm_start={str(bool(warm)).lower()}")
    if row.get("renoise_steps") is not None:
        out.append(f"renoise_steps={row['renoise_steps']}")
    if row.get("noise", "fresh") != "fresh":
        out.append(f"solver.noise={row['noise']}")
    out += [f"solver.options.{k}={v}" for k, v in (row.get("solver_options") or {}).items()]
    return out


def entry_name(row: dict) -> str:
    """The configuration's name; toolkit names say whether the configuration is exact or approximate."""
    name = experiment_name(row) or row["label"].replace(" (approx.)", "")
    if not is_toolkit(row):
        return name
    return f"{name} ({'approximate' if row['approximate'] else 'exact'})"


def entry(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {
        "name": entry_name(row),
        "overrides": config_overrides(row),
        "latency_ms_p50": float(row["latency_p50_ms"]),
        "score": float(row["score"]),
    }


def best_within(rows: list[dict], budget_ms: float) -> dict | None:
    """The highest-scoring row whose median latency fits the budget (ties: the faster one)."""
    fits = [r for r in rows if r["latency_p50_ms"] <= budget_ms]
    return max(fits, key=lambda r: (r["score"], -r["latency_p50_ms"]), default=None)


def hardware_of(rows: list[dict]) -> str:
    recorded = sorted({r["_hardware"] for r in rows if r.get("_hardware")})
    if len(recorded) > 1:
        log.warning("runs were timed on different hardware: %s", recorded)
    if recorded:
        return " | ".join(recorded)
    return "not recorded in results.json (runs made before eval/rollout.py recorded hardware)"


def n_seeds_of(rows: list[dict]) -> int:
    counts = Counter(len(r["_seeds"]) for r in rows)
    if len(counts) > 1:
        log.warning("runs cover different numbers of seeds %s; n_seeds is the smallest", dict(counts))
    return min(counts)


def front(rows: list[dict], budgets: tuple[int, ...] = BUDGETS_MS) -> dict:
    """The front JSON (module docstring) of report rows."""
    if not rows:
        raise ValueError("no runs to build a front from")
    sequential = [r for r in rows if not is_toolkit(r)]
    toolkit = [r for r in rows if is_toolkit(r)]
    return {
        "hardware": hardware_of(rows),
        "n_seeds": n_seeds_of(rows),
        "budgets": {
            str(b): {"sequential": entry(best_within(sequential, b)), "toolkit": entry(best_within(toolkit, b))}
            for b in budgets
        },
    }


def _cell(e: dict | None) -> str:
    if e is None:
        return "none fits"
    return f"{e['name']}: {e['score']:.3f} @ {e['latency_ms_p50']:.1f} ms"


def write_markdown(result: dict, rows: list[dict], path: Path, image: str, command: str | None) -> None:
    exact_toolkit = [r for r in rows if is_toolkit(r) and not r["approximate"]]
    lines = ["# PushT: best configuration per latency budget", ""]
    if command:
        lines += ["Made by:", "", f"    {command}", ""]
    lines += [
        f"Hardware: {result['hardware']}. Score over {result['n_seeds']} seeds; latency = median per control step at "
        "batch 1. A configuration fits a budget when its median latency is at most the budget. Toolkit = parallel "
        "solvers (exact: the sampler's output for its noise, within tolerance) and re-noised warm starts "
        "(**approximate**: not the sampler's output for any noise).",
        "",
        "| budget | best sequential | best toolkit | score difference | best exact toolkit |",
        "|---|---|---|---|---|",
    ]
    for budget, pair in result["budgets"].items():
        seq, tk = pair["sequential"], pair["toolkit"]
        diff = f"{tk['score'] - seq['score']:+.3f}" if seq and tk else "–"
        exact = entry(best_within(exact_toolkit, float(budget)))
        lines.append(f"| {budget} ms | {_cell(seq)} | {_cell(tk)} | {diff} | {_cell(exact)} |")
    lines += [
        "",
        "All configurations:",
        "",
        "| configuration | kind | score | p50 ms | overrides |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["latency_p50_ms"]):
        kind = "sequential" if not is_toolkit(r) else ("approximate" if r["approximate"] else "exact toolkit")
        lines.append(
            f"| {entry_name(r)} | {kind} | {r['score']:.3f} | {r['latency_p50_ms']:.1f} | "
            f"`{' '.join(config_overrides(r))}` |"
        )
    lines += ["", f"![latency budget front]({image})", ""]
    path.write_text("\n".join(lines))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Score against median latency (log x): every configuration, three fronts (points named), and the budgets."""
    groups = [
        ("sequential", [r for r in rows if not is_toolkit(r)], "o", "tab:blue", False),
        ("toolkit, exact", [r for r in rows if is_toolkit(r) and not r["approximate"]], "s", "tab:green", False),
        ("toolkit, approximate", [r for r in rows if r["approximate"]], "^", "tab:red", True),
    ]
    exact_toolkit = [r for r in rows if is_toolkit(r) and not r["approximate"]]
    fronts = [  # hollow rings of growing size mark each front's points, so coinciding fronts stay visible
        ("sequential front", pareto([r for r in rows if not is_toolkit(r)]), "tab:blue", "-", 10),
        ("toolkit exact front", pareto(exact_toolkit), "tab:green", "--", 14),
        ("overall front (incl. approximate)", pareto(rows), "black", ":", 18),
    ]
    on_a_front = {id(r) for _, f, *_ in fronts for r in f}
    fig, ax = plt.subplots(figsize=(10, 6))
    for name, group, marker, color, hollow in groups:
        if not group:
            continue
        ax.scatter(
            [r["latency_p50_ms"] for r in group],
            [r["score"] for r in group],
            s=36,
            marker=marker,
            label=name,
            facecolors="none" if hollow else color,
            edgecolors=color,
        )
        for r in group:  # names on front points only (the report's table lists every configuration)
            if id(r) in on_a_front:
                ax.annotate(
                    entry_name(r), (r["latency_p50_ms"], r["score"]), fontsize=6, xytext=(3, -9),
                    textcoords="offset points",
                )  # fmt: skip
    for name, f, color, ls, size in fronts:
        if f:
            xs, ys = [r["latency_p50_ms"] for r in f], [r["score"] for r in f]
            ax.step(xs, ys, where="post", lw=1.2, label=name, color=color, ls=ls, marker="o", ms=size, mfc="none")
    for b in BUDGETS_MS:
        ax.axvline(b, color="0.85", lw=0.8, zorder=0)
        ax.annotate(f"{b} ms", (b, 1), xycoords=("data", "axes fraction"), fontsize=6, color="0.5", xytext=(2, -8),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("median latency per control step, batch 1 (ms, log)")
    ax.set_ylabel("score (mean max reward)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_front(rows: list[dict], out: Path, command: str | None = None, title: str | None = None) -> dict:
    """Write ``<out>.json``, ``<out>.md`` and ``<out>.png``; returns the JSON object."""
    result = front(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out.with_name(out.name + ext) for ext in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, png_path, title or "PushT: latency vs score, sequential and toolkit fronts")
    write_markdown(result, rows, md_path, png_path.name, command)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="directories whose subdirectories hold results.json")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "pusht_front", help="path prefix of the outputs")
    parser.add_argument("--command", default=None, help="the command that produced the runs, quoted in the report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    rows = load_results(args.dirs)
    if not rows:
        raise SystemExit(f"no results.json under {', '.join(map(str, args.dirs))}")
    write_front(rows, args.out, args.command)
    print(f"{len(rows)} configurations -> {args.out}.json, .md, .png")


if __name__ == "__main__":
    main()
