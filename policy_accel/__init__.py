"""policy_accel: exact parallel and warm-started sampling for pretrained Diffusion Policies."""

import os

# oneDNN (PyTorch's CPU convolutions) caches 1024 compiled kernels by default: ~31 batch sizes of the U-Net's 33
# convolutions. Parallel solvers call the network at up to ~150 batch sizes (shrinking windows), so with the
# default every call recompiles its kernels: 23.1 vs 14.6 ms per call over batch sizes 1..100 on the 2-core CPU,
# +64 MB (reports/latency/cpu_checkpoint_kernel_cache/). oneDNN reads this once, when it builds its first kernel:
# importing policy_accel before any convolution runs is enough. A value the user set wins.
PRIMITIVE_CACHE_CAPACITY = "8192"
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", PRIMITIVE_CACHE_CAPACITY)

from policy_accel.io.checkpoint import CheckpointError, load_policy, save_policy  # noqa: E402
from policy_accel.policy import DiffusionPolicy, PolicyConfig  # noqa: E402
from policy_accel.schedule import Schedule, ScheduleConfig  # noqa: E402
from policy_accel.solvers import make_solver  # noqa: E402
from policy_accel.solvers.base import Budget, Noise, SolveResult  # noqa: E402

__all__ = [
    "Budget",
    "CheckpointError",
    "DiffusionPolicy",
    "Noise",
    "PolicyConfig",
    "Schedule",
    "ScheduleConfig",
    "SolveResult",
    "load_policy",
    "make_solver",
    "save_policy",
]
