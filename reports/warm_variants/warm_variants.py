"""Same warm-start problems, different Newton variants: record a closed loop's solves once, re-solve them offline.

    .venv/bin/python reports/warm_variants/warm_variants.py record PROBLEMS.pt [rollout overrides...]
    .venv/bin/python reports/warm_variants/warm_variants.py solve PROBLEMS.pt OUT.json \
        [--tail repeat|chain|oracle_chain] [--derivatives finite_difference|forward_ad] [--limit N]
    .venv/bin/python reports/warm_variants/warm_variants.py table OUT.json [OUT.json ...]

``record`` runs ``eval/rollout.py`` with the sequential solver (``warm_start=true``, so the runner builds the
shifted warm start it would hand to Newton; the sequential solver ignores it) and saves every solve's
conditioning, noise, warm start and sequential sample. Because a converged Newton trajectory equals the
sequential one to its tolerance, these are the problems a warm Newton closed loop meets (up to the drift of
its 2e-5 tolerance). ``solve`` re-solves each recorded problem with exact-Jacobian Newton and no step test,
recording every iterate's final sample, and reports rounds to the residual test and the oracle's round (the
first iterate within 1e-3 of the sequential sample) per solve: variants compare on identical problems.
``table`` prints one Markdown row per result file, with the solver's own step test (``step_tolerance``)
replayed on the recorded update sizes where the file has them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import torch


def record(path: str, overrides: list[str]) -> None:
    from policy_accel.solvers.sequential import SequentialSolver

    problems: list[dict] = []
    solve = SequentialSolver.solve

    def recorded(self, denoiser, schedule, noise, global_cond, init=None, budget=None, carry=None):
        result = solve(self, denoiser, schedule, noise, global_cond, init=init, budget=budget, carry=carry)
        problems.append(
            {
                "cond": global_cond.clone(),
                "x_T": noise.x_T.clone(),
                "z": noise.z.clone(),
                "init": None if init is None else init.clone(),
                "sample": result.sample.clone(),
            }
        )
        return result

    SequentialSolver.solve = recorded
    atexit.register(lambda: torch.save(problems, path))
    sys.argv = ["eval/rollout.py", "solver=sequential", "warm_start=true", *overrides]
    runpy.run_path("eval/rollout.py", run_name="__main__")


def chain_filled(schedule, init: torch.Tensor, noise, clean: torch.Tensor, keep: int) -> torch.Tensor:
    """A copy of the warm start whose positions ``keep`` on follow ``tail_chain`` to ``clean`` (the runner's
    ``tail_fill=chain`` when ``clean`` is the previous chunk's last action)."""
    from policy_accel.runner import tail_chain
    from policy_accel.solvers.base import step_noise

    init = init.clone()
    init[:, :, keep:] = tail_chain(schedule, clean, noise.x_T[:, keep:], step_noise(schedule, noise)[:, :, keep:])
    return init


def solve_all(path: str, out: str, tail: str, derivatives: str, limit: int | None) -> None:
    from policy_accel.checkpoint import load_policy
    from policy_accel.solvers import newton
    from policy_accel.solvers.base import Noise

    problems = torch.load(path, weights_only=True)[:limit]
    policy = load_policy("checkpoints/pusht")
    schedule = policy.schedule()
    solver = newton.NewtonSolver(jacobian="exact", step_tolerance=None, derivatives=derivatives)
    finals: list[torch.Tensor] = []
    updates: list[float] = []  # largest update entry of each round, every level (what the step test sees)
    recursion = newton.affine_recursion

    def recorded_recursion(coupling, offsets, method="loop"):
        delta = recursion(coupling, offsets, method)
        finals.append(delta[-1].clone())
        updates.append(delta.abs().amax().item())
        return delta

    newton.affine_recursion = recorded_recursion
    shift = policy.config.n_action_steps
    keep = policy.config.horizon - shift
    rows = []
    with torch.inference_mode():
        for p in problems:
            noise = Noise(p["x_T"], p["z"])
            init = p["init"]
            if init is not None and tail != "repeat":
                # chain: the previous chunk's last action; oracle_chain: this solve's own (sequential) tail, a
                # bound on what any better tail prediction could give
                clean = init[-1, :, -1:, :].expand(-1, shift, -1) if tail == "chain" else p["sample"][:, keep:, :]
                init = chain_filled(schedule, init, noise, clean, keep)
            finals.clear()
            updates.clear()
            result = solver.solve(policy.denoiser, schedule, noise, p["cond"], init=init)
            start = (init[-1] if init is not None else noise.x_T).reshape(-1)
            iterates = start + torch.cumsum(torch.stack([f.reshape(-1) for f in finals]), 0)
            devs = (iterates - p["sample"].reshape(-1)).abs().amax(1).tolist()
            oracle = next((k + 1 for k, d in enumerate(devs) if d <= 1e-3), result.iterations)
            rows.append(
                {
                    "warm": init is not None,
                    "rounds": result.iterations,
                    "oracle": oracle,
                    "devs": devs,
                    "updates": list(updates),
                    "final_dev": float((result.sample - p["sample"]).abs().max()),
                }
            )
    json.dump(rows, open(out, "w"))
    warm = [r for r in rows if r["warm"]]
    for name, sel in (("all", rows), ("warm", warm)):
        rounds = np.array([r["rounds"] for r in sel])
        oracle = np.array([r["oracle"] for r in sel])
        print(
            f"{name}: {len(sel)} solves, residual-test rounds {rounds.mean():.2f} (p95 {np.percentile(rounds, 95):.0f},"
            f" max {rounds.max()}), oracle {oracle.mean():.2f}, max final dev {max(r['final_dev'] for r in sel):.1e}"
        )


def table(paths: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "warm_stop_rules"))
    from stop_rule_replay import estimate_stop  # the exact solver's step test, replayed on update sizes

    print(
        "| result | warm solves | residual test: mean (p95, max) | oracle mean | step test 1e-4: mean, max dev "
        "| step test 1e-3: mean, max dev |"
    )
    print("|---|---|---|---|---|---|")
    for path in paths:
        warm = [r for r in json.load(open(path)) if r["warm"]]
        rounds = np.array([r["rounds"] for r in warm])
        cells = []
        for tol in (1e-4, 1e-3):
            if "updates" not in warm[0]:
                cells.append("not recorded")
                continue
            stops = [min(estimate_stop(r["updates"], tol, r["rounds"]), r["rounds"]) for r in warm]
            devs = [
                r["devs"][k - 1] if k <= len(r["devs"]) else r["final_dev"] for r, k in zip(warm, stops, strict=True)
            ]
            cells.append(f"{np.mean(stops):.2f}, {max(devs):.1e}")
        print(
            f"| {path.split('/')[-1]} | {len(warm)} | {rounds.mean():.2f} ({np.percentile(rounds, 95):.0f}, "
            f"{rounds.max()}) | {np.mean([r['oracle'] for r in warm]):.2f} | {cells[0]} | {cells[1]} |"
        )


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "table":
        table(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("mode")
        parser.add_argument("problems")
        parser.add_argument("out")
        parser.add_argument("--tail", default="repeat", choices=["repeat", "chain", "oracle_chain"])
        parser.add_argument("--derivatives", default="finite_difference")
        parser.add_argument("--limit", type=int)
        args = parser.parse_args()
        solve_all(args.problems, args.out, args.tail, args.derivatives, args.limit)
