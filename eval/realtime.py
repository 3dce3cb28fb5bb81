"""PushT against the wall clock: a fixed-rate control loop around :class:`RealTimeController`.

    python eval/realtime.py task=pusht solver=paradigms rate_hz=10
    python eval/realtime.py solver=paradigms warm_start=true obs_delay_ms=20 act_delay_ms=20 n_episodes=5

This is also the example integration: a robot loop sends one action per tick and feeds observations in
as they arrive; everything about inference (background worker, deadlines, stale actions, fallback) is the
controller's business. The simulated robot:

* tick k is at ``t_k = t0 + k / rate_hz``; its action is requested (``act(t_k)``) at ``t_k - act_delay``
  and drives the physics from ``t_k`` to ``t_{k+1}``;
* the observation of ``t_k`` reaches the controller (``observe(obs, t_k)``) at ``t_k + obs_delay``;
* an episode starts when its first chunk is ready (the robot waits at rest; ``start_episode``).

Reports deadline misses (ticks served by the fallback, and ticks the loop itself woke more than half a
period late), control-period jitter ``|period - 1/rate|``, end-to-end latency (observation taken ->
first action planned from it reaches the actuator), inference statistics and the score, next to the
offline rollout's score of the same configuration. Writes ``results.json`` and ``results.md``.

The output directory is held for the whole run (a concurrent run into it is refused). Every finished episode is
kept in ``episodes.partial.json``; after Ctrl-C (exit status 130) the same command resumes from them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from policy_accel.control import (
    Clock,
    ControlAction,
    ControllerStats,
    InferenceError,
    InferenceInfo,
    MonotonicClock,
    RealTimeController,
    SessionPlanner,
)
from policy_accel.errors import ConfigError, UserError, report_user_errors
from policy_accel.experiment.build import SessionSetup, run_id
from policy_accel.experiment.outputs import claim_out_dir, write_json_atomic, write_text_atomic
from policy_accel.experiment.realtime import build_controller, build_realtime_session
from policy_accel.experiment.results import options_cell
from policy_accel.experiment.results_schema import SCHEMA_VERSION
from policy_accel.experiment.tasks import env_factory

log = logging.getLogger("realtime")
PROGRESS_FILE = "episodes.partial.json"  # finished episodes of an unfinished run: the same command resumes from them
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C


@dataclass
class EpisodeLog:
    seed: int
    max_reward: float = 0.0
    success: bool = False
    steps: int = 0
    misses: int = 0
    miss_ticks: list[int] = field(default_factory=list)  # ticks served by the fallback
    startup_s: float = 0.0  # first inference, while the robot waits at rest
    wake_s: list[float] = field(default_factory=list)  # when each tick's send actually happened
    late_s: list[float] = field(default_factory=list)  # wake - scheduled send time
    e2e_s: list[float] = field(default_factory=list)  # obs taken -> first action of its chunk at the actuator
    age_s: list[float] = field(default_factory=list)  # obs taken -> each executed chunk action at the actuator
    chunk_actions: dict[int, int] = field(default_factory=dict)  # executed actions per chunk


def run_episode(
    make_env: Callable[[], object],
    ctrl: RealTimeController,
    clock: Clock,
    seed: int,
    dt: float,
    obs_delay_s: float = 0.0,
    act_delay_s: float = 0.0,
    max_steps: int | None = None,
) -> EpisodeLog:
    """One episode on the wall clock; the physics of tick k is computed when its action is sent, and its
    resulting observation is released to the controller only at ``t_{k+1} + obs_delay``."""
    env = make_env()
    ep = EpisodeLog(seed)
    obs, _ = env.reset(seed=seed)
    start = clock.now()
    t0 = ctrl.start_episode(obs, seed=seed)
    ep.startup_s = clock.now() - start
    pending: deque[tuple[int, np.ndarray]] = deque()  # (tick it was taken at, observation) not yet delivered
    seen: set[int] = set()
    k = 0
    while True:
        t_k = t0 + k * dt  # every time is computed from its tick index alike: equal times compare equal
        send_at = t_k - act_delay_s
        while pending and t0 + pending[0][0] * dt + obs_delay_s <= send_at:
            j, o = pending.popleft()
            clock.sleep_until(t0 + j * dt + obs_delay_s)
            ctrl.observe(o, t0 + j * dt)
        clock.sleep_until(send_at)
        wake = clock.now()
        a: ControlAction = ctrl.act(t_k)
        obs, reward, terminated, truncated, _ = env.step(a.action)
        pending.append((k + 1, obs))
        ep.wake_s.append(wake)
        ep.late_s.append(wake - send_at)
        ep.max_reward = max(ep.max_reward, float(reward))
        ep.success |= bool(terminated)
        if a.missed:
            ep.misses += 1
            ep.miss_ticks.append(k)
        else:
            ep.age_s.append(t_k - a.obs_time)
            ep.chunk_actions[a.chunk_id] = ep.chunk_actions.get(a.chunk_id, 0) + 1
            if a.chunk_id not in seen:
                seen.add(a.chunk_id)
                if len(seen) > 1:  # the episode's first chunk was planned while the robot waited
                    ep.e2e_s.append(t_k - a.obs_time)
        k += 1
        if terminated or truncated or (max_steps is not None and k >= max_steps):
            break
    ep.steps = k
    env.close()
    return ep


def _stats(values_s, scale: float = 1e3) -> dict:
    x = np.asarray(values_s, dtype=float) * scale
    if x.size == 0:
        return {"n": 0}
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "p50": float(np.percentile(x, 50)),
        "p99": float(np.percentile(x, 99)),
        "max": float(x.max()),
    }


def offline_score(cfg: DictConfig, setup: SessionSetup) -> dict | None:
    """The offline rollout's score for this configuration (policy, solver, noise, and the warm start with its
    ``renoise_steps`` and options) from a benchmark results.csv, if any. A results.csv from before those columns
    matches only configurations without them."""
    path = Path(cfg.offline_results) if cfg.offline_results else None
    if path is None or not path.exists():
        return None
    warm = setup.session.warm.record()
    want = {
        "policy": cfg.policy.name,
        "solver": cfg.solver.name,
        "warm_start": str(warm["warm_start"]),
        "noise": cfg.solver.noise,
        "renoise_steps": "" if warm["renoise_steps"] is None else str(warm["renoise_steps"]),
        "warm_options": options_cell(warm["warm_options"]),
    }
    with path.open() as f:
        for row in csv.DictReader(f):
            if all((row.get(key) or "") == value for key, value in want.items()):
                return {"source": str(path), "label": row["label"], "score": float(row["score"]),
                        "success_rate": float(row["success_rate"]), "n_episodes": int(row["n_episodes"])}  # fmt: skip
    return None


def summarize(
    cfg: DictConfig,
    setup: SessionSetup,
    episodes: list[EpisodeLog],
    inferences: list[InferenceInfo],
    ctrl,
    stats: ControllerStats | None = None,
) -> dict:
    """The numbers results.json reports (all times in ms); ``stats``: the controller's counters when a resumed run's
    differ from ``ctrl.stats`` (they include the kept episodes')."""
    dt = 1.0 / cfg.rate_hz
    periods = np.concatenate([np.diff(e.wake_s) for e in episodes]) if episodes else np.zeros(0)
    late = np.concatenate([e.late_s for e in episodes])
    bounded = [i for i in inferences if i.needed_at is not None]  # the first chunk of an episode is unbounded
    score = float(np.mean([e.max_reward for e in episodes]))
    offline = offline_score(cfg, setup)
    missed = int(sum(e.misses for e in episodes))
    overruns = int((late > dt / 2).sum())
    # a tick both served by the fallback and woken late is one missed tick, not two
    missed_union = sum(len(set(e.miss_ticks) | {k for k, x in enumerate(e.late_s) if x > dt / 2}) for e in episodes)
    out = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id(cfg),
        "task": cfg.task.name,
        "solver": cfg.solver.name,
        "policy": cfg.policy.name,
        "solver_options": OmegaConf.to_container(cfg.solver.options),
        **setup.session.warm.record(),  # warm_start, renoise_steps, warm_options, tail_fill
        "checkpoint": setup.checkpoint,
        "approximate": setup.session.approximate or any(not i.converged for i in bounded),
        "noise": cfg.solver.noise,
        "threads": cfg.threads,
        "engine": setup.policy.engine.to_dict(),
        "rate_hz": cfg.rate_hz,
        "obs_delay_ms": cfg.obs_delay_ms,
        "act_delay_ms": cfg.act_delay_ms,
        "fallback": cfg.fallback,
        "chunk_steps": cfg.chunk_steps,
        "lead_ms": cfg.lead_ms,
        "latency_safety": cfg.latency_safety,
        "deadline_margin_ms": cfg.deadline_margin_ms,
        "n_episodes": len(episodes),
        "seeds": [e.seed for e in episodes],
        "score": score,
        "success_rate": float(np.mean([e.success for e in episodes])),
        "offline": offline,
        "score_minus_offline": None if offline is None else score - offline["score"],
        "ticks": int(sum(e.steps for e in episodes)),
        "missed_ticks": missed_union,
        "fallback_ticks": missed,
        "overrun_ticks": overruns,
        "period_jitter_ms": _stats(np.abs(periods - dt)),
        "period_ms": _stats(periods),
        "wake_lateness_ms": _stats(late),
        "e2e_latency_ms": _stats([x for e in episodes for x in e.e2e_s]),
        "action_age_ms": _stats([x for e in episodes for x in e.age_s]),
        "inference_ms": _stats([i.latency_s for i in bounded]),
        # of which observation -> condition (an image policy's encoder)
        "condition_ms": _stats([i.info["condition_s"] for i in bounded if "condition_s" in i.info]),
        "obs_to_ready_ms": _stats([i.finished - i.obs_time for i in bounded]),
        "budget_ms": _stats([i.budget_s for i in bounded]),
        "startup_ms": _stats([e.startup_s for e in episodes]),
        "iterations": _stats([i.info.get("iterations", np.nan) for i in bounded], scale=1.0),
        "inferences": len(bounded),
        "unconverged_inferences": int(sum(not i.converged for i in bounded)),
        "late_chunks": int(sum(i.late for i in bounded)),
        "actions_per_chunk": float(np.mean([n for e in episodes for n in e.chunk_actions.values()])),
        "controller": asdict(ctrl.stats if stats is None else stats),
        "episodes": [
            {
                "seed": e.seed,
                "max_reward": e.max_reward,
                "success": e.success,
                "steps": e.steps,
                "misses": e.misses,
                "miss_ticks": e.miss_ticks,
            }
            for e in episodes
        ],
    }
    return out


