"""eval/latency.py: the cost-model report is written with every field, on a tiny CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_errors import one_error_line

ROOT = Path(__file__).resolve().parents[1]


def test_latency_report_has_the_cost_model_fields_per_engine(tmp_path):
    cmd = [
        sys.executable,
        "eval/latency.py",
        f"out_dir={tmp_path}",
        "batches=[1,4]",
        "repeats=2",
        "n_episodes=1",
        "n_inferences=3",
        "engines=[torch,openvino]",
        "configurations=[seq_ddpm100,newton_broyden_warm,seq_ddim_2]",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "latency.json").read_text())
    assert "CPU" in report["hardware"] and report["baseline"] == "torch"
    assert set(report["engines"]) == {"torch", "openvino"}
    assert report["flops_per_row"] > 1e6 and set(report["gemm_gflops"]) == {"torch", "openvino"}
    for engine, table in report["engines"].items():
        assert table["engine"]["name"] == engine and set(table["network_ms"]) == {"1", "4"}
        assert table["max_abs_dev_vs_eager"] <= 1e-5 and table["gflops"]["1"] > 0
        assert set(table["samplers"]) == {"seq_ddpm100", "newton_broyden_warm", "seq_ddim_2"}
        for name, row in table["samplers"].items():
            assert row["latency_ms_p50"] > 0 and 0.0 <= row["overhead_frac"] <= 1.0, name
            assert row["network_ms_p50"] <= row["profiled_latency_ms_p50"]
        assert table["samplers"]["seq_ddpm100"]["iterations_mean"] == 100
        assert table["samplers"]["newton_broyden_warm"]["n"] == 2  # warm rows only: the first inference is cold
        # sequential DDPM-100 makes 100 batch-1 calls: its cost-model time is 100 measured batch-1 calls
        seq = table["samplers"]["seq_ddpm100"]
        assert seq["cost_model_ms_p50"] == pytest.approx(100 * table["network_ms"]["1"])
    assert report["engines"]["torch"]["max_abs_dev_vs_eager"] == 0.0
    md = (tmp_path / "latency.md").read_text()
    assert "| openvino | seq_ddim_2 |" in md and "| torch | seq_ddim_2 |" in md
    # each row records the named configuration it ran, as configs/experiment/ defines it
    warm = report["engines"]["openvino"]["samplers"]["newton_broyden_warm"]["spec"]
    assert warm["experiment"] == "newton_broyden_warm" and warm["solver"] == "newton" and warm["warm_start"] is True
    assert warm["options"]["jacobian"] == "broyden" and warm["noise"] == "coupled"
    assert report["engines"]["torch"]["samplers"]["seq_ddim_2"]["spec"]["schedule"] == {
        "kind": "ddim",
        "num_inference_steps": 2,
    }


def _refused_before_timing(script: str, tmp_path: Path, override: str, match: str, report: str) -> None:
    """A timing tool given ``override`` ends in one error line naming it, before it writes its report."""
    cmd = [sys.executable, f"eval/{script}", f"out_dir={tmp_path}", override]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert match in one_error_line(run)
    assert not (tmp_path / report).exists()


@pytest.mark.parametrize(
    "override,match",
    [
        ("repeats=0", "repeats=0 is not allowed"),
        ("threads=0", "threads=0 is not allowed"),
        ("n_inferences=0", "n_inferences=0 is not allowed"),
        ("device=bogus", "device='bogus' is not allowed"),
        ("engines=[torch,torch]", "distinct engine names"),
        ("engines=[tensorrt]", "engine='tensorrt' is not allowed"),
        ("batches=[0]", "batches=[0] is not allowed"),
    ],
)
def test_bad_options_fail_in_one_line_before_anything_is_timed(tmp_path, override, match):
    _refused_before_timing("latency.py", tmp_path, override, match, "latency.json")


def test_unknown_configuration_fails_before_anything_is_timed(tmp_path):
    cmd = [sys.executable, "eval/latency.py", f"out_dir={tmp_path}", "configurations=[seq_ddim_10,seq_ddim_missing]"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "unknown configuration 'seq_ddim_missing'" in run.stderr
    assert not (tmp_path / "latency.json").exists()


def test_cost_model_prices_calls_at_the_measured_fixed_batch_times():
    sys.path.insert(0, str(ROOT / "eval"))
    from latency import cost_model_ms

    table = {"1": 2.0, "4": 5.0, "100": 20.0}
    assert cost_model_ms(table, [1, 1, 4]) == pytest.approx(9.0)
    assert cost_model_ms(table, [2]) == pytest.approx(3.0)  # linear between measured sizes
    assert cost_model_ms(table, [200]) == pytest.approx(40.0)  # beyond the table: proportional to the largest


def _cache_capacity_after_import(env: dict[str, str]) -> str:
    code = "import os, policy_accel; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return run.stdout.strip()


def test_import_enlarges_the_onednn_kernel_cache_unless_the_user_set_it():
    from policy_accel import PRIMITIVE_CACHE_CAPACITY

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert _cache_capacity_after_import(env) == PRIMITIVE_CACHE_CAPACITY
    assert int(PRIMITIVE_CACHE_CAPACITY) > 1024  # oneDNN's default, which the solvers' batch sizes thrash
    assert _cache_capacity_after_import({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}) == "64"


@pytest.mark.parametrize(
    "override,match",
    [
        ("threads=0", "threads=0 is not allowed"),
        ("+solvers.paradigms.options.window=0", "solvers.paradigms: window=0 is not allowed"),
        ("solvers.sequential.solver=bogus", "solvers.sequential: unknown solver 'bogus'"),
        ("schedules.ddim10.num_inference_steps=0", "schedules.ddim10="),
        ("engine=tensorrt", "engine='tensorrt' is not allowed"),
    ],
)
def test_overhead_checks_every_row_before_timing_any(tmp_path, override, match):
    _refused_before_timing("overhead.py", tmp_path, override, match, "overhead.json")
