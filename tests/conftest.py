"""Shared fixtures: a small random denoiser and the committed PushT checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from policy_accel.checkpoint import load_policy
from policy_accel.unet import ConditionalUnet1D, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
PUSHT_CHECKPOINT = ROOT / "checkpoints" / "pusht"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(1)  # deterministic and no oversubscription next to other jobs


@pytest.fixture(scope="session")
def random_net() -> ConditionalUnet1D:
    """A small untrained U-Net: exactness must not depend on a well-behaved trained network."""
    torch.manual_seed(0)
    return ConditionalUnet1D(UNetConfig(down_dims=[32, 64, 128], diffusion_step_embed_dim=64)).eval()


@pytest.fixture(scope="session")
def trained_policy():
    return load_policy(PUSHT_CHECKPOINT)
