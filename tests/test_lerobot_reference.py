"""Our LeRobot reader against files and outputs made by LeRobot 0.6.1's own code (not by us): a state +
environment-state policy, and one with a camera (encoder features, epsilon and executed actions on fixed images).

Optional: LeRobot 0.6 needs Python >= 3.12 and torch < 2.12, so it lives in its own environment, never the project's.
Either point ``LEROBOT_PYTHON`` at that environment's python (the test runs ``scripts/lerobot_reference.py`` with it)
or ``LEROBOT_REFERENCE`` at a directory that script already wrote:

    LEROBOT_PYTHON=/tmp/lerobot312/bin/python .venv/bin/python -m pytest -q tests/test_lerobot_reference.py

Without either the test is skipped.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from policy_accel.io.checkpoint import load_policy
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "observation.images.top"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    if os.environ.get("LEROBOT_REFERENCE"):
        return Path(os.environ["LEROBOT_REFERENCE"])
    python = os.environ.get("LEROBOT_PYTHON")
    if not python:
        pytest.skip("set LEROBOT_PYTHON (a Python 3.12 env with lerobot==0.6.1) or LEROBOT_REFERENCE")
    out = tmp_path_factory.mktemp("lerobot")
    run = subprocess.run(
        [python, str(ROOT / "scripts" / "lerobot_reference.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_load_policy_reproduces_lerobots_normalization_denoiser_and_unnormalization(reference):
    ref = load_file(str(reference / "reference.safetensors"))
    policy = load_policy(reference / "policy")
    assert (policy.config.obs_dim, policy.config.action_dim, policy.config.horizon) == (18, 2, 16)
    assert policy.config.schedule.kind == "ddim" and policy.config.schedule.num_inference_steps == 10

    # our observation is [environment_state, state] per step; LeRobot's processor normalizes each feature
    raw = torch.cat([ref["raw_env"], ref["raw_state"]], dim=-1)
    normalized = policy.obs_normalizer.normalize(raw)
    torch.testing.assert_close(
        normalized, torch.cat([ref["norm_env"], ref["norm_state"]], dim=-1), rtol=1e-5, atol=1e-5
    )

    cond = policy.condition(raw.numpy())
    eps = policy.denoiser(ref["sample"], ref["timestep"], cond)
    torch.testing.assert_close(eps, ref["eps"], rtol=1e-4, atol=1e-5)

    raw_action = policy.action_normalizer.unnormalize(ref["norm_action"])
    torch.testing.assert_close(raw_action, ref["raw_action"], rtol=1e-5, atol=1e-3)


def test_load_policy_reproduces_lerobots_camera_encoder_denoiser_and_actions(reference):
    ref = load_file(str(reference / "image_reference.safetensors"))
    policy = load_policy(reference / "image_policy")
    encoder = policy.config.encoder
    assert encoder.kind == "lerobot" and encoder.width == 64 and encoder.norm == "group" and not encoder.shared
    assert encoder.camera_names == (IMAGE,) and encoder.low_dim == (("observation.state", 2),)

    images = policy.image_normalizer({IMAGE: ref["raw_image"]})[IMAGE]
    torch.testing.assert_close(images, ref["norm_image"], rtol=1e-5, atol=1e-5)
    obs = {IMAGE: ref["raw_image"].numpy(), "observation.state": ref["raw_state"].numpy()}
    cond = policy.condition(obs)  # [state, camera features] per step, steps flattened
    torch.testing.assert_close(cond, ref["global_cond"], rtol=1e-5, atol=1e-5)

    eps = policy.denoiser(ref["sample"], ref["timestep"], ref["global_cond"])
    torch.testing.assert_close(eps, ref["eps"], rtol=1e-5, atol=1e-5)

    # LeRobot's predict_action_chunk (what select_action queues) on a fixed initial noise; DDIM adds no other noise
    schedule = policy.schedule()
    noise = Noise(ref["noise"], torch.zeros(schedule.num_steps, *ref["noise"].shape))
    with torch.inference_mode():
        result = make_solver("sequential").solve(policy.denoiser, schedule, noise, cond)
    start = policy.config.n_obs_steps - 1
    executed = result.sample[:, start : start + policy.config.n_action_steps]
    torch.testing.assert_close(executed, ref["norm_action"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(policy.actions(result.sample)), ref["raw_action"], rtol=1e-5, atol=1e-3)
