"""Latency-budget front: for each per-control-step budget, the best sequential sampler that fits against the best
toolkit configuration (parallel solvers and/or APPROXIMATE warm starts) that fits, with paired statistics over seeds.

    python eval/benchmark.py n_episodes=200 out_dir=reports/pusht_front2_runs 'only=${front2}'  # benchmark.yaml
    python eval/front.py reports/pusht_front2_runs/runs --out reports/pusht_front

Reads every ``<dir>/<run>/results.json`` (as eval/report.py does) and writes ``<out>.json``:

    {"hardware": str, "n_seeds": int, "pick_seeds": [first, last], "heldout_seeds": [first, last],
     "budgets": {"<ms>": {"sequential": entry | null, "toolkit": entry | null,
                          "sequential_by_family": {family: entry},
                          "diff": float | null, "se": float | null, "n": int,
                          "heldout": {"sequential": entry | null, "toolkit": entry | null},
                          "diff_heldout": float | null, "se_heldout": float | null, "n_heldout": int}}}

with ``entry = {"name", "family", "overrides", "latency_ms_p50", "score", "se"}``. ``diff`` is the mean over seeds
of (best toolkit - best sequential) per-seed score, ``se`` its standard error over seeds (paired: the same seeds, so
the seed-to-seed spread common to both cancels). Picking the best of many configurations on the same seeds it is
scored on biases ``diff`` upward, so ``heldout`` picks both winners on the first half of the seeds (``pick_seeds``)
and ``diff_heldout`` / ``se_heldout`` score that pair on the other half only. A configuration "fits" a budget when
its median batch-1 latency is at most the budget. Toolkit names say "(exact)" or "(approximate)": approximate ones are
not the sampler's output for any noise and never count toward an exact claim.

Also ``<out>.md`` (one row per budget) and ``<out>.png``: score against median latency (log x) with a standard-error
bar on every point, one colour per sampler family, the sequential, exact-toolkit and overall fronts; the left panel
zooms the score axis on where the fronts differ, the right one shows the full range.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from policy_accel.errors import ConfigError, report_user_errors  # noqa: E402
from policy_accel.experiment.configurations import resolve  # noqa: E402
from policy_accel.experiment.outputs import (  # noqa: E402
    prepare_out_dir,
    save_figure_atomic,
    write_text_atomic,
)
from policy_accel.experiment.results import load_results, pareto  # noqa: E402
from policy_accel.warm_starts import warm_start_of  # noqa: E402

log = logging.getLogger("front")
BUDGETS_MS = (5, 7.5, 10, 15, 20, 30, 40, 80, 160)
# Overrides that choose how a run is executed or where it writes, not which configuration it is.
RUN_CONTROL = ("seeds", "n_episodes", "start_seed", "env_batch", "threads", "skip_existing", "out_dir", "save_video")
FAMILY_COLORS = {
    "DDPM": "tab:gray",
    "DDIM (leading)": "tab:blue",
    "DDIM (trailing)": "tab:cyan",
    "DPM-Solver++ 2M": "tab:orange",
    "UniPC": "tab:purple",
}


def is_toolkit(row: dict) -> bool:
    """Toolkit = a parallel solver or an approximate warm start; plain sequential sampling is the baseline."""
    return row["solver"] != "sequential" or row["approximate"]


def experiment_name(row: dict) -> str | None:
    """The configuration that made the run: recorded in results.json, or the benchmark's run directory name."""
    if row.get("_experiment"):
        return row["_experiment"]
    try:
        resolve(str(row.get("_dir")))
    except ConfigError:
        return None
    return row["_dir"]


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
        try:
            experiment, member = resolve(name)
        except ConfigError:  # recorded by an older version under a name no longer defined
            return [f"+experiment={name}"]
        return [f"+experiment={experiment}", *member]
    # Older results.json without overrides or experiment: rebuild them from the recorded fields.
    out = [f"solver={row['solver']}", f"policy={row['policy']}", *warm_start_of(row).overrides()]
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


