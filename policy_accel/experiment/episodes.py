"""Closed-loop episodes under Diffusion Policy's protocol, and the statistics reports are built from.

Episodes run in lockstep groups of ``env_batch`` (one batched inference per control step for the
group). ``env_batch=1`` is what a robot sees and is the only setting whose latencies are reported
as per-control-step latency; larger groups only speed up scoring. Exact solvers return the same
actions (within tolerance) at any batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from policy_accel.observations import stack_observations
from policy_accel.schema import PositiveInt, check_value
from policy_accel.session import InferenceRecord, Session

log = logging.getLogger(__name__)


@dataclass
class EpisodeResult:
    seed: int
    max_reward: float
    success: bool
    steps: int
    inferences: int


@dataclass
class RolloutOutcome:
    episodes: list[EpisodeResult]
    records: list[InferenceRecord]  # one per control-step inference (per group when env_batch > 1)
    frames: list[np.ndarray] = field(default_factory=list)  # first episode, if recorded

    def summary(self) -> dict:
        """The numeric part of results.json: score, success rate, latency and iteration statistics."""
        lat = np.array([r.latency_s for r in self.records]) * 1e3
        cond = np.array([r.condition_s for r in self.records]) * 1e3
        # Rounds per live episode and inference: what a batch-1 solve needs for row-independent solvers
        # (Newton); batch-coupled solvers report the group's rounds for every row.
        its = np.array([n for r in self.records for n in _rounds(r)], dtype=float)
        return {
            "n_episodes": len(self.episodes),
            "seeds": [e.seed for e in self.episodes],
            "score": float(np.mean([e.max_reward for e in self.episodes])),
            "success_rate": float(np.mean([e.success for e in self.episodes])),
            "latency_ms": {
                "p50": float(np.percentile(lat, 50)),
                "p95": float(np.percentile(lat, 95)),
                "mean": float(lat.mean()),
                "max": float(lat.max()),
            },
            # inside latency_ms: observation -> condition (an image policy's encoder), per inference
            "condition_ms": {"p50": float(np.percentile(cond, 50)), "mean": float(cond.mean())},
            "iterations": {
                "mean": float(its.mean()),
                "p95": float(np.percentile(its, 95)),
                "max": float(its.max()),
                "warm_mean": _mean([n for r in self.records if r.warm for n in _rounds(r)]),
                "cold_mean": _mean([n for r in self.records if not r.warm for n in _rounds(r)]),
            },
            "nfe": {"mean": float(np.mean([r.nfe for r in self.records]))},
            "latencies_ms": [round(float(x), 3) for x in lat],
            "unconverged_inferences": int(sum(not r.converged for r in self.records)),
            "warm_inferences": int(sum(r.warm for r in self.records)),
            "max_abs_dev": max((r.deviation for r in self.records if r.deviation is not None), default=None),
            "episodes": [asdict(e) for e in self.episodes],
        }


def _rounds(record: InferenceRecord) -> list[int]:
    return record.row_iterations or [record.iterations]


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def outcome_to_dict(outcome: RolloutOutcome) -> dict:
    """Finished episodes and their inference records as JSON (frames are not kept): what a resumed run reuses."""
    return {"episodes": [asdict(e) for e in outcome.episodes], "records": [asdict(r) for r in outcome.records]}


def outcome_from_dict(data: dict) -> RolloutOutcome:
    return RolloutOutcome(
        [EpisodeResult(**e) for e in data["episodes"]], [InferenceRecord(**r) for r in data["records"]]
    )


def run_episodes(
    make_env: Callable[[], object],
    session: Session,
    seeds: Sequence[int],
    env_batch: int = 1,
    record_video: bool = False,
    progress: bool = True,
    finished: RolloutOutcome | None = None,
    on_group: Callable[[RolloutOutcome], None] | None = None,
) -> RolloutOutcome:
    """Run one episode per seed; ``session`` is reset (and its noise reseeded with the group's first seed).

    Why groups are the unit of resumption: each group starts from a reset session reseeded with its first seed, so
    a group run later gives what it would have given in one go. ``finished`` holds groups of an interrupted run
    of the same seeds (whole groups, a prefix of ``seeds``), which are not run again; ``on_group`` is called with
    everything finished so far after every group, so a caller can keep it on disk.
    """
    check_value(env_batch, PositiveInt, "env_batch")
    episodes: list[EpisodeResult] = list(finished.episodes) if finished else []
    records: list[InferenceRecord] = list(finished.records) if finished else []
    done_seeds = [e.seed for e in episodes]
    if done_seeds != list(seeds[: len(done_seeds)]) or len(done_seeds) % env_batch and len(done_seeds) < len(seeds):
        raise ValueError(f"finished episodes {done_seeds} are not whole groups of env_batch={env_batch} from {seeds}")
    frames: list[np.ndarray] = []
    bar = tqdm(total=len(seeds), desc=f"rollout {session.solver.name}", disable=not progress, dynamic_ncols=True)
    bar.update(len(done_seeds))
    for g in range(len(done_seeds), len(seeds), env_batch):
        group = list(seeds[g : g + env_batch])
        envs = [make_env() for _ in group]
        history = [session.policy.observation_history() for _ in group]  # checks what each env returns
        for env, seed, h in zip(envs, group, history, strict=True):
            h.push(env.reset(seed=seed)[0])
        session.reset(seed=group[0])
        n = len(group)
        max_reward, success = np.zeros(n), np.zeros(n, dtype=bool)
        steps, inferences = np.zeros(n, dtype=int), np.zeros(n, dtype=int)
        done = np.zeros(n, dtype=bool)
        film = record_video and g == 0
        if film:
            frames.append(envs[0].render())
        while not done.all():
            obs_batch = stack_observations([h.stacked() for h in history])
            actions, _, record = session.plan(obs_batch)
            if record.row_iterations is not None:  # count live episodes only
                record.row_iterations = [n for n, over in zip(record.row_iterations, done, strict=True) if not over]
            records.append(record)
            inferences[~done] += 1
            for i, env in enumerate(envs):
                for action in actions[i]:
                    if done[i]:
                        break
                    obs, reward, terminated, truncated, _ = env.step(action)
                    history[i].push(obs)
                    max_reward[i] = max(max_reward[i], reward)
                    steps[i] += 1
                    success[i] |= terminated
                    done[i] = terminated or truncated
                    if film and i == 0:
                        frames.append(env.render_plan(actions[0]))
        for i, seed in enumerate(group):
            episodes.append(
                EpisodeResult(int(seed), float(max_reward[i]), bool(success[i]), int(steps[i]), int(inferences[i]))
            )
            log.info("seed %d: max reward %.3f, success %s, %d steps", seed, max_reward[i], success[i], steps[i])
        for env in envs:
            env.close()
        if on_group is not None:
            on_group(RolloutOutcome(episodes, records))
        bar.update(n)
        bar.set_postfix(score=f"{np.mean([e.max_reward for e in episodes]):.3f}")
    bar.close()
    return RolloutOutcome(episodes, records, frames)
