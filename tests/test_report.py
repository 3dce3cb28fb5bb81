"""Sweep aggregation: finished runs are kept, merged into one table, and the Pareto front is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from policy_accel.errors import ResultsError
from policy_accel.experiment.results import load_results, pareto

ROOT = Path(__file__).resolve().parents[1]


def _fake_results(path: Path, policy: str, solver: str, score: float, p50: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    results = {
        "task": "pusht", "solver": solver, "policy": policy, "solver_options": {}, "warm_start": False,
        "noise": "fresh", "checkpoint": "checkpoints/pusht", "n_episodes": 2, "seeds": [100000, 100001],
        "score": score, "success_rate": 0.5, "latency_ms": {"p50": p50, "p95": 2 * p50, "mean": p50, "max": 3 * p50},
        "iterations": {"mean": 4.0, "p95": 4.0, "max": 4.0}, "nfe": {"mean": 4.0}, "latencies_ms": [p50, 2 * p50],
        "unconverged_inferences": 0, "max_abs_dev": None, "episodes": [],
    }  # fmt: skip
    (path / "results.json").write_text(json.dumps(results))


def test_pareto_front():
    rows = [
        {"latency_p50_ms": 10.0, "score": 0.5},
        {"latency_p50_ms": 20.0, "score": 0.4},  # slower and worse: dominated
        {"latency_p50_ms": 30.0, "score": 0.9},
    ]
    assert [r["latency_p50_ms"] for r in pareto(rows)] == [10.0, 30.0]


def test_unfinished_and_cut_off_runs_are_skipped_with_a_warning(tmp_path, caplog):
    _fake_results(tmp_path / "0", "ddim4", "sequential", 0.7, 20.0)
    (tmp_path / "1").mkdir()  # a job that never finished
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "results.json").write_text('{"policy": "ddi')  # cut off mid-write
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # files beside the run directories are ignored
    with caplog.at_level("WARNING", logger="policy_accel.experiment.results"):
        rows = load_results([tmp_path, tmp_path / "missing"])
    assert [r["policy"] for r in rows] == ["ddim4"]
    text = caplog.text
    assert f"{tmp_path / '1'}: no results.json" in text and f"{tmp_path / 'missing'} is not a directory" in text
    assert f"{tmp_path / '3' / 'results.json'}: invalid (JSONDecodeError" in text
    # keys missing: breaks the schema, an error naming the file and the field (tests/test_results_integrity.py)
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "results.json").write_text('{"policy": "ddim4", "solver": "sequential"}')
    with pytest.raises(ResultsError, match=rf"{tmp_path / '2' / 'results.json'}: warm_start: missing"):
        load_results([tmp_path])


def test_interrupted_sweep_keeps_finished_runs_and_reaggregates(tmp_path):
    _fake_results(tmp_path / "runs" / "seq_ddim_4", "ddim4", "sequential", 0.7, 20.0)
    _fake_results(tmp_path / "runs" / "seq_ddpm100", "ddpm100", "sequential", 0.9, 300.0)
    before = (tmp_path / "runs" / "seq_ddim_4" / "results.json").read_text()
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "benchmark.py"), f"out_dir={tmp_path}", "only=[seq_ddim_4,seq_ddpm100]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done already, skipped" in run.stderr
    assert (tmp_path / "runs" / "seq_ddim_4" / "results.json").read_text() == before
    report = (tmp_path / "report.md").read_text()
    assert "| ddim4 sequential | 0.700 |" in report and "15.00x" in report  # 300 ms / 20 ms
    assert (tmp_path / "latency_vs_reward.png").stat().st_size > 0
    assert len(load_results([tmp_path / "runs"])) == 2


def test_unknown_configuration_name_fails(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "benchmark.py"), f"out_dir={tmp_path}", "only=[seq_ddim_missing]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and "unknown configuration 'seq_ddim_missing'" in run.stderr


def test_bad_configuration_fails_before_any_job_starts(tmp_path):
    # every configuration's setup is built (build_session) before the first multirun is launched
    run = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "benchmark.py"), f"out_dir={tmp_path}", "only=[seq_ddim_4]", "threads=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and "threads=0 is not allowed" in run.stderr
    assert "pass: " not in run.stderr and not (tmp_path / "runs").exists()
