"""Diagnostic: the real-time execution pattern without the wall clock (fake clock, zero-cost inference).

    .venv/bin/python reports/realtime/lead_sim.py LEAD_TICKS [N_SEEDS]

Each chunk is planned from the observation LEAD_TICKS before it takes over (as the controller does when
inference needs up to LEAD_TICKS periods) and runs 8 actions, indices LEAD..LEAD+7 of the prediction; with
LEAD_TICKS=0 this is the offline protocol. Isolates what acting on older observations costs the score from
everything timing-related (contention, truncated solves). Writes lead_sim_<LEAD>.json beside this file.
"""

import json
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))
import realtime as R  # noqa: E402

from policy_accel.control import FakeClock, RealTimeController, RunnerPlanner  # noqa: E402
from policy_accel.tasks import env_factory  # noqa: E402

lead, n = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 50
with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
    cfg = compose("realtime", overrides=["solver=paradigms", "warm_start=true", "threads=1"])
runner = R.build_runner(cfg)
inner = RunnerPlanner(runner)


class Unbounded:
    """No deadline: the fake clock stands still while the solver runs."""

    def __call__(self, history, budget):
        return inner(history, None)

    def reset(self, seed=None):
        inner.reset(seed)


clock = FakeClock()
dt = 0.1
# launch exactly `lead` ticks before the hand-over: needed_at - now = lead*dt - margin must be < lead_s + dt
margin = 0.01 if lead > 0 else -0.05
ctrl = RealTimeController(
    Unbounded(), dt, 2, clock=clock, lead_s=max(lead - 0.5, 0) * dt, deadline_margin_s=margin, chunk_steps=8
)
observe = ctrl.observe


def observe_and_wait(obs, t):
    observe(obs, t)
    ctrl.wait_for_inference(120)  # zero latency in fake time


ctrl.observe = observe_and_wait
episodes = []
with ctrl:
    for seed in range(100000, 100000 + n):
        ep = R.run_episode(env_factory("pusht"), ctrl, clock, seed, dt)
        episodes.append({"seed": seed, "max_reward": ep.max_reward, "success": ep.success, "steps": ep.steps})
        e2e = sorted(set(round(x / dt) for x in ep.e2e_s))
        print(seed, round(ep.max_reward, 3), ep.steps, "misses", ep.misses, "lead ticks", e2e, flush=True)
out = {
    "lead_ticks": lead,
    "score": float(np.mean([e["max_reward"] for e in episodes])),
    "success_rate": float(np.mean([e["success"] for e in episodes])),
    "episodes": episodes,
}
Path(__file__).with_name(f"lead_sim_{lead}.json").write_text(json.dumps(out, indent=2))
print("lead", lead, "score", out["score"], "success", out["success_rate"])
