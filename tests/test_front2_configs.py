"""Every configuration of the second-round front sweep (configs/benchmark.yaml ``front2``) composes, builds, and is
classified as the front expects (sequential families exact and sequential; RTI-DP / Falcon approximate)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from policy_accel.experiment.build import build_session
from policy_accel.experiment.configurations import compose_configuration

ROOT = Path(__file__).resolve().parents[1]
FRONT2 = yaml.safe_load((ROOT / "configs" / "benchmark.yaml").read_text())["front2"]


@pytest.fixture(scope="module")
def setups():
    yield lambda name: build_session(compose_configuration(name, ["n_episodes=1"]))


def test_front2_covers_every_family_at_one_to_sixteen_steps():
    for family in ("seq_ddim_", "seq_ddimtr_", "seq_dpmpp2m_", "seq_unipc_"):
        steps = {int(n[len(family) :]) for n in FRONT2 if n.startswith(family) and n[len(family) :].isdigit()}
        assert steps == {1, 2, 3, 4, 5, 6, 8, 10, 12, 16}, family
    assert any(n.startswith("rti_") for n in FRONT2) and any(n.startswith("falcon_") for n in FRONT2)


@pytest.mark.parametrize("name", FRONT2)
def test_front2_configuration_builds(setups, name):
    setup = setups(name)
    session, schedule = setup.session, setup.schedule
    if name.startswith("seq_"):
        assert setup.solver.name == "sequential" and not session.approximate and setup.warm_start is False
        family, steps = re.fullmatch(
            r"seq_(ddimtr_|ddim_|dpmpp2m_|unipc_|ddpm)(\d+)(?:_thresh15|_coupled)?", name
        ).groups()
        assert schedule.num_steps == int(steps)
        kind = {"ddimtr_": "ddim", "ddim_": "ddim", "dpmpp2m_": "dpmpp2m", "unipc_": "unipc", "ddpm": "ddpm"}[family]
        assert schedule.config.kind == kind, (name, schedule.config.kind)
        assert ("ddimtr" in name) == (schedule.config.spacing == "trailing")
        assert ("thresh15" in name) == schedule.config.thresholding
    if name.startswith(("rti_", "falcon_", "renoise_")):
        assert session.approximate
    if name.startswith("rti_"):
        assert session.warm.key == "rti" and session.warm.steps == int(name.split("_k")[-1])
    if name.startswith("falcon_"):
        assert session.warm.key == "falcon" and session.warm.config.threshold == float("0." + name.split("_e")[1][:2])