def sampler_family(row: dict) -> str:
    """The sampler family of a run: its recorded schedule (kind, spacing), else guessed from the policy name."""
    sched = row.get("_schedule") or {}
    kind = sched.get("kind")
    if kind is None:
        name = row["policy"]
        kind = next((k for k in ("dpmpp2m", "unipc", "ddimtr", "ddim", "ddpm") if name.startswith(k)), "ddpm")
        spacing = "trailing" if kind == "ddimtr" else None
        kind = "ddim" if kind == "ddimtr" else kind
    else:
        spacing = sched.get("timestep_spacing")
    if kind == "ddim":
        return f"DDIM ({spacing or 'leading'})"
    return {"ddpm": "DDPM", "dpmpp2m": "DPM-Solver++ 2M", "unipc": "UniPC"}.get(kind, kind)


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt n); None where undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score_on(row: dict, seeds: list[int] | None) -> float:
    """Mean per-seed score over ``seeds`` (all of the row's seeds when None or when it has no per-seed scores)."""
    per_seed = row.get("_episode_scores") or {}
    if seeds is None or not per_seed:
        return float(row["score"])
    values = [per_seed[s] for s in seeds if s in per_seed]
    return sum(values) / len(values) if values else float("nan")


def paired_difference(a: dict, b: dict, seeds: list[int] | None = None) -> tuple[float | None, float | None, int]:
    """Mean over the seeds both rows ran (restricted to ``seeds``) of a's minus b's score, its s.e., and n."""
    sa, sb = a.get("_episode_scores") or {}, b.get("_episode_scores") or {}
    common = sorted(set(sa) & set(sb) & (set(seeds) if seeds is not None else set(sa)))
    mean, se = mean_se([sa[s] - sb[s] for s in common])
    return mean, se, len(common)


def split_seeds(rows: list[dict]) -> tuple[list[int], list[int]]:
    """The seeds every row ran, in order, halved: the first half picks winners, the second scores them."""
    sets = [set(r.get("_episode_scores") or {}) for r in rows]
    common = sorted(set.intersection(*sets)) if sets else []
    half = len(common) // 2
    return common[:half], common[half:]


def best_within(rows: list[dict], budget_ms: float, seeds: list[int] | None = None) -> dict | None:
    """The highest-scoring row (on ``seeds``, default all) whose median latency fits the budget (ties: faster)."""
    fits = [r for r in rows if r["latency_p50_ms"] <= budget_ms]
    return max(fits, key=lambda r: (score_on(r, seeds), -r["latency_p50_ms"]), default=None)


def entry(row: dict | None, seeds: list[int] | None = None) -> dict | None:
    if row is None:
        return None
    per_seed = row.get("_episode_scores") or {}
    values = [per_seed[s] for s in (seeds if seeds is not None else sorted(per_seed)) if s in per_seed]
    return {
        "name": entry_name(row),
        "family": sampler_family(row),
        "overrides": config_overrides(row),
        "latency_ms_p50": float(row["latency_p50_ms"]),
        "latency_ms_p95": float(row["latency_p95_ms"]),
        "rounds_mean": float(row["iterations_mean"]),  # sequential network rounds per inference (the latency count)
        "nfe_mean": float(row["nfe_mean"]),  # network rows per inference (batch rows and Jacobian work included)
        "score": score_on(row, seeds),
        "se": mean_se(values)[1],
    }


def _condition_cell(row: dict) -> str:
    """The observation-to-condition time (an image policy's encoder) inside the row's median inference."""
    ms = row.get("condition_p50_ms")
    if ms is None:
        return "–"
    return f"{ms:.2f} ms ({ms / row['latency_p50_ms']:.0%})" if row["latency_p50_ms"] > 0 else f"{ms:.2f} ms"


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


def budget_key(b: float) -> str:
    return f"{b:g}"


