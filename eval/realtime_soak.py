"""Soak benchmark of the real-time controller: 10,000 control ticks on one continuous wall clock.

    python eval/realtime_soak.py solver=paradigms warm_start=true            # the real policy at 10 Hz
    python eval/realtime_soak.py soak.steps=2000 soak.fake_latency_ms=250     # the controller alone

Why: a controller meant to run for hours must not leak (RSS sampled from /proc/self/statm every
``soak.memory_every`` ticks) and its period must not drift (ticks are scheduled on absolute times
``t0 + k / rate_hz``, never "sleep one period", so lateness cannot accumulate; measured here).
PushT episodes run back to back on the same tick grid: at an episode's end the controller is reset
without blocking and holds position until the new episode's first chunk is ready (those ticks are
counted as ``episode_start_holds``, not as misses). Same config as eval/realtime.py (configs/realtime.yaml).
Writes JSON to ``soak.out`` (reports/realtime/ by default).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from policy_accel.control import MonotonicClock, PlannedChunk
from policy_accel.errors import report_user_errors
from policy_accel.experiment.outputs import write_json_atomic
from policy_accel.experiment.realtime import build_controller, build_realtime_session
from policy_accel.experiment.tasks import env_factory

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("realtime_soak")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size from /proc/self/statm (no psutil)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class SleepPlanner:
    """A stand-in policy: sleeps ``latency_s`` and returns the agent's own position (soaks the controller alone)."""

    def __init__(self, latency_s: float, n_actions: int = 8):
        self.latency_s, self.n_actions = latency_s, n_actions

    def __call__(self, obs_history: np.ndarray, time_budget_s: float | None) -> PlannedChunk:
        time.sleep(self.latency_s if time_budget_s is None else min(self.latency_s, time_budget_s))
        return PlannedChunk(np.repeat(obs_history[-1, -2:][None], self.n_actions, axis=0), reserve=None)


