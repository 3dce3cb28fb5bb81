"""A PushT expert without a human: sampling-based MPC on a mirror of the simulator.

Every ``replan_every`` control steps the planner rolls out candidate push primitives (approach a
point on the T's outline from outside, then push inward) on a second gym-pusht simulation set to
the real one's exact physics state, and executes the start of the cheapest plan. Cost: mean
distance of the T's vertices to the goal's, minus a coverage bonus, plus a small agent-to-block
term; reaching success scores best, sooner better.

Regenerate the committed demonstrations with::

    python -m envs.pusht_expert --episodes 220 --out data/pusht/expert.zarr --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from gym_pusht.envs.pusht import PushTEnv as _GymPushTEnv
from shapely.geometry import LineString, Polygon
from tqdm import tqdm

from envs.pusht import GOAL_POSE, SUCCESS_COVERAGE, TEST_START_SEED, PhysicsState, PushTEnv, make_env

# The T's outline in body coordinates (bar 120x30 on top of a 30x90 stem), counter-clockwise.
T_OUTLINE = np.array(
    [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], dtype=np.float64
)
T_COG = np.array([0.0, 45.0])
AGENT_RADIUS = 15.0


def _rot(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def outline_world(pos: np.ndarray, angle: float) -> np.ndarray:
    return T_OUTLINE @ _rot(angle).T + pos


GOAL_OUTLINE = outline_world(GOAL_POSE[:2], GOAL_POSE[2])
GOAL_POLYGON = Polygon(GOAL_OUTLINE)


@dataclass
class PlannerConfig:
    n_candidates: int = 32
    plan_len: int = 16
    replan_every: int = 4
    check_every: int = 4
    speed_min: float = 12.0  # px per control step along the path
    speed_max: float = 30.0


class MirrorSim:
    """A second simulation used as the planner's model; never steps the real environment."""

    def __init__(self) -> None:
        self.env = _GymPushTEnv(obs_type="state")
        self.env._setup()

    def set(self, s: PhysicsState) -> None:
        e = self.env
        e.agent.position = tuple(s.agent_pos)
        e.agent.velocity = tuple(s.agent_vel)
        e.block.angle = s.block_angle
        e.block.position = tuple(s.block_pos)
        e.block.velocity = tuple(s.block_vel)
        e.block.angular_velocity = s.block_angular_vel

    def rollout_cost(self, s: PhysicsState, actions: np.ndarray, check_every: int) -> float:
        """Cost of executing ``actions`` from state ``s`` (lower is better)."""
        self.set(s)
        e = self.env
        agent, block, space = e.agent, e.block, e.space
        cost = np.inf
        for k, (ax, ay) in enumerate(actions):
            for _ in range(10):
                px, py = agent.position
                vx, vy = agent.velocity
                agent.velocity = (vx + (100 * (ax - px) - 20 * vx) * 0.01, vy + (100 * (ay - py) - 20 * vy) * 0.01)
                space.step(0.01)
            if (k + 1) % check_every == 0 or k == len(actions) - 1:
                pos = np.array(block.position)
                verts = outline_world(pos, block.angle)
                cov = Polygon(verts).intersection(GOAL_POLYGON).area / GOAL_POLYGON.area
                if cov > SUCCESS_COVERAGE:
                    return -1000.0 + k
                dist = np.linalg.norm(verts - GOAL_OUTLINE, axis=1).mean()
                cog = pos + _rot(block.angle) @ T_COG
                cost = dist - 60.0 * cov + 0.02 * np.linalg.norm(np.array(agent.position) - cog)
        return cost


def _path_to_actions(waypoints: list[np.ndarray], speed: float, n: int) -> np.ndarray:
    """Sample n targets along a polyline at a constant speed; hold the end point once reached."""
    pts = np.array(waypoints)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    dists = np.minimum(speed * np.arange(1, n + 1), cum[-1])
    out = np.empty((n, 2))
    for d in range(2):
        out[:, d] = np.interp(dists, cum, pts[:, d])
    return np.clip(out, 0.0, 512.0)


def sample_push(rng: np.random.Generator, s: PhysicsState, cfg: PlannerConfig) -> np.ndarray:
    """A push primitive: approach a random outline point from outside, then push inward."""
    verts = outline_world(s.block_pos, s.block_angle)
    edges = np.roll(verts, -1, axis=0) - verts
    lengths = np.linalg.norm(edges, axis=1)
    e = rng.choice(len(verts), p=lengths / lengths.sum())
    point = verts[e] + rng.uniform(0.05, 0.95) * edges[e]
    tangent = edges[e] / lengths[e]
    outward = np.array([tangent[1], -tangent[0]])  # counter-clockwise outline: right normal points out
    approach = point + outward * rng.uniform(AGENT_RADIUS + 3, AGENT_RADIUS + 15)
    push_dir = -outward + tangent * rng.normal(0.0, 0.3)
    push_dir /= np.linalg.norm(push_dir)
    push_end = approach + push_dir * rng.uniform(20.0, 90.0)

    agent = s.agent_pos
    waypoints = [agent]
    body = Polygon(verts).buffer(AGENT_RADIUS)
    if LineString([agent, approach]).intersects(body):
        cog = s.block_pos + _rot(s.block_angle) @ T_COG
        radius = 125.0
        a0 = np.arctan2(*(agent - cog)[::-1])
        a1 = np.arctan2(*(approach - cog)[::-1])
        delta = (a1 - a0 + np.pi) % (2 * np.pi) - np.pi
        for frac in np.linspace(0.0, 1.0, 6):
            ang = a0 + frac * delta
            waypoints.append(cog + radius * np.array([np.cos(ang), np.sin(ang)]))
    waypoints += [approach, push_end]
    speed = rng.uniform(cfg.speed_min, cfg.speed_max)
    return _path_to_actions(waypoints, speed, cfg.plan_len)


