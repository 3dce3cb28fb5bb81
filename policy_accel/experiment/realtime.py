"""The real-time loop's configuration: its options checked once, and the controller built from them.

Shared by ``eval/realtime.py`` and ``eval/realtime_soak.py`` (scripts never import each other); the setup itself
comes from :func:`policy_accel.experiment.build.build_session`, exactly as the offline rollout builds it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig

from policy_accel.control import FALLBACKS, Clock, InferenceInfo, RealTimeController
from policy_accel.experiment.build import SessionSetup, build_session, cfg_choice, cfg_float, cfg_int
from policy_accel.observations import Observation

# How a task holds position: PushT's action is the agent's target, so "hold" targets where the agent is (the last two
# entries of the low-dim observation; the image task's ``agent_pos`` key).
HOLD_ACTIONS: dict[str, Callable[[Observation], np.ndarray]] = {
    "pusht": lambda obs: np.asarray(obs[-2:]),
    "pusht_image": lambda obs: np.asarray(obs["agent_pos"]),
}


MAX_RATE_HZ = 1000.0  # above this a tick is shorter than the OS's sleep granularity


def check_loop_options(cfg: DictConfig) -> None:
    """The real-time options, each with one line naming the key, the value and what is allowed."""
    cfg_float(cfg, "rate_hz", minimum=0, strict=True, maximum=MAX_RATE_HZ)
    cfg_float(cfg, "obs_delay_ms", minimum=0)
    cfg_float(cfg, "act_delay_ms", minimum=0)
    cfg_choice(cfg, "fallback", FALLBACKS)
    cfg_int(cfg, "chunk_steps", minimum=1, optional=True)
    cfg_float(cfg, "lead_ms", minimum=0, optional=True)
    cfg_float(cfg, "latency_safety", minimum=0, strict=True)
    cfg_float(cfg, "deadline_margin_ms", minimum=0)
    cfg_int(cfg, "max_steps", minimum=1, optional=True)
    cfg_float(cfg, "switch_interval_ms", minimum=0, strict=True, optional=True)


def build_realtime_session(cfg: DictConfig) -> SessionSetup:
    """The policy, solver, schedule and session exactly as eval/rollout.py builds them from the same config (one
    library function: ``checkpoint``, ``trust_pickle``, ``tail_fill``, ``renoise_steps``, budgets and all)."""
    check_loop_options(cfg)
    return build_session(cfg)


def build_controller(
    cfg: DictConfig,
    planner: Callable,
    n_obs_steps: int,
    clock: Clock,
    on_inference: Callable[[InferenceInfo], None] | None = None,
) -> RealTimeController:
    """A controller configured from ``realtime.yaml`` (delays, fallback, lead, deadline margin)."""
    return RealTimeController(
        planner,
        1.0 / cfg.rate_hz,
        n_obs_steps,
        clock=clock,
        fallback=cfg.fallback,
        hold_action=HOLD_ACTIONS.get(cfg.task.name),
        act_latency_s=cfg.act_delay_ms / 1e3,
        chunk_steps=cfg.chunk_steps,
        lead_s=None if cfg.lead_ms is None else cfg.lead_ms / 1e3,
        latency_safety=cfg.latency_safety,
        deadline_margin_s=cfg.deadline_margin_ms / 1e3,
        on_inference=on_inference,
        # every observation is checked against the task's size; an image task's dicts against the episode's first
        # (and in full by the policy's condition)
        obs_dim=cfg.task.get("obs_dim"),
    )