def front(rows: list[dict], budgets: tuple[float, ...] = BUDGETS_MS) -> dict:
    """The front JSON (module docstring) of report rows."""
    if not rows:
        raise ValueError("no runs to build a front from")
    sequential = [r for r in rows if not is_toolkit(r)]
    toolkit = [r for r in rows if is_toolkit(r)]
    pick, held = split_seeds(rows)
    out = {
        "hardware": hardware_of(rows),
        "engines": sorted({r["_engine"] for r in rows}),  # what served the network in the latency passes
        "n_seeds": n_seeds_of(rows),
        "pick_seeds": [pick[0], pick[-1]] if pick else None,
        "heldout_seeds": [held[0], held[-1]] if held else None,
        "budgets": {},
    }
    families = sorted({sampler_family(r) for r in sequential})
    for b in budgets:
        seq, tk = best_within(sequential, b), best_within(toolkit, b)
        diff, se, n = paired_difference(tk, seq) if seq and tk else (None, None, 0)
        seq_pick = best_within(sequential, b, pick) if pick else None
        tk_pick = best_within(toolkit, b, pick) if pick else None
        diff_h, se_h, n_h = paired_difference(tk_pick, seq_pick, held) if seq_pick and tk_pick else (None, None, 0)
        by_family = {f: entry(best_within([r for r in sequential if sampler_family(r) == f], b)) for f in families}
        out["budgets"][budget_key(b)] = {
            "sequential": entry(seq),
            "toolkit": entry(tk),
            "sequential_by_family": {f: e for f, e in by_family.items() if e is not None},
            "diff": diff,
            "se": se,
            "n": n,
            "heldout": {"sequential": entry(seq_pick, held), "toolkit": entry(tk_pick, held)},
            "diff_heldout": diff_h,
            "se_heldout": se_h,
            "n_heldout": n_h,
        }
    out["criteria"] = criteria(out["budgets"])
    return out


WIN_MARGIN, WIN_MAX_BUDGET_MS, SHORTFALL_LIMIT = 0.03, 20.0, 0.01


def criteria(budgets: dict) -> dict:
    """Issue #25's test of the front: a toolkit win at some budget <= 20 ms (held-out difference >= 0.03 and >= 2
    standard errors) and, at every budget where both fit, the toolkit no more than 0.01 below the best sequential."""
    wins = [
        b
        for b, pair in budgets.items()
        if float(b) <= WIN_MAX_BUDGET_MS
        and pair["diff_heldout"] is not None
        and pair["se_heldout"] is not None
        and pair["diff_heldout"] >= WIN_MARGIN
        and pair["diff_heldout"] >= 2 * pair["se_heldout"]
    ]
    diffs = {b: pair["diff"] for b, pair in budgets.items() if pair["diff"] is not None}
    worst = min(diffs, key=diffs.get) if diffs else None
    never_below = all(d >= -SHORTFALL_LIMIT for d in diffs.values())
    return {
        "win_budgets_ms": wins,
        "worst_budget_ms": worst,
        "worst_diff": diffs.get(worst),
        "never_more_than_0.01_below": never_below,
        "met": bool(wins) and never_below,
    }


def _cell(e: dict | None) -> str:
    if e is None:
        return "none fits"
    return f"{e['name']}: {e['score']:.3f} @ {e['latency_ms_p50']:.1f} ms"


def _pm(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:+.3f}" + (f" ({se:.3f})" if se is not None else "")