def markdown(r: dict) -> str:
    """A one-row table of the headline figures."""
    off = r["offline"]
    off_txt = "–" if off is None else f"{off['score']:.3f} ({r['score_minus_offline']:+.3f})"
    j, e, i = r["period_jitter_ms"], r["e2e_latency_ms"], r["inference_ms"]
    return "\n".join(
        [
            "| task | solver | warm | rate | obs/act delay | episodes | ticks | missed ticks | fallback | overruns | "
            "jitter p50/p99 ms | e2e p50/p99 ms | inference p50/p99 ms | unconverged | score | offline (diff) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['task']} | {r['policy']} {r['solver']} | {r['warm_start']} | {r['rate_hz']} Hz | "
            f"{r['obs_delay_ms']}/{r['act_delay_ms']} ms | {r['n_episodes']} | {r['ticks']} | {r['missed_ticks']} | "
            f"{r['fallback_ticks']} | {r['overrun_ticks']} | {j['p50']:.2f}/{j['p99']:.2f} | "
            f"{e.get('p50', float('nan')):.0f}/{e.get('p99', float('nan')):.0f} | "
            f"{i.get('p50', float('nan')):.0f}/{i.get('p99', float('nan')):.0f} | "
            f"{r['unconverged_inferences']}/{r['inferences']} | {r['score']:.3f} | {off_txt} |",
            "",
        ]
    )


