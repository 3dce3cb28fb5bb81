"""The sequential loop of a multistep schedule (DPM-Solver++ 2M, UniPC; tables in :mod:`policy_accel.multistep`)."""

from __future__ import annotations

import torch

from policy_accel.multistep import MultistepTables
from policy_accel.schedule import Schedule
from policy_accel.solvers.base import Denoiser, Noise, SolveClock, SolveResult, cold_trajectory


def solve_multistep(
    denoiser: Denoiser,
    schedule: Schedule,
    noise: Noise,
    global_cond: torch.Tensor,
    clock: SolveClock,
) -> SolveResult:
    """Sequential sampling of a multistep schedule: one network call per step, ``schedule.num_steps`` rounds.

    Deterministic (an ODE solver): only ``noise.x_T`` is used. A budget stop returns the last clean prediction, like
    the sequential solver's anytime estimate.
    """
    tables: MultistepTables = schedule.multistep
    T, B = schedule.num_steps, noise.x_T.shape[0]
    traj = cold_trajectory(noise, T)
    y = noise.x_T
    indices = torch.arange(T, device=y.device).view(T, 1).expand(T, B)
    timesteps = schedule.timesteps[indices]
    c_prev = m_prev = m_prev2 = None
    stop = "converged"
    for j in range(T):
        eps = denoiser(y, timesteps[j], global_cond)
        m = schedule.predict_x0(y, eps, indices[j])
        c = y
        if tables.use_corrector[j]:
            c = tables.corr_c[j] * c_prev + tables.corr_m0[j] * m + tables.corr_m1[j] * m_prev
            if tables.corr_m2[j] != 0.0:
                c = c + tables.corr_m2[j] * m_prev2
        y_next = tables.pred_c[j] * c + tables.pred_m0[j] * m
        if tables.pred_m1[j] != 0.0:
            y_next = y_next + tables.pred_m1[j] * m_prev
        traj[j + 1] = y_next
        reason = clock.exhausted(j + 1) if j + 1 < T else None
        if reason is not None:
            traj[j + 2 :] = m.unsqueeze(0)
            stop = reason
            break
        y, c_prev, m_prev2, m_prev = y_next, c, m_prev, m
    return SolveResult(
        sample=traj[-1],
        trajectory=traj,
        iterations=j + 1,
        nfe=(j + 1) * B,
        converged=stop == "converged",
        residual=0.0 if stop == "converged" else float("inf"),
        wall_time_s=clock.elapsed(),
        stop_reason=stop,
    )
