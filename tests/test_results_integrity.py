"""Results that cannot be lost or mis-ranked (issue #36): a claimed output directory, atomic writes, the real-time
harness's keep-and-resume, and results.json read with its schema.

Subprocess tests run the real command line where the command line is what is tested (concurrent runs, Ctrl-C, one
error line and the exit status); everything else calls the library.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_errors import default_sigint, one_error_line

ROOT = Path(__file__).resolve().parents[1]
# engine=torch: these tests are about output directories, not engines (no network compiled, nothing on stderr)
FAST = ["threads=1", "engine=torch", "solver=sequential", "policy=ddim2", "task.max_episode_steps=16"]
EXIT_INTERRUPTED = 130


def _command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "eval" / script), *args]


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_command(script, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


# -- an output directory is claimed for the whole run -----------------------------------------------------------------


def _popen(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(script, *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )


def _finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_two_runs_with_other_seeds_started_at_once_into_one_out_dir_one_refuses_nothing_is_lost(tmp_path):
    """The issue's case: both used to exit 0 and print "results written", and the file held one run's seeds."""
    out = tmp_path / "out"
    seeds = {"a": "seeds=[100000,100001,100002,100003,100004,100005]", "b": "seeds=[100010,100011,100012,100013]"}
    procs = {k: _popen("rollout.py", *FAST[:4], s, f"out_dir={out}", f"hydra.run.dir={tmp_path / k}")
             for k, s in seeds.items()}  # fmt: skip
    runs = {k: _finish(p) for k, p in procs.items()}
    ok = [k for k, r in runs.items() if r.returncode == 0]
    assert len(ok) == 1, {k: (r.returncode, r.stderr[-1500:]) for k, r in runs.items()}
    winner, loser = ok[0], ({"a", "b"} - set(ok)).pop()
    line = one_error_line(runs[loser])
    assert f"out_dir={str(out)!r} is in use by another run (pid {procs[winner].pid})" in line, line
    assert "results written" not in runs[loser].stdout
    results = json.loads((out / "results.json").read_text())
    assert f"seeds=[{','.join(map(str, results['seeds']))}]" == seeds[winner]
    assert results["schema_version"] == 2
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["results.json"]


def test_the_same_configuration_started_twice_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    args = [*FAST[:4], "n_episodes=200", f"out_dir={out}"]
    first = _popen("rollout.py", *args, f"hydra.run.dir={tmp_path / 'h1'}")
    try:
        _wait_for(lambda: (out / "episodes.partial.json").exists(), first)  # the first run is mid-episodes
        assert first.poll() is None, first.communicate()[1][-3000:]
        same = _finish(_popen("rollout.py", *args, f"hydra.run.dir={tmp_path / 'h2'}"))
        assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
        line = one_error_line(same)
        assert f"is in use by another run of the same configuration (pid {first.pid})" in line, line
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert not (out / "results.json").exists() and not (out / ".out_dir.owner.json").exists()


def test_the_claim_is_held_for_the_run_and_released_on_exit_error_and_ctrl_c(tmp_path):
    from policy_accel.errors import OutDirInUseError, UserError
    from policy_accel.experiment.outputs import claim_out_dir

    with claim_out_dir(tmp_path, "run-a") as path:
        assert path == tmp_path
        for identity, words in (("run-b", "in use by another run (pid"), ("run-a", "of the same configuration")):
            with pytest.raises(OutDirInUseError, match=r"is in use by another run") as err:
                with claim_out_dir(tmp_path, identity):
                    pass
            assert words in str(err.value) and f"pid {os.getpid()}" in str(err.value)
            assert isinstance(err.value, UserError)
        seen = []  # another thread (its own file descriptor) is refused as well
        thread = threading.Thread(target=lambda: seen.append(_claim_error(tmp_path)))
        thread.start()
        thread.join()
        assert seen == [OutDirInUseError]
    for fault in (RuntimeError("a bug"), KeyboardInterrupt()):
        with pytest.raises(type(fault)):
            with claim_out_dir(tmp_path, "run-b"):
                raise fault
        with claim_out_dir(tmp_path, "run-c"):  # released: free again
            pass


def _claim_error(path: Path) -> type | None:
    from policy_accel.experiment.outputs import claim_out_dir

    try:
        with claim_out_dir(path, "run-x"):
            return None
    except Exception as err:  # noqa: BLE001 - the test compares the type
        return type(err)


def test_a_directory_that_cannot_be_claimed_is_one_error(tmp_path):
    from policy_accel.errors import ConfigError
    from policy_accel.experiment.outputs import claim_out_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"out_dir='.*a_file/out' cannot be written"):
        with claim_out_dir(blocker / "out", "run-a"):
            pass


def test_atomic_writes_from_two_writers_never_collide_and_are_synced(tmp_path, monkeypatch):
    from policy_accel.experiment import outputs

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    target = tmp_path / "results.json"
    texts = {name: json.dumps({"writer": name, "payload": "x" * 20000}) for name in "ab"}
    errors = []

    def write(name: str) -> None:
        try:
            for _ in range(100):
                outputs.write_text_atomic(target, texts[name])
        except Exception as err:  # noqa: BLE001 - a collision shows up here
            errors.append(err)

    threads = [threading.Thread(target=write, args=(name,)) for name in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in texts.values()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left behind
    assert synced, "written data must reach the disk before the rename"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the real-time harness keeps finished episodes on Ctrl-C and resumes ----------------------------------------------


def test_ctrl_c_during_a_real_time_run_keeps_finished_episodes_and_the_same_command_resumes(tmp_path):
    seeds = list(range(100000, 100008))
    out = tmp_path / "out"
    args = [*FAST[:4], f"seeds=[{','.join(map(str, seeds))}]", "max_steps=16", "rate_hz=50", "offline_results=null",
            f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    proc = _popen("realtime.py", *args)
    log = tmp_path / "hydra" / "realtime.log"
    progress = out / "episodes.partial.json"
    _wait_for(lambda: progress.exists() or (log.exists() and "seed 100000:" in log.read_text()), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, stderr[-3000:])
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "run the same command again to resume" in lines[0], stderr[-3000:]
    kept = json.loads(progress.read_text())
    n = len(kept["episodes"])
    assert 1 <= n < len(seeds) and f"{n} of {len(seeds)} finished episodes kept" in lines[0]
    assert not (out / "results.json").exists()

    resumed = _run("realtime.py", *args, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {n} of {len(seeds)} episodes" in resumed.stdout + resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == seeds and results["n_episodes"] == len(seeds) and not progress.exists()
    assert [e["seed"] for e in results["episodes"]] == seeds
    kept_summary = [{k: e[k] for k in ("seed", "max_reward", "success", "steps", "misses")} for e in kept["episodes"]]
    assert [{k: e[k] for k in kept_summary[0]} for e in results["episodes"][:n]] == kept_summary
    assert results["ticks"] == sum(e["steps"] for e in results["episodes"])
    assert results["schema_version"] == 2


# -- results.json read with its schema ----------------------------------------------------------------------------


def _results(policy: str, solver: str, score, p50: float = 10.0, **extra) -> dict:
    return {
        "task": "pusht", "solver": solver, "policy": policy, "solver_options": {}, "warm_start": False,
        "noise": "fresh", "checkpoint": "checkpoints/pusht", "n_episodes": 2, "seeds": [100000, 100001],
        "score": score, "success_rate": 0.5, "latency_ms": {"p50": p50, "p95": 2 * p50, "mean": p50, "max": 3 * p50},
        "iterations": {"mean": 4.0, "p95": 4.0, "max": 4.0}, "nfe": {"mean": 4.0}, "latencies_ms": [p50, 2 * p50],
        "unconverged_inferences": 0, "max_abs_dev": None,
        "episodes": [{"seed": 100000, "max_reward": 0.5, "success": False, "steps": 300, "inferences": 38},
                     {"seed": 100001, "max_reward": 0.5, "success": False, "steps": 300, "inferences": 38}],
        **extra,
    }  # fmt: skip


def _sweep(runs: Path, bad: dict) -> Path:
    """Two good runs and ``bad``, the best-scoring and fastest one but for its broken field."""
    for name, results in (
        ("seq_ddim_4", _results("ddim4", "sequential", 0.7, 15.0)),
        ("paradigms", _results("ddpm100", "paradigms", 0.8, 60.0)),
        ("broken", bad),
    ):
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(results))  # NaN is written as the token NaN
    return runs / "broken" / "results.json"


def _set(results: dict, dotted: str, value) -> dict:
    node = results
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return results


@pytest.mark.parametrize("script", ["front.py", "report.py"])
@pytest.mark.parametrize("score", [float("nan"), "0.99"])
def test_a_nan_or_string_score_is_one_error_naming_file_and_field_never_ranked(tmp_path, script, score):
    broken = _sweep(tmp_path / "runs", _results("ddim1", "sequential", score, 1.0))
    run = _run(script, str(tmp_path / "runs"), "--out", str(tmp_path / "report" / "front"))
    line = one_error_line(run)
    assert str(broken) in line and "score" in line, line
    assert not any(p.is_file() for p in tmp_path.joinpath("report").rglob("*"))  # nothing written


@pytest.mark.parametrize(
    "field,value",
    [
        ("score", float("inf")),
        ("score", None),
        ("score", True),
        ("success_rate", 1.5),
        ("latency_ms.p50", float("nan")),
        ("latency_ms.p95", "12"),
        ("latency_ms.p50", -1.0),
        ("iterations.mean", float("nan")),
        ("nfe.mean", float("inf")),
        ("n_episodes", "2"),
        ("n_episodes", 2.5),
        ("n_episodes", float("nan")),
        ("unconverged_inferences", -1),
        ("latencies_ms.1", float("nan")),
        ("episodes.0.max_reward", float("nan")),
        ("episodes.1.max_reward", "0.5"),
        ("episodes.0.seed", "100000"),
        ("max_abs_dev", float("nan")),
        ("seeds", "100000"),
        ("approximate", "no"),
        ("schema_version", 99),
    ],
)
def test_every_numeric_field_is_checked_and_named(tmp_path, field, value):
    from policy_accel.errors import ResultsError
    from policy_accel.experiment.results import load_results

    broken = _sweep(tmp_path / "runs", _set(_results("ddim1", "sequential", 0.9, 1.0), field, value))
    with pytest.raises(ResultsError) as err:
        load_results([tmp_path / "runs"])
    message = str(err.value)
    assert str(broken) in message and field in message, message


def test_a_missing_field_is_named(tmp_path):
    from policy_accel.errors import ResultsError
    from policy_accel.experiment.results import load_results

    results = _results("ddim1", "sequential", 0.9, 1.0)
    del results["latency_ms"]
    broken = _sweep(tmp_path / "runs", results)
    with pytest.raises(ResultsError, match=rf"{broken}: latency_ms: missing"):
        load_results([tmp_path / "runs"])


def test_every_committed_report_loads_with_the_schema():
    """Committed results.json predate schema_version: they are version 1 and must still load."""
    from policy_accel.experiment.results import load_results

    dirs = sorted({p.parent.parent for p in (ROOT / "reports").glob("*/runs/*/results.json")})
    assert dirs
    for d in dirs:
        rows = load_results([d])
        assert rows and all(math.isfinite(r["score"]) and math.isfinite(r["latency_p50_ms"]) for r in rows)


@pytest.mark.parametrize("budgets", [["nan"], ["-5"], ["nan", "-5"], ["0"], ["inf"]])
def test_front_refuses_budgets_that_are_not_positive_finite(tmp_path, budgets):
    _sweep(tmp_path / "runs", _results("ddim1", "sequential", 0.9, 1.0))
    line = one_error_line(_run("front.py", str(tmp_path / "runs"), "--out", str(tmp_path / "f"), "--budgets",
                                *budgets))  # fmt: skip
    assert "--budgets" in line and budgets[0] in line, line


@pytest.mark.parametrize("script", ["front.py", "report.py"])
def test_an_unwritable_out_is_one_error(tmp_path, script):
    _sweep(tmp_path / "runs", _results("ddim1", "sequential", 0.9, 1.0))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = one_error_line(_run(script, str(tmp_path / "runs"), "--out", str(blocker / "out" / "front")))
    assert "--out" in line and "cannot be written" in line and str(blocker) in line, line


def test_benchmark_refuses_an_unwritable_out_dir_before_any_job(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run = _run("benchmark.py", f"out_dir={blocker / 'bench'}", "only=[seq_ddim_4]", "n_episodes=1")
    line = one_error_line(run)
    assert f"out_dir='{blocker / 'bench'}' cannot be written" in line, line
    assert "report written" not in run.stdout + run.stderr
