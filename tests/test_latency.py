"""eval/latency.py: the cost-model report is written with every field, on a tiny CPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_latency_report_has_the_cost_model_fields(tmp_path):
    drop = ["paradigms", "parataa", "newton_broyden", "newton_exact", "newton_chord_warm", "newton_exact_warm"]
    cmd = [
        sys.executable,
        "eval/latency.py",
        f"out_dir={tmp_path}",
        "batches=[1,4]",
        "repeats=2",
        "n_episodes=1",
        "n_inferences=3",
        "ddim_steps=[2]",
        *[f"samplers.{name}=null" for name in drop],
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "latency.json").read_text())
    assert "CPU" in report["hardware"] and set(report["network_ms"]) == {"1", "4"}
    assert set(report["samplers"]) == {"seq_ddpm100", "newton_broyden_warm", "seq_ddim2"}
    for name, row in report["samplers"].items():
        assert row["latency_ms_p50"] > 0 and 0.0 <= row["overhead_frac"] <= 1.0, name
        assert row["network_ms_p50"] <= row["profiled_latency_ms_p50"]
    assert report["samplers"]["seq_ddpm100"]["iterations_mean"] == 100
    assert report["samplers"]["newton_broyden_warm"]["n"] == 2  # warm rows only: the first inference is cold
    assert "| seq_ddim2 |" in (tmp_path / "latency.md").read_text()
