"""The Hydra entry point: a real closed-loop episode, its results.json, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_rollout_writes_results_json(tmp_path, run_rollout):
    run = run_rollout("solver=sequential", "policy=ddim4", "seeds=[100000]", f"out_dir={tmp_path}", "save_video=true")
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for key in [
        "task",
        "solver",
        "warm_start",
        "checkpoint",
        "n_episodes",
        "seeds",
        "score",
        "success_rate",
        "latency_ms",
        "iterations",
        "nfe",
        "episodes",
    ]:
        assert key in results
    assert results["seeds"] == [100000] and results["n_episodes"] == 1
    episode = results["episodes"][0]
    assert 0.0 <= episode["max_reward"] <= 1.0 and 1 <= episode["steps"] <= 300
    assert episode["inferences"] == -(-episode["steps"] // 8)
    assert results["iterations"]["max"] == 4 and results["score"] == episode["max_reward"]
    assert set(results["latency_ms"]) == {"p50", "p95", "mean", "max"} and results["latency_ms"]["p50"] > 0
    assert (tmp_path / "episode0.gif").stat().st_size > 0


def test_budgeted_warm_newton_rollout_reports_unconverged_inferences(tmp_path, run_rollout):
    run = run_rollout(
        "solver=newton",
        "policy=ddim4",
        "warm_start=true",
        "budget.max_iterations=1",
        "seeds=[100001]",
        f"out_dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["iterations"]["max"] == 1 and results["unconverged_inferences"] > 0
    assert results["approximate"]  # budget-stopped estimates are not the sampler's output: labelled so in reports
    assert "hit their budget" in run.stdout


@pytest.mark.parametrize(
    "override,message",
    [
        ("solver=picard", "Could not find 'solver/picard'"),
        ("task=pushT", "Could not find 'task/pushT'"),
        ("n_episode=1", "n_episode"),
        ("+solver.options.windw=4", "solver.options.windw=4 is not allowed: not an option of solver 'paradigms'"),
        ("checkpoint=/nonexistent/ckpt", "checkpoint directory /nonexistent/ckpt does not exist"),
    ],
)
def test_bad_input_fails_with_a_clear_message(override, message, run_rollout):
    run = run_rollout(override, "n_episodes=1")
    assert run.returncode != 0
    assert message in run.stderr + run.stdout
