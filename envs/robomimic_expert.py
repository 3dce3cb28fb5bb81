"""Scripted demonstrations for the robomimic tasks, recorded in robomimic's hdf5 layout.

No human data can be downloaded here, so a waypoint script plays the operator: move above the object,
descend, close the gripper, lift (Lift), then carry over the target bin and release (Can). Targets
come from the simulator's object pose; actions are the operational-space controller's 7-D delta
commands (position error scaled to the controller's 5 cm per step range, no rotation, gripper -1
open / +1 closed). Per-episode random speed, grasp offset and hover height, plus small action noise,
give the data the variety a human operator's would have. Only successful episodes are kept.

Regenerate the committed datasets with::

    python -m envs.robomimic_expert --task lift --episodes 120 --out data/lift/demos.hdf5
    python -m envs.robomimic_expert --task can --episodes 120 --out data/can/demos.hdf5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from envs.robomimic import OBS_KEYS, RobomimicLowdimEnv, env_meta

OBJECT_POS = {"lift": "cube_pos", "can": "Can_pos"}  # robosuite observables of the object to grasp
POS_RANGE = 0.05  # metres per control step at action 1.0 (robosuite's OSC output_max)
STALL_STEPS = 40  # a waypoint not reached in this many steps (blocked by contact) counts as reached
TRAIN_START_SEED = 0  # demo seeds count up from here; test seeds start at 100000


@dataclass
class Waypoint:
    target: np.ndarray  # eef position to reach
    gripper: float  # -1 open, +1 closed
    tolerance: float  # metres: reached when closer than this
    hold: int = 0  # extra steps to stay once reached (lets the gripper close / open)


class ScriptedExpert:
    """Waypoint follower; waypoints are recomputed from the object's pose every step until it is grasped."""

    def __init__(self, task: str, env: RobomimicLowdimEnv, rng: np.random.Generator):
        self.task, self.env, self.rng = task, env, rng
        self.gain = rng.uniform(6.0, 10.0)  # proportional gain on the position error (speed)
        xy, (z_low, z_high) = (0.008, (-0.01, 0.0)) if task == "lift" else (0.003, (0.0, 0.02))  # the can is wider
        self.grasp_offset = np.array([rng.uniform(-xy, xy), rng.uniform(-xy, xy), rng.uniform(z_low, z_high)])
        self.hover = rng.uniform(0.06, 0.12)
        self.noise = rng.uniform(0.0, 0.1)
        self.phase = 0
        self.held = 0
        self.phase_steps = 0

    def _object_pos(self) -> np.ndarray:
        return np.asarray(self.env.sim_env._get_observations()[OBJECT_POS[self.task]])

    def _waypoints(self) -> list[Waypoint]:
        obj = self._object_pos()
        grasp = obj + self.grasp_offset
        above = grasp + np.array([0.0, 0.0, self.hover])
        points = [
            Waypoint(above, -1.0, 0.01),
            Waypoint(grasp, -1.0, 0.01),
            Waypoint(grasp, 1.0, 1.0, hold=8),
        ]
        if self.task == "lift":
            points.append(Waypoint(grasp + np.array([0.0, 0.0, 0.2]), 1.0, 0.01))
        else:
            sim = self.env.sim_env
            bin_xyz = np.asarray(sim.target_bin_placements[sim.object_to_id["can"]])
            carry_z = max(grasp[2], bin_xyz[2]) + 0.2
            points += [
                Waypoint(np.array([grasp[0], grasp[1], carry_z]), 1.0, 0.03),
                Waypoint(np.array([bin_xyz[0], bin_xyz[1], carry_z]), 1.0, 0.02),
                Waypoint(np.array([bin_xyz[0], bin_xyz[1], bin_xyz[2] + 0.12]), 1.0, 0.02),
                Waypoint(np.array([bin_xyz[0], bin_xyz[1], bin_xyz[2] + 0.12]), -1.0, 1.0, hold=10),
            ]
        return points

    def act(self) -> np.ndarray:
        if self.phase < 2 or not hasattr(self, "_frozen"):
            points = self._waypoints()
            if self.phase >= 2:  # grasped: later waypoints no longer follow the (moving) object
                self._frozen = points
        else:
            points = self._frozen
        point = points[min(self.phase, len(points) - 1)]
        eef = np.asarray(self.env.obs_dict()["robot0_eef_pos"])
        error = point.target - eef
        self.phase_steps += 1
        reached = np.linalg.norm(error) < point.tolerance or self.phase_steps > STALL_STEPS  # stalled: go on
        if reached:
            if self.held >= point.hold and self.phase < len(points) - 1:
                self.phase += 1
                self.held = self.phase_steps = 0
            else:
                self.held += 1
        move = np.clip(self.gain * error / POS_RANGE / 10.0, -1.0, 1.0)
        move = np.clip(move + self.rng.normal(0.0, self.noise, 3), -1.0, 1.0)
        return np.concatenate([move, np.zeros(3), [point.gripper]])


