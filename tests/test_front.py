"""The latency-budget front (eval/front.py) and the labelling of approximate runs in results.json and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

from front import BUDGETS_MS, front, write_front  # noqa: E402
from report import load_results, write_report  # noqa: E402

ENTRY_KEYS = {
    "name",
    "family",
    "overrides",
    "latency_ms_p50",
    "latency_ms_p95",
    "rounds_mean",
    "nfe_mean",
    "score",
    "se",
}


def _fake(path: Path, policy: str, solver: str, score: float, p50: float, **extra) -> None:
    path.mkdir(parents=True, exist_ok=True)
    results = {
        "task": "pusht", "solver": solver, "policy": policy, "solver_options": {}, "warm_start": False,
        "noise": "fresh", "checkpoint": "checkpoints/pusht", "n_episodes": 3, "seeds": [100000, 100001, 100002],
        "score": score, "success_rate": 0.5, "latency_ms": {"p50": p50, "p95": 2 * p50, "mean": p50, "max": 3 * p50},
        "iterations": {"mean": 4.0, "p95": 4.0, "max": 4.0}, "nfe": {"mean": 4.0}, "latencies_ms": [p50, 2 * p50],
        "unconverged_inferences": 0, "max_abs_dev": None, "episodes": [], **extra,
    }  # fmt: skip
    (path / "results.json").write_text(json.dumps(results))


HW = "CPU: test, torch 2.x, 2 intra-op threads"
RENOISE = {"warm_start": "renoise", "renoise_steps": 2, "approximate": True, "hardware": HW}


def _sweep(runs: Path) -> None:
    """Sequential DDIM-2/4/10 and DDPM-100, one exact parallel configuration, one approximate one."""
    _fake(runs / "seq_ddim_2", "ddim2", "sequential", 0.60, 8.0, hardware=HW, experiment="seq_ddim_2",
          overrides=["+experiment=seq_ddim", "policy.schedule.num_inference_steps=2", "task=pusht",
                     "seeds=[100000,100001,100002]", "env_batch=50", "threads=1", "skip_existing=true",
                     "hydra.sweep.dir=/x"])  # fmt: skip
    _fake(runs / "seq_ddim_4", "ddim4", "sequential", 0.85, 15.0, hardware=HW)  # old: no overrides, dir = experiment
    _fake(runs / "seq_ddim_10", "ddim10", "sequential", 0.93, 34.0, hardware=HW)
    _fake(runs / "seq_ddpm100", "ddpm100", "sequential", 0.94, 300.0, hardware=HW)
    _fake(runs / "renoise_ddim10_k2", "ddim10", "sequential", 0.72, 9.0, experiment="renoise_ddim10_k2",
          overrides=["+experiment=renoise_ddim10_k2"], **RENOISE)  # fmt: skip
    _fake(runs / "7", "ddim16", "newton", 0.95, 70.0, hardware=HW, warm_start=True, noise="coupled",
          solver_options={"jacobian": "broyden"})  # fmt: skip


def test_front_json_schema_and_choices(tmp_path):
    _sweep(tmp_path / "runs")
    rows = load_results([tmp_path / "runs"])
    result = write_front(rows, tmp_path / "pusht_front", command="python eval/benchmark.py ...")
    on_disk = json.loads((tmp_path / "pusht_front.json").read_text())
    assert on_disk == result
    assert set(result) == {"hardware", "engines", "n_seeds", "pick_seeds", "heldout_seeds", "budgets", "criteria"}
    assert result["engines"] == ["torch"]  # runs that record no engine were eager
    assert result["hardware"] == HW and result["n_seeds"] == 3
    assert list(result["budgets"]) == [f"{b:g}" for b in BUDGETS_MS]
    assert list(result["budgets"]) == ["5", "7.5", "10", "15", "20", "30", "40", "80", "160"]
    for pair in result["budgets"].values():
        assert set(pair) == {
            "sequential", "toolkit", "sequential_by_family", "diff", "se", "n", "heldout", "diff_heldout",
            "se_heldout", "n_heldout",
        }  # fmt: skip
        assert pair["diff"] is None and pair["diff_heldout"] is None  # these fakes have no per-seed scores
        for e in (pair["sequential"], pair["toolkit"], *pair["sequential_by_family"].values()):
            assert e is None or (set(e) == ENTRY_KEYS and isinstance(e["overrides"], list))
            assert e is None or (isinstance(e["latency_ms_p50"], float) and isinstance(e["score"], float))
    b = result["budgets"]
    assert b["5"]["sequential"] is None and b["5"]["toolkit"] is None  # nothing fits 5 ms
    assert b["10"]["sequential"] == {
        "name": "seq_ddim_2",
        "family": "DDIM (leading)",
        "overrides": ["+experiment=seq_ddim", "policy.schedule.num_inference_steps=2", "task=pusht"],
        "latency_ms_p50": 8.0,
        "latency_ms_p95": 16.0,
        "rounds_mean": 4.0,
        "nfe_mean": 4.0,
        "score": 0.6,
        "se": None,
    }  # run-control overrides dropped
    assert b["10"]["toolkit"] == {
        "name": "renoise_ddim10_k2 (approximate)", "family": "DDIM (leading)",
        "overrides": ["+experiment=renoise_ddim10_k2"], "latency_ms_p50": 9.0, "latency_ms_p95": 18.0,
        "rounds_mean": 4.0, "nfe_mean": 4.0, "score": 0.72, "se": None,
    }  # fmt: skip
    assert b["20"]["sequential"]["overrides"] == [
        "+experiment=seq_ddim",
        "policy.schedule.num_inference_steps=4",
    ]  # from the benchmark's run directory
    assert b["40"]["sequential"]["name"] == "seq_ddim_10" and b["40"]["toolkit"]["name"].endswith("(approximate)")
    newton = b["80"]["toolkit"]
    assert newton["name"] == "ddim16 newton[broyden] warm coupled (exact)" and newton["score"] == 0.95
    assert newton["overrides"] == [
        "solver=newton",
        "policy=ddim16",
        "warm_start=true",
        "solver.noise=coupled",
        "solver.options.jacobian=broyden",
    ]  # rebuilt from the recorded fields
    assert b["160"]["sequential"]["name"] == "seq_ddim_10"  # DDPM-100 (300 ms) fits no budget
    md = (tmp_path / "pusht_front.md").read_text()
    assert "| 10 ms | seq_ddim_2: 0.600 @ 8.0 ms | renoise_ddim10_k2 (approximate): 0.720 @ 9.0 ms | – |" in md
    assert "| 5 ms | none fits | none fits | – |" in md and "**approximate**" in md
    assert (tmp_path / "pusht_front.png").stat().st_size > 0


def test_front_cli(tmp_path):
    _sweep(tmp_path / "runs")
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "front.py"), str(tmp_path / "runs"), "--out", str(tmp_path / "f")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "f.json").read_text())["n_seeds"] == 3
    assert {p.name for p in tmp_path.iterdir()} >= {"f.json", "f.md", "f.png"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "front.py"), str(tmp_path / "runs"), "--out", str(tmp_path / "can"),
         "--task", "Can", "--budgets", "10", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(json.loads((tmp_path / "can.json").read_text())["budgets"]) == ["10", "20"]
    assert (tmp_path / "can.md").read_text().startswith("# Can: best configuration per latency budget")


def test_report_labels_approximate_runs_and_keeps_them_out_of_the_exact_front(tmp_path):
    _fake(tmp_path / "a", "ddim2", "sequential", 0.60, 8.0)
    _fake(tmp_path / "b", "ddim10", "sequential", 0.90, 7.0, **RENOISE)  # faster and better, but approximate
    rows = load_results([tmp_path])
    approx = next(r for r in rows if r["approximate"])
    assert approx["label"] == "ddim10 sequential renoise-k2 (approx.)"
    write_report(rows, tmp_path / "out", "t", None)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| ddim10 sequential renoise-k2 (approx.) | 0.900 |" in report
    line = next(x for x in report.splitlines() if x.startswith("| ddim10 sequential renoise-k2"))
    assert line.endswith("| + |")  # on the overall front only, never on the exact one
    line = next(x for x in report.splitlines() if x.startswith("| ddim2 sequential"))
    assert line.endswith("| * |")  # the exact front ignores the approximate run that dominates it
    assert "APPROXIMATE" in report
    csv = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert "approximate" in csv[0].split(",")


@pytest.mark.parametrize("experiment", ["renoise_ddim10_k2"])
def test_rollout_records_approximate_overrides_and_hardware(tmp_path, experiment):
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "rollout.py"), f"+experiment={experiment}", "threads=1",
         "seeds=[100000]", f"out_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["approximate"] is True and results["warm_start"] == "renoise" and results["renoise_steps"] == 2
    assert results["experiment"] == experiment and f"+experiment={experiment}" in results["overrides"]
    assert results["hardware"].startswith(("CPU:", "GPU:")) and "torch" in results["hardware"]
    assert results["iterations"]["cold_mean"] == 10 and results["iterations"]["warm_mean"] == 2
    assert "APPROXIMATE configuration (warm_start=renoise renoise_steps=2" in run.stdout and "(approx.)" in run.stdout
    rerun = subprocess.run(  # skip_existing recognises the same configuration
        [sys.executable, str(ROOT / "eval" / "rollout.py"), f"+experiment={experiment}", "threads=1",
         "seeds=[100000]", f"out_dir={tmp_path}", "skip_existing=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0 and "skipped" in rerun.stdout, rerun.stderr[-2000:]


def test_exact_rollout_records_approximate_false(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "rollout.py"), "solver=sequential", "policy=ddim2", "threads=1",
         "seeds=[100000]", "n_episodes=1", f"out_dir={tmp_path}", "warm_start=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["approximate"] is False and results["warm_start"] is True and results["renoise_steps"] is None


def _seeded(path: Path, policy: str, solver: str, p50: float, scores: list[float], **extra) -> None:
    """A fake run with per-seed scores on seeds 100000.. (what the paired statistics read)."""
    episodes = [{"seed": 100000 + i, "max_reward": s, "success": s > 0.95, "steps": 1, "inferences": 1}
                for i, s in enumerate(scores)]  # fmt: skip
    seeds = [e["seed"] for e in episodes]
    extra = {"hardware": HW, **extra}
    _fake(path, policy, solver, sum(scores) / len(scores), p50, seeds=seeds, n_episodes=len(seeds),
          episodes=episodes, **extra)  # fmt: skip


def test_paired_difference_recovers_a_known_shift_with_a_paired_standard_error(tmp_path):
    import random

    rng = random.Random(0)
    base = [rng.uniform(0.3, 1.0) for _ in range(200)]  # large seed-to-seed spread, shared by both
    _seeded(tmp_path / "seq_ddim_4", "ddim4", "sequential", 14.0, base)
    _seeded(tmp_path / "tk", "ddim10", "sequential", 15.0, [b + 0.05 + rng.gauss(0, 0.01) for b in base], **RENOISE)
    _seeded(tmp_path / "seq_dpmpp2m_4", "dpmpp2m4", "sequential", 13.0, [b - 0.02 for b in base],
            schedule={"kind": "dpmpp2m", "num_inference_steps": 4})  # fmt: skip
    result = write_front(load_results([tmp_path]), tmp_path / "f")
    b20 = result["budgets"]["20"]
    assert b20["sequential"]["name"] == "seq_ddim_4" and b20["toolkit"]["name"].endswith("(approximate)")
    assert b20["n"] == 200 and abs(b20["diff"] - 0.05) < 3 * b20["se"] and b20["se"] < 0.002
    assert b20["se"] < b20["sequential"]["se"] / 5  # pairing removes the shared spread
    assert set(b20["sequential_by_family"]) == {"DDIM (leading)", "DPM-Solver++ 2M"}
    assert b20["sequential_by_family"]["DPM-Solver++ 2M"]["name"] == "seq_dpmpp2m_4"
    assert result["pick_seeds"] == [100000, 100099] and result["heldout_seeds"] == [100100, 100199]
    assert b20["n_heldout"] == 100
    assert (tmp_path / "f.png").stat().st_size > 0 and "DPM-Solver++ 2M" in (tmp_path / "f.md").read_text()


def test_heldout_difference_scores_the_first_half_pick_on_the_second_half_only(tmp_path):
    seq = [0.6] * 100 + [0.7] * 100
    lucky = [0.95] * 100 + [0.5] * 100  # best on the picking half, mean 0.725
    steady = [0.75] * 200  # best over all seeds
    _seeded(tmp_path / "seq_ddim_2", "ddim2", "sequential", 8.0, seq)
    _seeded(tmp_path / "lucky", "ddim10", "sequential", 9.0, lucky, **RENOISE)
    _seeded(tmp_path / "steady", "ddim4", "sequential", 9.5, steady, **{**RENOISE, "renoise_steps": 3})
    b = front(load_results([tmp_path]))["budgets"]["10"]
    assert b["toolkit"]["name"].startswith("ddim4 ") and b["diff"] == pytest.approx(0.75 - 0.65)
    assert b["heldout"]["toolkit"]["name"].startswith("ddim10 ")  # not the in-sample winner
    assert b["heldout"]["toolkit"]["score"] == pytest.approx(0.5)  # scored on the held-out half
    assert b["diff_heldout"] == pytest.approx(0.5 - 0.7) and b["se_heldout"] == pytest.approx(0.0, abs=1e-12)


def test_statistics_helpers():
    from front import mean_se, paired_difference

    assert mean_se([]) == (None, None) and mean_se([2.0]) == (2.0, None)
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx((5 / 3) ** 0.5 / 2)
    a = {"_episode_scores": {1: 1.0, 2: 0.5, 3: 0.0}}
    b = {"_episode_scores": {2: 0.25, 3: 0.5, 4: 1.0}}
    assert paired_difference(a, b) == (pytest.approx(-0.125), pytest.approx(0.375), 2)  # seeds 2, 3 only
    assert paired_difference(a, b, [3]) == (pytest.approx(-0.5), None, 1)


def test_criteria_need_a_heldout_win_of_two_standard_errors_and_no_shortfall_anywhere(tmp_path):
    import random

    rng = random.Random(1)
    base = [rng.uniform(0.3, 0.9) for _ in range(200)]
    _seeded(tmp_path / "seq_ddim_2", "ddim2", "sequential", 8.0, base)
    _seeded(tmp_path / "seq_ddim_10", "ddim10", "sequential", 30.0, [b + 0.1 for b in base])
    _seeded(tmp_path / "tk", "ddim10", "sequential", 9.0, [b + 0.05 + rng.gauss(0, 0.01) for b in base], **RENOISE)
    c = front(load_results([tmp_path]))["criteria"]
    assert c["win_budgets_ms"] == ["10", "15", "20"]  # +0.05 with s.e. ~0.001 from 10 ms (7.5 and 5: none fits)
    assert c["worst_budget_ms"] == "30" and c["worst_diff"] == pytest.approx(-0.05, abs=0.01)
    assert not c["never_more_than_0.01_below"] and not c["met"]  # DDIM-10 at 30 ms beats every toolkit run

    _seeded(
        tmp_path / "tk_slow", "ddim16", "newton", 29.0, [b + 0.1 for b in base], **{**RENOISE, "approximate": False}
    )
    assert front(load_results([tmp_path]))["criteria"]["met"]


def test_score_check_pairs_the_same_configuration_across_engines(tmp_path):
    """--score-check: per configuration, the other engine's score minus the front's, paired by seed."""
    from front import score_check

    def episodes(rewards):
        return [{"seed": 100000 + i, "max_reward": r, "success": False, "steps": 300} for i, r in enumerate(rewards)]

    _fake(tmp_path / "a" / "seq_ddim_4", "ddim4", "sequential", 0.5, 9.0, episodes=episodes([0.4, 0.5, 0.6]))
    _fake(tmp_path / "a" / "only_here", "ddim2", "sequential", 0.3, 5.0, episodes=episodes([0.3, 0.3, 0.3]))
    engine = {"name": "openvino", "precision": "f32"}
    _fake(
        tmp_path / "b" / "seq_ddim_4",
        "ddim4",
        "sequential",
        0.6,
        3.0,
        episodes=episodes([0.5, 0.6, 0.7]),
        engine=engine,
    )
    (check,) = score_check(load_results([tmp_path / "a"]), load_results([tmp_path / "b"]))
    assert check["configuration"] == "seq_ddim_4" and check["engines"] == ["torch", "openvino"]
    assert check["diff"] == pytest.approx(0.1) and check["se"] == pytest.approx(0.0, abs=1e-12) and check["n"] == 3
    assert check["within_2se"] is False  # a constant shift on every seed is a difference


def test_the_front_shows_each_configurations_condition_share(tmp_path):
    """An image policy's encoder time (results.json ``condition_ms``) is a column of the front's table; runs from
    before the field show a dash."""
    _fake(tmp_path / "a", "ddim2", "sequential", 0.60, 8.0, hardware=HW, condition_ms={"p50": 2.0, "mean": 2.1})
    _fake(tmp_path / "b", "ddim10", "sequential", 0.90, 30.0, hardware=HW)
    write_front(load_results([tmp_path]), tmp_path / "f")
    lines = (tmp_path / "f.md").read_text().splitlines()
    assert "| configuration | family | kind | score (s.e.) | p50 ms | of which condition (share) | overrides |" in lines
    assert any(x.startswith("| ddim2 ") and "| 2.00 ms (25%) |" in x for x in lines)
    assert any(x.startswith("| ddim10 ") and "| 30.0 | – |" in x for x in lines)
