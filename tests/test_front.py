"""The latency-budget front (eval/front.py) and the labelling of approximate runs in results.json and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

from front import BUDGETS_MS, write_front  # noqa: E402
from report import load_results, write_report  # noqa: E402

ENTRY_KEYS = {"name", "overrides", "latency_ms_p50", "score"}


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
    _fake(runs / "seq_ddim2", "ddim2", "sequential", 0.60, 8.0, hardware=HW, experiment="seq_ddim2",
          overrides=["+experiment=seq_ddim2", "task=pusht", "seeds=[100000,100001,100002]", "env_batch=50",
                     "threads=1", "skip_existing=true", "hydra.sweep.dir=/x"])  # fmt: skip
    _fake(runs / "seq_ddim4", "ddim4", "sequential", 0.85, 15.0, hardware=HW)  # old: no overrides, dir = experiment
    _fake(runs / "seq_ddim10", "ddim10", "sequential", 0.93, 34.0, hardware=HW)
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
    assert set(result) == {"hardware", "n_seeds", "budgets"}
    assert result["hardware"] == HW and result["n_seeds"] == 3
    assert list(result["budgets"]) == [str(b) for b in BUDGETS_MS] == ["5", "10", "20", "40", "80", "160"]
    for pair in result["budgets"].values():
        assert set(pair) == {"sequential", "toolkit"}
        for e in pair.values():
            assert e is None or (set(e) == ENTRY_KEYS and isinstance(e["overrides"], list))
            assert e is None or (isinstance(e["latency_ms_p50"], float) and isinstance(e["score"], float))
    b = result["budgets"]
    assert b["5"] == {"sequential": None, "toolkit": None}  # nothing fits 5 ms
    assert b["10"]["sequential"] == {
        "name": "seq_ddim2",
        "overrides": ["+experiment=seq_ddim2", "task=pusht"],
        "latency_ms_p50": 8.0,
        "score": 0.6,
    }  # run-control overrides dropped
    assert b["10"]["toolkit"] == {
        "name": "renoise_ddim10_k2 (approximate)", "overrides": ["+experiment=renoise_ddim10_k2"],
        "latency_ms_p50": 9.0, "score": 0.72,
    }  # fmt: skip
    assert b["20"]["sequential"]["overrides"] == ["+experiment=seq_ddim4"]  # from the benchmark's run directory
    assert b["40"]["sequential"]["name"] == "seq_ddim10" and b["40"]["toolkit"]["name"].endswith("(approximate)")
    newton = b["80"]["toolkit"]
    assert newton["name"] == "ddim16 newton[broyden] warm coupled (exact)" and newton["score"] == 0.95
    assert newton["overrides"] == [
        "solver=newton",
        "policy=ddim16",
        "warm_start=true",
        "solver.noise=coupled",
        "solver.options.jacobian=broyden",
    ]  # rebuilt from the recorded fields
    assert b["160"]["sequential"]["name"] == "seq_ddim10"  # DDPM-100 (300 ms) fits no budget
    md = (tmp_path / "pusht_front.md").read_text()
    assert "| 10 ms | seq_ddim2: 0.600 @ 8.0 ms | renoise_ddim10_k2 (approximate): 0.720 @ 9.0 ms | +0.120 |" in md
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
    assert "APPROXIMATE warm start" in run.stdout and "(approx.)" in run.stdout
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
