"""Sweeps as Hydra multiruns: the joblib and Ray launchers run eval/rollout.py jobs with no code change, a
re-launched sweep skips finished jobs, eval/report.py aggregates what finished, and eval/benchmark.py goes
through the same path. Real closed-loop episodes, kept short: DDIM-2, one episode per job."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["policy=ddim2", "seeds=[100000]", "threads=1"]


def _python(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "eval" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_joblib_sweep_aggregates_and_resumes_without_rerunning_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "solver=sequential,paradigms", *FAST]
    run = _python("rollout.py", *args, f"hydra.sweep.dir={sweep}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in run.stdout + run.stderr
    assert [json.loads((sweep / n / "results.json").read_text())["solver"] for n in "01"] == ["sequential", "paradigms"]

    # Interrupted: job 1 never wrote its results, job 2 died at once, and a results.json is corrupt.
    (sweep / "1" / "results.json").unlink()
    (sweep / "2").mkdir()
    (sweep / "3").mkdir()
    (sweep / "3" / "results.json").write_text('{"score": 0.5, "polic')
    report = _python("report.py", str(sweep), "--out", str(tmp_path / "partial"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"{sweep / '1'}: no results.json" in report.stderr
    assert f"{sweep / '3' / 'results.json'}: invalid" in report.stderr
    assert [r["solver"] for r in _rows(tmp_path / "partial")] == ["sequential"]

    # Resumed: the same sweep into the same directory; the finished job is skipped, the missing one runs.
    finished = (sweep / "0" / "results.json").read_text()
    run = _python("rollout.py", *args, f"hydra.sweep.dir={sweep}", "skip_existing=true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped (skip_existing=true)" in (sweep / "0" / "rollout.log").read_text()
    assert "skipped" not in (sweep / "1" / "rollout.log").read_text()
    assert (sweep / "0" / "results.json").read_text() == finished
    report = _python("report.py", str(sweep), "--out", str(tmp_path / "full"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert sorted(r["solver"] for r in _rows(tmp_path / "full")) == ["paradigms", "sequential"]


def test_ray_launcher_on_a_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    sweep = tmp_path / "sweep"
    run = _python(
        "rollout.py",
        "-m",
        "hydra/launcher=ray",
        "+hydra.launcher.ray.init.num_cpus=2",  # ray.init(): a local instance, started and stopped by the sweep
        "+hydra.launcher.ray.init.include_dashboard=false",
        "solver=sequential,paradigms",
        *FAST,
        f"hydra.sweep.dir={sweep}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Ray Launcher is launching 2 jobs" in run.stdout + run.stderr
    report = _python("report.py", str(sweep), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    rows = _rows(tmp_path / "report")
    assert sorted(r["solver"] for r in rows) == ["paradigms", "sequential"]
    assert all(r["policy"] == "ddim2" and r["n_episodes"] == "1" for r in rows)


def _identity(**changes) -> dict:
    results = {
        "task": "pusht", "solver": "sequential", "policy": "ddim2", "solver_options": {}, "warm_start": False,
        "noise": "fresh", "checkpoint": "checkpoints/pusht", "env_batch": 1, "threads": 1, "seeds": [100000],
        "engine": {"name": "openvino", "precision": "f32"},  # what engine=auto runs here
    }  # fmt: skip
    return {**results, **changes}


def test_skip_existing_reuses_only_the_same_run(tmp_path):
    numbers = {
        "n_episodes": 1, "score": 0.25, "success_rate": 0.0, "latency_ms": {"p50": 9.0, "p95": 9.0},
        "iterations": {"mean": 2.0, "p95": 2.0}, "nfe": {"mean": 2.0},
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps({**_identity(), **numbers}))
    run = _python("rollout.py", "solver=sequential", *FAST, f"out_dir={tmp_path}", "skip_existing=true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped (skip_existing=true)" in run.stdout + run.stderr and "results written" not in run.stdout
    assert json.loads((tmp_path / "results.json").read_text())["score"] == 0.25

    (tmp_path / "results.json").write_text(json.dumps(_identity(seeds=[100001])))
    run = _python("rollout.py", "solver=sequential", *FAST, f"out_dir={tmp_path}", "skip_existing=true")
    assert run.returncode != 0 and "holds another run" in run.stdout + run.stderr and "[100001]" in run.stderr


def test_benchmark_dispatches_passes_as_multiruns_and_resumes(tmp_path):
    # A finished score pass from an interrupted benchmark: kept, not run again; the latency pass still runs.
    score_dir = tmp_path / "runs" / "seq_ddim_4" / "passes" / "score"
    score_dir.mkdir(parents=True)
    score = {
        **_identity(policy="ddim4", env_batch=2, seeds=[100000, 100001]), "n_episodes": 2, "score": 0.625,
        "success_rate": 0.5, "max_abs_dev": None, "episodes": [], "latency_ms": {"p50": 9.0, "p95": 9.0},
        "iterations": {"mean": 4.0, "p95": 4.0}, "nfe": {"mean": 4.0},  # batched: replaced by the latency pass's
    }  # fmt: skip
    (score_dir / "results.json").write_text(json.dumps(score))
    run = _python(
        "benchmark.py", f"out_dir={tmp_path}", "only=[seq_ddim_4]", "n_episodes=2", "score_env_batch=2",
        "latency_episodes=1", "threads=1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--multirun hydra/launcher=joblib" in run.stderr and "--multirun hydra/launcher=basic" in run.stderr
    assert "skipped (skip_existing=true)" in (score_dir / "rollout.log").read_text()
    latency = json.loads((tmp_path / "runs" / "seq_ddim_4" / "passes" / "latency" / "results.json").read_text())
    assert latency["env_batch"] == 1 and latency["seeds"] == [100000]
    merged = json.loads((tmp_path / "runs" / "seq_ddim_4" / "results.json").read_text())
    assert merged["score"] == 0.625 and merged["latency_ms"] == latency["latency_ms"]
    assert merged["latency_seeds"] == [100000] and merged["score_env_batch"] == 2
    assert "| ddim4 sequential | 0.625 |" in (tmp_path / "report.md").read_text()