def write_markdown(
    result: dict, rows: list[dict], path: Path, image: str, command: str | None, task: str = "PushT"
) -> None:
    exact_toolkit = [r for r in rows if is_toolkit(r) and not r["approximate"]]
    lines = [f"# {task}: best configuration per latency budget", ""]
    if command:
        lines += ["Made by:", "", f"    {command}", ""]
    pick, held = result["pick_seeds"], result["heldout_seeds"]
    lines += [
        f"Hardware: {result['hardware']}; network served by {', '.join(result.get('engines') or ['torch'])}. "
        f"Score over {result['n_seeds']} seeds; latency = median per control step at "
        "batch 1. A configuration fits a budget when its median latency is at most the budget. Toolkit = parallel "
        "solvers (exact: the sampler's output for its noise, within tolerance) and warm starts (re-noise, RTI-DP, "
        "Falcon: **approximate**, not the sampler's output for any noise). Difference = best toolkit minus best "
        "sequential, mean over seeds of the paired per-seed scores (standard error over seeds in brackets). "
        + (
            f"Held out: both winners picked on seeds {pick[0]}-{pick[1]}, their difference scored on seeds "
            f"{held[0]}-{held[1]} only (no best-of-many bias)."
            if pick and held
            else "No per-seed scores: no held-out difference."
        ),
        "",
        "| budget | best sequential | best toolkit | difference (s.e.) | held-out pick: toolkit vs sequential | "
        "held-out difference (s.e.) | best exact toolkit |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget, pair in result["budgets"].items():
        seq, tk = pair["sequential"], pair["toolkit"]
        h = pair["heldout"]
        picked = f"{h['toolkit']['name']} vs {h['sequential']['name']}" if h["toolkit"] and h["sequential"] else "–"
        exact = entry(best_within(exact_toolkit, float(budget)))
        lines.append(
            f"| {budget} ms | {_cell(seq)} | {_cell(tk)} | {_pm(pair['diff'], pair['se'])} | {picked} | "
            f"{_pm(pair['diff_heldout'], pair['se_heldout'])} | {_cell(exact)} |"
        )
    c = result["criteria"]
    lines += [
        "",
        f"Issue #25's test: a toolkit win at some budget <= {WIN_MAX_BUDGET_MS:g} ms (held-out difference >= "
        f"{WIN_MARGIN} and >= 2 s.e.): **{', '.join(c['win_budgets_ms']) + ' ms' if c['win_budgets_ms'] else 'none'}**;"
        f" toolkit never more than {SHORTFALL_LIMIT} below the best sequential: "
        f"**{'yes' if c['never_more_than_0.01_below'] else 'no'}**"
        + (f" (worst: {c['worst_diff']:+.3f} at {c['worst_budget_ms']} ms)" if c["worst_budget_ms"] else "")
        + f". Met: **{'yes' if c['met'] else 'no'}**.",
        "",
        "What each budget's winners cost (rounds = sequential network rounds per inference, nfe = network rows):",
        "",
        "| budget | sequential: rounds, nfe, p50 / p95 ms | toolkit: rounds, nfe, p50 / p95 ms |",
        "|---|---|---|",
    ]
    for budget, pair in result["budgets"].items():
        cost = [
            "–"
            if e is None
            else f"{e['name']}: {e['rounds_mean']:.2f}, {e['nfe_mean']:.1f}, "
            f"{e['latency_ms_p50']:.1f} / {e['latency_ms_p95']:.1f}"
            for e in (pair["sequential"], pair["toolkit"])
        ]
        lines.append(f"| {budget} ms | {cost[0]} | {cost[1]} |")
    lines += ["", "Best sequential configuration of each family per budget:", ""]
    families = sorted({f for pair in result["budgets"].values() for f in pair["sequential_by_family"]})
    lines += ["| budget | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for budget, pair in result["budgets"].items():
        cells = [_cell(pair["sequential_by_family"].get(f)) for f in families]
        lines.append(f"| {budget} ms | " + " | ".join(cells) + " |")
    lines += [
        "",
        "All configurations:",
        "",
        "| configuration | family | kind | score (s.e.) | p50 ms | of which condition (share) | overrides |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["latency_p50_ms"]):
        kind = "sequential" if not is_toolkit(r) else ("approximate" if r["approximate"] else "exact toolkit")
        e = entry(r)
        se = f" ({e['se']:.3f})" if e["se"] is not None else ""
        lines.append(
            f"| {entry_name(r)} | {e['family']} | {kind} | {r['score']:.3f}{se} | {r['latency_p50_ms']:.1f} | "
            f"{_condition_cell(r)} | `{' '.join(config_overrides(r))}` |"
        )
    lines += ["", f"![latency budget front]({image})", ""]
    write_text_atomic(path, "\n".join(lines))


def zoom_range(fronts: list[list[dict]]) -> tuple[float, float]:
    """Score-axis limits around where the fronts differ: from the lowest front point within 0.2 of the best score
    (the few-step floor, e.g. 1-step samplers near 0.1, stays in the full-range panel) to just above the best."""
    scores = [r["score"] for f in fronts for r in f]
    top = max(scores)
    low = min(s for s in scores if s >= top - 0.2)
    margin = max(0.01, 0.08 * (top - low))
    return low - margin, top + margin


def plot(rows: list[dict], path: Path, title: str, budgets: tuple[float, ...] = BUDGETS_MS) -> None:
    """Two panels (zoomed, full range): every configuration with an s.e. bar, coloured by sampler family and marked
    by kind (o sequential, s exact toolkit, ^ hollow approximate), the three fronts, and the budgets."""
    exact_toolkit = [r for r in rows if is_toolkit(r) and not r["approximate"]]
    fronts = [  # hollow rings of growing size mark each front's points, so coinciding fronts stay visible
        ("sequential front", pareto([r for r in rows if not is_toolkit(r)]), "tab:blue", "-", 10),
        ("toolkit exact front", pareto(exact_toolkit), "tab:green", "--", 14),
        ("overall front (incl. approximate)", pareto(rows), "black", ":", 18),
    ]
    on_a_front = {id(r) for _, f, *_ in fronts for r in f}
    kinds = [
        ("sequential", lambda r: not is_toolkit(r), "o", False),
        ("toolkit, exact", lambda r: is_toolkit(r) and not r["approximate"], "s", False),
        ("toolkit, approximate", lambda r: r["approximate"], "^", True),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(16, 7), gridspec_kw={"width_ratios": [3, 2]})
    for panel, ax in enumerate(axes):
        for family in sorted({sampler_family(r) for r in rows}):
            color = FAMILY_COLORS.get(family, "tab:red")
            for kind, test, marker, hollow in kinds:
                group = [r for r in rows if sampler_family(r) == family and test(r)]
                if not group:
                    continue
                ses = [entry(r)["se"] or 0.0 for r in group]
                ax.errorbar(
                    [r["latency_p50_ms"] for r in group], [r["score"] for r in group], yerr=ses, fmt=marker, ms=5,
                    color=color, mfc="none" if hollow else color, elinewidth=0.8, capsize=2,
                    label=f"{family}, {kind}",
                )  # fmt: skip
        for name, f, color, ls, size in fronts:
            if f:
                xs, ys = [r["latency_p50_ms"] for r in f], [r["score"] for r in f]
                ax.step(xs, ys, where="post", lw=1.2, label=name, color=color, ls=ls, marker="o", ms=size, mfc="none")
        for b in budgets:
            ax.axvline(b, color="0.85", lw=0.8, zorder=0)
            ax.annotate(f"{b:g} ms", (b, 1), xycoords=("data", "axes fraction"), fontsize=6, color="0.5",
                        xytext=(2, -8), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("median latency per control step, batch 1 (ms, log)")
        ax.set_ylabel("score (mean max reward), bars: s.e. over seeds")
        if panel == 0:
            low, high = zoom_range([f for _, f, *_ in fronts if f])
            ax.set_ylim(low, high)
            ax.set_title(f"{title} (zoomed)")
            named = sorted((r for r in rows if id(r) in on_a_front and low <= r["score"] <= high),
                           key=lambda r: r["latency_p50_ms"])  # fmt: skip
            for k, r in enumerate(named):  # alternate above/below so neighbouring names do not overlap
                ax.annotate(entry_name(r), (r["latency_p50_ms"], r["score"]), fontsize=6,
                            xytext=(4, 6 if k % 2 else -10), textcoords="offset points")  # fmt: skip
        else:
            ax.set_ylim(-0.02, 1.02)
            ax.set_title("full score range")
            ax.legend(loc="lower right", fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def score_check(rows: list[dict], others: list[dict]) -> list[dict]:
    """Per configuration run in both: the paired per-seed score difference (other - this) and its standard error.
    Used to show that another engine's score pass gives the same scores (within noise) as the front's."""
    mine = {r["_dir"]: r for r in rows}
    checks = []
    for other in sorted(others, key=lambda r: r["_dir"]):
        row = mine.get(other["_dir"])
        if row is None:
            continue
        diff, se, n = paired_difference(other, row)
        checks.append(
            {
                "configuration": other["_dir"],
                "engines": [row["_score_engine"], other["_score_engine"]],
                "scores": [row["score"], other["score"]],
                "diff": diff,
                "se": se,
                "n": n,
                "within_2se": diff is not None and se is not None and abs(diff) <= 2 * se,
            }
        )
    return checks


def score_check_markdown(checks: list[dict]) -> list[str]:
    lines = [
        "",
        "## Score check: the same configurations' score passes on another engine",
        "",
        "Paired per-seed difference (check minus front) and its standard error; within 2 s.e. is no difference.",
        "",
        "| configuration | engines (front / check) | score front | score check | diff (s.e.) | n | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        diff = "–" if c["diff"] is None else f"{c['diff']:+.4f} ({c['se']:.4f})"
        verdict = "no difference" if c["within_2se"] else "DIFFERENT"
        lines.append(
            f"| {c['configuration']} | {' / '.join(c['engines'])} | {c['scores'][0]:.3f} | {c['scores'][1]:.3f} | "
            f"{diff} | {c['n']} | {verdict} |"
        )
    return lines


def write_front(
    rows: list[dict],
    out: Path,
    command: str | None = None,
    task: str = "PushT",
    budgets: tuple[float, ...] = BUDGETS_MS,
    checks: list[dict] | None = None,
) -> dict:
    """Write ``<out>.json``, ``<out>.md`` and ``<out>.png``; returns the JSON object."""
    result = front(rows, budgets)
    if checks is not None:
        result["score_check"] = checks
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out.with_name(out.name + ext) for ext in (".json", ".md", ".png"))
    write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    plot(rows, png_path, f"{task}: latency vs score, sequential and toolkit fronts", budgets)
    write_markdown(result, rows, md_path, png_path.name, command, task)
    if checks is not None:
        write_text_atomic(md_path, md_path.read_text() + "\n".join(score_check_markdown(checks)) + "\n")
    return result


def check_budgets(budgets: list[float]) -> tuple[float, ...]:
    """Budgets are milliseconds a configuration's median latency must fit in: finite and positive."""
    bad = [b for b in budgets if not (math.isfinite(b) and b > 0)]
    if bad:
        raise ConfigError(
            f"--budgets {' '.join(f'{b:g}' for b in bad)} is not allowed: expected finite milliseconds > 0"
        )
    return tuple(budgets)


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="directories whose subdirectories hold results.json")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "pusht_front", help="path prefix of the outputs")
    parser.add_argument("--command", default=None, help="the command that produced the runs, quoted in the report")
    parser.add_argument("--task", default="PushT", help="the task's name in titles (scores are its rollout score)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS_MS), help="budgets in ms")
    parser.add_argument(
        "--score-check",
        type=Path,
        nargs="+",
        default=None,
        help="directories of the same configurations run on another engine: their paired score differences",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    budgets = check_budgets(args.budgets)
    prepare_out_dir(args.out.parent, key=f"--out {args.out}: its directory")
    rows = load_results(args.dirs)
    if not rows:
        raise ConfigError(f"no results.json under {', '.join(map(str, args.dirs))}")
    checks = None
    if args.score_check:
        others = load_results(args.score_check)
        if not others:
            raise ConfigError(f"--score-check: no results.json under {', '.join(map(str, args.score_check))}")
        checks = score_check(rows, others)
    try:
        write_front(rows, args.out, args.command, args.task, budgets, checks)
    except OSError as err:
        raise ConfigError(f"--out {args.out} cannot be written: {err.filename}: {err.strerror or err}") from None
    print(f"{len(rows)} configurations -> {args.out}.json, .md, .png")


if __name__ == "__main__":
    main()