def check_not_another_run(out_dir: Path, this_run: str) -> None:
    """Refuse to overwrite the results.json of a run with other settings (its ``run_id`` differs)."""
    try:
        found = json.loads((out_dir / "results.json").read_text()).get("run_id", "(not recorded)")
    except (OSError, ValueError, AttributeError):
        return
    if found != this_run:
        raise ConfigError(
            f"{out_dir / 'results.json'} holds another run (run_id {found}, this run {this_run}), which this one "
            "would overwrite: pass another out_dir=..., or delete that results.json"
        )


def realtime(cfg: DictConfig, clock: Clock | None = None) -> dict:
    setup = build_realtime_session(cfg)
    this_run = run_id(cfg)
    # Held from before the directory is read until the last write (released on any exit): a concurrent run into
    # the same directory is refused at once instead of overwriting this one's results.
    with claim_out_dir(cfg.out_dir, this_run) as out_dir:
        check_not_another_run(out_dir, this_run)
        return run_claimed(cfg, setup, out_dir, this_run, clock)


@dataclass
class Progress:
    """Finished episodes of an interrupted run, with their inferences and the controller's counters."""

    episodes: list[EpisodeLog]
    inferences: list[InferenceInfo]
    stats: ControllerStats


def progress_to_dict(this_run: str, progress: Progress) -> dict:
    """``episodes.partial.json``: everything :func:`summarize` needs of the kept episodes, and whose they are."""
    return {
        "run_id": this_run,
        "episodes": [asdict(e) for e in progress.episodes],
        "inferences": [asdict(i) for i in progress.inferences],
        "controller": asdict(progress.stats),
    }


