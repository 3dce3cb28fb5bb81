"""How early could warm exact Newton stop? Trace every round of a closed loop, then replay stopping rules.

    .venv/bin/python reports/warm_stop_rules/stop_rule_replay.py trace TRACE.json [rollout overrides...]
    .venv/bin/python reports/warm_stop_rules/stop_rule_replay.py replay TRACE.json

``trace`` runs ``eval/rollout.py`` with Newton's linear-recursion solve wrapped so that every round's update
(its largest entry, and the update of the final sample) is recorded; run it with no step test
(``+solver.options.step_tolerance=null``) so every solve runs to the residual test. ``replay`` then asks, for each
recorded solve, where a stopping rule would have stopped and how far that iterate's final sample is from the
converged one (the sum of the final-sample updates it skipped). A rule only stops earlier, so the iterates before
its stop are the ones recorded: the replay is exact for those solves; the closed loop itself would drift by at
most the deviation, which the replay does not follow.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys

import numpy as np


def trace(path: str, overrides: list[str]) -> None:
    from policy_accel.solvers import newton

    log: list[dict] = []
    recursion, solve = newton.affine_recursion, newton.NewtonSolver.solve

    def recorded_recursion(coupling, offsets, method="loop"):
        delta = recursion(coupling, offsets, method)
        log[-1]["rounds"].append({"update": delta.abs().amax().item(), "final": delta[-1].flatten().tolist()})
        return delta

    def recorded_solve(self, *args, init=None, **kwargs):
        log.append({"warm": init is not None, "rounds": []})
        result = solve(self, *args, init=init, **kwargs)
        log[-1]["iterations"] = result.iterations
        return result

    newton.affine_recursion, newton.NewtonSolver.solve = recorded_recursion, recorded_solve
    atexit.register(lambda: json.dump(log, open(path, "w")))
    sys.argv = ["eval/rollout.py", *overrides]
    runpy.run_path("eval/rollout.py", run_name="__main__")


def skipped(solve: dict) -> list[float]:
    """Distance of the final sample after round k (k = 1..n) from the converged one."""
    final = np.array([r["final"] for r in solve["rounds"]])
    return [float(np.abs(final[k:].sum(0)).max()) for k in range(1, len(final) + 1)]


def estimate_stop(sizes: list[float], tolerance: float, fallback: int) -> int:
    """First round whose a-posteriori estimate s r / (1 - r) (r = s_k / s_{k-1}) is <= tolerance (the solver's rule)."""
    for k in range(1, len(sizes)):
        if sizes[k] == 0 or sizes[k - 1] == 0:
            break
        rate = sizes[k] / sizes[k - 1]
        if rate < 1 and sizes[k] * rate / (1 - rate) <= tolerance:
            return k + 1
    return fallback


def replay(path: str) -> None:
    solves = json.load(open(path))
    rules = {"residual test only (the exact solver)": lambda s: s["iterations"]}
    for tol in (1e-4, 3e-4, 1e-3):
        rules[f"step estimate, all levels, {tol:g}"] = lambda s, t=tol: estimate_stop(
            [r["update"] for r in s["rounds"]], t, s["iterations"]
        )
        rules[f"step estimate, final sample only, {tol:g}"] = lambda s, t=tol: estimate_stop(
            [float(np.abs(r["final"]).max()) for r in s["rounds"]], t, s["iterations"]
        )
    rules["oracle: first iterate within 1e-3 (a lower bound)"] = lambda s: next(
        (k + 1 for k, e in enumerate(skipped(s)) if e <= 1e-3), s["iterations"]
    )
    warm = sum(s["warm"] for s in solves)
    print(f"{len(solves)} solves ({warm} warm, {len(solves) - warm} cold) from {path}\n")
    print("| stopping rule | rounds mean | warm mean | p95 | max skipped | solves > 1e-3 |")
    print("|---|---|---|---|---|---|")
    for name, rule in rules.items():
        stops = [min(rule(s), s["iterations"]) for s in solves]
        pairs = list(zip(solves, stops, strict=True))
        devs = np.array([skipped(s)[k - 1] if k <= len(s["rounds"]) else 0.0 for s, k in pairs])
        warm_stops = [k for s, k in pairs if s["warm"]]
        print(
            f"| {name} | {np.mean(stops):.2f} | {np.mean(warm_stops):.2f} | {np.percentile(stops, 95):.0f} "
            f"| {devs.max():.1e} | {int((devs > 1e-3).sum())} |"
        )


if __name__ == "__main__":
    mode, path, *rest = sys.argv[1:]
    trace(path, rest) if mode == "trace" else replay(path)
