"""policy_accel: exact parallel and warm-started sampling for pretrained Diffusion Policies."""

from policy_accel.checkpoint import CheckpointError, load_policy, save_policy
from policy_accel.policy import DiffusionPolicy, PolicyConfig
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Budget, Noise, SolveResult

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