class MPCExpert:
    def __init__(self, seed: int, cfg: PlannerConfig | None = None):
        self.cfg = cfg or PlannerConfig()
        self.rng = np.random.default_rng(seed)
        self.mirror = MirrorSim()
        self.plan: np.ndarray | None = None

    def reset(self) -> None:
        self.plan = None

    def replan(self, s: PhysicsState) -> np.ndarray:
        cfg = self.cfg
        candidates = [sample_push(self.rng, s, cfg) for _ in range(cfg.n_candidates)]
        if self.plan is not None and len(self.plan) > cfg.replan_every:
            rest = self.plan[cfg.replan_every :]
            shifted = np.concatenate([rest, np.repeat(rest[-1:], cfg.replan_every, axis=0)])
            candidates.append(shifted)
            candidates.append(np.clip(shifted + self.rng.normal(0, 4.0, shifted.shape), 0, 512))
        costs = [self.mirror.rollout_cost(s, c, cfg.check_every) for c in candidates]
        self.plan = candidates[int(np.argmin(costs))]
        return self.plan


def run_episode(env: PushTEnv, expert: MPCExpert, seed: int) -> dict:
    """Run the expert on Diffusion Policy's start state for ``seed``; record what DP records."""
    obs, info = env.reset(seed=seed)
    expert.reset()
    states, keypoints, actions = [], [], []
    max_reward, success, steps = 0.0, False, 0
    cfg = expert.cfg
    queue: list[np.ndarray] = []
    while True:
        if not queue:
            queue = list(expert.replan(env.physics_state())[: cfg.replan_every])
        action = queue.pop(0)
        states.append(env.state())
        keypoints.append(env.keypoints())
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        max_reward = max(max_reward, reward)
        if terminated or truncated:
            success = bool(terminated)
            break
    return {
        "seed": seed,
        "success": success,
        "max_reward": max_reward,
        "steps": steps,
        "state": np.array(states, dtype=np.float32),
        "keypoint": np.array(keypoints, dtype=np.float32),
        "action": np.array(actions, dtype=np.float32),
    }


def _worker(seed: int) -> dict:
    env = make_env()
    return run_episode(env, MPCExpert(seed), seed)


def write_replay_buffer(path: Path, episodes: list[dict]) -> None:
    """Diffusion Policy's replay-buffer layout: data/{state,keypoint,action}, meta/episode_ends."""
    import zarr

    root = zarr.open_group(str(path), mode="w")
    data = root.create_group("data")
    for key in ("state", "keypoint", "action"):
        arr = np.concatenate([ep[key] for ep in episodes])
        data.create_dataset(key, data=arr, chunks=(min(len(arr), 4096), *arr.shape[1:]))
    ends = np.cumsum([ep["steps"] for ep in episodes]).astype(np.int64)
    root.create_group("meta").create_dataset("episode_ends", data=ends)
    root.attrs["seeds"] = [int(ep["seed"]) for ep in episodes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=220, help="successful episodes to record")
    parser.add_argument("--out", type=Path, default=Path("data/pusht/expert.zarr"))
    parser.add_argument("--start-seed", type=int, default=0, help="train seeds; must stay below the test seeds")
    parser.add_argument("--eval-seeds", type=int, default=50, help="test-seed episodes to measure success on")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    t0 = time.time()
    with Pool(args.workers) as pool:
        evaluation = list(
            tqdm(
                pool.imap(_worker, range(TEST_START_SEED, TEST_START_SEED + args.eval_seeds)),
                total=args.eval_seeds,
                desc="expert on test seeds",
            )
        )
        recorded, tried = [], 0
        seeds = iter(range(args.start_seed, TEST_START_SEED))
        bar = tqdm(total=args.episodes, desc="recording successful episodes")
        while len(recorded) < args.episodes:
            batch = [next(seeds) for _ in range(args.workers * 4)]
            for ep in pool.map(_worker, batch):
                tried += 1
                if ep["success"] and len(recorded) < args.episodes:
                    recorded.append(ep)
                    bar.update(1)
        bar.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_replay_buffer(args.out, recorded)
    stats = {
        "test_seeds": [TEST_START_SEED, TEST_START_SEED + args.eval_seeds - 1],
        "test_success_rate": float(np.mean([e["success"] for e in evaluation])),
        "test_mean_max_reward": float(np.mean([e["max_reward"] for e in evaluation])),
        "test_mean_steps": float(np.mean([e["steps"] for e in evaluation])),
        "train_episodes_tried": tried,
        "train_success_rate": len(recorded) / tried,
        "recorded_episodes": len(recorded),
        "recorded_frames": int(sum(e["steps"] for e in recorded)),
        "recorded_mean_length": float(np.mean([e["steps"] for e in recorded])),
        "train_seed_range": [int(recorded[0]["seed"]), int(recorded[-1]["seed"])],
        "planner": vars(PlannerConfig()),
        "wall_time_s": time.time() - t0,
    }
    (args.out.parent / "expert_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