def load_progress(out_dir: Path, this_run: str, seeds: list[int]) -> Progress | None:
    """The finished episodes kept in ``out_dir`` by an interrupted run of this configuration, or None.

    Another run's episodes are an error: a resumed run must never mix two configurations' episodes.
    """
    path = out_dir / PROGRESS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read ({err}): delete it to start the run over") from None
    found = data.get("run_id", "(not recorded)") if isinstance(data, dict) else "(not recorded)"
    if found != this_run:
        raise ConfigError(
            f"{path} holds finished episodes of another run (run_id {found}, this run {this_run}): pass another "
            "out_dir=..., or delete that file"
        )
    try:
        episodes = [
            EpisodeLog(**{**e, "chunk_actions": {int(k): n for k, n in e["chunk_actions"].items()}})
            for e in data["episodes"]
        ]
        progress = Progress(
            episodes, [InferenceInfo(**i) for i in data["inferences"]], ControllerStats(**data["controller"])
        )
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ConfigError(f"{path} is not a progress file ({type(err).__name__}: {err}): delete it") from None
    done = [e.seed for e in episodes]
    if done != seeds[: len(done)]:
        raise ConfigError(f"{path} holds seeds {done}, not the first of this run's {seeds}: delete it")
    return progress


def add_stats(kept: ControllerStats, new: ControllerStats) -> ControllerStats:
    """The counters of the kept episodes' controller and of this process's (the latency maximum is a maximum)."""
    total = {f.name: getattr(kept, f.name) + getattr(new, f.name) for f in fields(ControllerStats)}
    total["max_latency_s"] = max(kept.max_latency_s, new.max_latency_s)
    return ControllerStats(**total)


def run_claimed(cfg: DictConfig, setup: SessionSetup, out_dir: Path, this_run: str, clock: Clock | None) -> dict:
    """The episodes and results of :func:`realtime`, in an output directory this process holds.

    Every finished episode is kept in ``PROGRESS_FILE``; Ctrl-C ends the run with status 130 and the same command
    resumes after the kept episodes (each episode starts from a reset controller reseeded with its seed).
    """
    session, seeds = setup.session, setup.seeds
    kept = load_progress(out_dir, this_run, seeds) or Progress([], [], ControllerStats())
    if kept.episodes:
        log.info("resuming: %d of %d episodes finished already (%s)", len(kept.episodes), len(seeds), PROGRESS_FILE)
    if cfg.switch_interval_ms is not None:
        sys.setswitchinterval(cfg.switch_interval_ms / 1e3)
    clock = clock or MonotonicClock()
    make_env = env_factory(cfg.task.name)
    dt = 1.0 / cfg.rate_hz
    inferences: list[InferenceInfo] = list(kept.inferences)
    episodes: list[EpisodeLog] = list(kept.episodes)
    log.info(
        "%s %s warm=%s at %s Hz, delays obs %s ms / act %s ms, fallback %s, %d episodes",
        cfg.policy.name,
        cfg.solver.name,
        cfg.warm_start,
        cfg.rate_hz,
        cfg.obs_delay_ms,
        cfg.act_delay_ms,
        cfg.fallback,
        len(seeds),
    )
    ctrl = build_controller(cfg, SessionPlanner(session), session.policy.config.n_obs_steps, clock, inferences.append)
    n_kept = len(episodes)
    try:
        with ctrl, _user_errors_from_worker():
            for seed in seeds[len(episodes) :]:
                ep = run_episode(
                    make_env, ctrl, clock, seed, dt, cfg.obs_delay_ms / 1e3, cfg.act_delay_ms / 1e3, cfg.max_steps
                )
                episodes.append(ep)  # its inferences are all merged: the next ones belong to the next episode
                progress = Progress(episodes, inferences, add_stats(kept.stats, ctrl.stats))
                write_json_atomic(out_dir / PROGRESS_FILE, progress_to_dict(this_run, progress))
                n_kept = len(episodes)
                worst = max(ep.late_s) * 1e3
                log.info(
                    "seed %d: max reward %.3f, %d steps, %d fallback ticks, worst wake %.1f ms late, running score "
                    "%.3f",
                    seed,
                    ep.max_reward,
                    ep.steps,
                    ep.misses,
                    worst,
                    np.mean([e.max_reward for e in episodes]),
                )
    except KeyboardInterrupt:
        where = f"kept in {out_dir / PROGRESS_FILE}" if n_kept else "kept (none had finished)"
        sys.stderr.write(
            f"interrupted: {n_kept} of {len(seeds)} finished episodes {where}; run the same command again to resume\n"
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    results = summarize(cfg, setup, episodes, inferences, ctrl, stats=add_stats(kept.stats, ctrl.stats))
    write_json_atomic(out_dir / "results.json", results)  # atomic: a killed run leaves no partial file
    table = markdown(results)
    write_text_atomic(out_dir / "results.md", table)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    print("\n" + table)
    print(f"results written to {out_dir / 'results.json'}")
    return results


@contextlib.contextmanager
def _user_errors_from_worker() -> Iterator[None]:
    """A bad observation found in the inference worker is the user's error, reported as such (not a traceback)."""
    try:
        yield
    except InferenceError as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


@hydra.main(version_base=None, config_path="../configs", config_name="realtime")
@report_user_errors
def main(cfg: DictConfig) -> None:
    realtime(cfg)


if __name__ == "__main__":
    main()
