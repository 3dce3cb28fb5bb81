"""Shared fixtures: a small random denoiser, the committed PushT checkpoint, and the rollout command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from policy_accel.io.checkpoint import load_policy
from policy_accel.model.unet import ConditionalUnet1D, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
PUSHT_CHECKPOINT = ROOT / "checkpoints" / "pusht"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(1)  # deterministic and no oversubscription next to other jobs


@pytest.fixture(autouse=True, scope="session")
def _engine_cache(tmp_path_factory):
    """Compiled networks go to a fresh cache for the session (and the commands it runs), not the user's."""
    os.environ["POLICY_ACCEL_CACHE"] = str(tmp_path_factory.mktemp("engine_cache"))


@pytest.fixture(scope="session")
def random_net() -> ConditionalUnet1D:
    """A small untrained U-Net: exactness must not depend on a well-behaved trained network."""
    torch.manual_seed(0)
    return ConditionalUnet1D(UNetConfig(down_dims=[32, 64, 128], diffusion_step_embed_dim=64)).eval()


@pytest.fixture(scope="session")
def trained_policy():
    return load_policy(PUSHT_CHECKPOINT)


@pytest.fixture(scope="session")
def run_rollout():
    """``run_rollout(*overrides)``: ``eval/rollout.py`` as a user runs it (one torch thread), output captured."""

    def run(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "eval" / "rollout.py"), "threads=1", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run