def run_episode(task: str, seed: int, max_steps: int | None = None) -> dict:
    """One scripted episode from the seeded start state; recorded in robomimic's per-demo layout."""
    env = RobomimicLowdimEnv(task, max_episode_steps=max_steps)
    obs, _ = env.reset(seed=seed)
    expert = ScriptedExpert(task, env, np.random.default_rng(seed + 7_919))
    record: dict[str, list] = {"states": [], "actions": [], "rewards": [], "dones": []}
    obs_record: dict[str, list] = {k: [] for k in OBS_KEYS}
    success = False
    for _ in range(env.max_episode_steps):
        record["states"].append(env.state())
        for key, value in env.obs_dict().items():
            obs_record[key].append(value)
        action = expert.act()
        _, reward, success, truncated, _ = env.step(action)
        record["actions"].append(action)
        record["rewards"].append(reward)
        record["dones"].append(float(success))
        if success or truncated:
            break
    env.close()
    out = {k: np.asarray(v) for k, v in record.items()}
    out["obs"] = {k: np.asarray(v) for k, v in obs_record.items()}
    out.update(seed=seed, success=success, length=len(record["actions"]))
    return out


def _worker(args: tuple[str, int]) -> dict:
    return run_episode(*args)


def write_hdf5(path: Path, task: str, episodes: list[dict]) -> None:
    """robomimic's dataset layout: data/demo_i/{states,actions,rewards,dones,obs/<key>}, env_args on data."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(env_meta(task))
        data.attrs["total"] = int(sum(e["length"] for e in episodes))
        for i, ep in enumerate(episodes):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = ep["length"]
            demo.attrs["seed"] = ep["seed"]
            for key in ("states", "actions", "rewards", "dones"):
                demo.create_dataset(key, data=ep[key], compression="gzip")
            for key, value in ep["obs"].items():
                demo.create_dataset(f"obs/{key}", data=value.astype(np.float32), compression="gzip")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["lift", "can"], required=True)
    parser.add_argument("--episodes", type=int, default=120, help="successful demonstrations to keep")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--test-seeds", type=int, default=0, help="also measure the expert on this many test seeds")
    args = parser.parse_args()
    start = time.time()
    kept: list[dict] = []
    tried = 0
    with Pool(args.workers) as pool, tqdm(total=args.episodes, desc=f"{args.task} demos") as bar:
        seed = TRAIN_START_SEED
        while len(kept) < args.episodes:
            batch = [(args.task, s) for s in range(seed, seed + 2 * args.workers)]
            seed += len(batch)
            for ep in pool.map(_worker, batch):
                tried += 1
                if ep["success"] and len(kept) < args.episodes:
                    kept.append(ep)
                    bar.update(1)
            bar.set_postfix(success=f"{len(kept) / tried:.0%}")
        test = pool.map(_worker, [(args.task, 100_000 + i) for i in range(args.test_seeds)])
    write_hdf5(args.out, args.task, kept)
    stats = {
        "task": args.task,
        "tried": tried,
        "kept": len(kept),
        "train_seeds": [int(e["seed"]) for e in kept],
        "success_rate": len(kept) / tried,
        "frames": int(sum(e["length"] for e in kept)),
        "mean_length": float(np.mean([e["length"] for e in kept])),
        "wall_s": round(time.time() - start, 1),
    }
    if test:
        stats["test_seeds"] = {
            "n": len(test),
            "success_rate": float(np.mean([e["success"] for e in test])),
            "mean_length": float(np.mean([e["length"] for e in test])),
        }
    args.out.with_name("stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps({k: v for k, v in stats.items() if k != "train_seeds"}, indent=2))


if __name__ == "__main__":
    main()