def soak(cfg: DictConfig) -> dict:
    steps, every = int(cfg.soak.steps), int(cfg.soak.memory_every)
    dt = 1.0 / cfg.rate_hz
    clock = MonotonicClock()
    if cfg.switch_interval_ms is not None:
        sys.setswitchinterval(cfg.switch_interval_ms / 1e3)
    if cfg.soak.fake_latency_ms is not None:
        planner, n_obs, what = SleepPlanner(cfg.soak.fake_latency_ms / 1e3), 2, "sleep planner"
    else:
        from policy_accel.control import SessionPlanner

        session = build_realtime_session(cfg).session
        planner, n_obs = SessionPlanner(session), session.policy.config.n_obs_steps
        what = f"{cfg.policy.name} {cfg.solver.name} warm={cfg.warm_start}"
    # preallocated: the benchmark itself must not grow while it measures growth
    wake = np.zeros(steps)
    source = np.zeros(steps, dtype=np.int8)  # 0 chunk, 1 fallback within an episode, 2 hold before first chunk
    latency = np.full(steps, np.nan)
    converged = np.zeros(steps, dtype=bool)
    n_inf = 0
    rss = np.zeros((steps - 1) // every + 2)  # every `every` ticks, and once after the last
    rss_tick = np.zeros_like(rss, dtype=np.int64)
    rewards: list[float] = []

    def on_inference(info) -> None:
        nonlocal n_inf
        if info.needed_at is not None and n_inf < steps:
            latency[n_inf], converged[n_inf] = info.latency_s, info.converged
            n_inf += 1

    make_env = env_factory(cfg.task.name)
    env = make_env()
    seed = cfg.start_seed
    ctrl = build_controller(cfg, planner, n_obs, clock, on_inference)
    log.info("soak: %d ticks at %s Hz with %s", steps, cfg.rate_hz, what)
    with ctrl:
        obs, _ = env.reset(seed=seed)
        t0 = ctrl.start_episode(obs, seed=seed)
        episode_reward, chunk_seen, pending = 0.0, False, None
        for k in range(steps):
            t_k = t0 + k * dt
            if pending is not None:  # the observation of t_k (no injected delays in the soak)
                clock.sleep_until(t_k)
                ctrl.observe(pending, t_k)
            clock.sleep_until(t_k)
            wake[k] = clock.now()
            a = ctrl.act(t_k)
            chunk_seen |= not a.missed
            source[k] = 0 if not a.missed else (1 if chunk_seen else 2)
            obs, reward, terminated, truncated, _ = env.step(a.action)
            episode_reward = max(episode_reward, float(reward))
            pending = obs
            if terminated or truncated:
                rewards.append(episode_reward)
                seed += 1
                obs, _ = env.reset(seed=seed)
                ctrl.reset(seed)  # non-blocking: the tick grid goes on
                episode_reward, chunk_seen, pending = 0.0, False, obs
            if k % every == 0:
                rss[k // every], rss_tick[k // every] = rss_bytes(), k
            if k % 1000 == 0:
                log.info("tick %d: rss %.1f MB, late %.2f ms", k, rss_bytes() / 2**20, (wake[k] - t_k) * 1e3)
        rss[-1], rss_tick[-1] = rss_bytes(), steps
    env.close()
    return summarize(cfg, what, dt, t0, wake, source, latency[:n_inf], converged[:n_inf], rss, rss_tick, rewards)


def summarize(cfg, what, dt, t0, wake, source, latency, converged, rss, rss_tick, rewards) -> dict:
    """Memory growth and period drift in the figures the note quotes."""
    steps = len(wake)
    ticks = np.arange(steps)
    late = wake - (t0 + ticks * dt)
    periods = np.diff(wake)
    window = min(1000, steps // 2)
    mb = rss / 2**20
    warm = rss_tick >= min(1000, steps // 10)  # after start-up allocations
    slope = float(np.polyfit(rss_tick[warm], mb[warm], 1)[0] * 1000) if warm.sum() > 2 else None

    def pct(x, scale=1e3):
        x = np.asarray(x) * scale
        return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max())}

    return {
        "what": what,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "steps": steps,
        "rate_hz": cfg.rate_hz,
        "wall_s": float(wake[-1] - wake[0]),
        "period_drift_ms": float(((wake[-1] - wake[0]) - (steps - 1) * dt) * 1e3),  # total, over the whole run
        "mean_period_ms": {
            "all": float(periods.mean() * 1e3),
            f"first_{window}": float(periods[:window].mean() * 1e3),
            f"last_{window}": float(periods[-window:].mean() * 1e3),
        },
        "lateness_ms": pct(late),
        "lateness_first_last_ms": [float(late[:window].mean() * 1e3), float(late[-window:].mean() * 1e3)],
        "lateness_slope_ms_per_1000_ticks": float(np.polyfit(ticks, late * 1e3, 1)[0] * 1000),
        "period_jitter_ms": pct(np.abs(periods - dt)),
        "rss_mb": {
            "first": float(mb[0]),
            "after_warmup": float(mb[warm][0]) if warm.any() else None,
            "last": float(mb[-1]),
            "max": float(mb.max()),
            "slope_mb_per_1000_ticks": slope,
            "samples": [[int(t), round(float(m), 2)] for t, m in zip(rss_tick, mb, strict=True)],
        },
        "fallback_ticks": int((source == 1).sum()),
        "episode_start_holds": int((source == 2).sum()),
        "overrun_ticks": int((late > dt / 2).sum()),
        "inferences": int(len(latency)),
        "unconverged_inferences": int((~converged).sum()),
        "inference_ms": pct(latency) if len(latency) else None,
        "episodes_completed": len(rewards),
        "score_completed_episodes": float(np.mean(rewards)) if rewards else None,
    }


@report_user_errors
def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("realtime", overrides=sys.argv[1:])
    cfg.out_dir = str(Path(cfg.soak.out).parent)  # no Hydra run directory here
    results = soak(cfg)
    out = Path(cfg.soak.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    r = results
    print(
        f"{r['steps']} ticks in {r['wall_s']:.1f} s: drift {r['period_drift_ms']:+.2f} ms, mean period "
        f"{r['mean_period_ms']}, lateness p50/p99/max {r['lateness_ms']}, jitter {r['period_jitter_ms']}, "
        f"RSS {r['rss_mb']['after_warmup']:.1f} -> {r['rss_mb']['last']:.1f} MB "
        f"(slope {r['rss_mb']['slope_mb_per_1000_ticks']} MB/1000 ticks), fallback ticks {r['fallback_ticks']}, "
        f"episode-start holds {r['episode_start_holds']}, unconverged {r['unconverged_inferences']}/{r['inferences']}"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
