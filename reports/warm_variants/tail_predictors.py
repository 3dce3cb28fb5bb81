"""How well can a warm start guess the 8 new tail positions of the next action chunk? (issue #13)

    .venv/bin/python reports/warm_variants/tail_predictors.py demos OUT.json
    .venv/bin/python reports/warm_variants/tail_predictors.py x0 PROBLEMS.pt OUT.json

``demos``: on the PushT expert demonstrations (normalized like the policy's actions, [-1, 1] over the data's
range), predict actions t .. t+7 from those before t by repeating the last one, by linear extrapolation
(slope from the last step or the last four) and by a damped extrapolation; max |error| per look-ahead.
``x0``: on recorded warm-start problems (``warm_variants.py record``), the network's clean prediction of
the tail at each level of the chain-filled warm start (one batched call per problem, this inference's
observation), against the tail the sequential sampler produced.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def demos(out: str) -> None:
    from policy_accel.data import load_replay_buffer

    buffer = load_replay_buffer("data/pusht/expert.zarr")
    actions, ends = buffer["action"], buffer["episode_ends"]
    lo, hi = actions.min(0), actions.max(0)
    normalized = 2 * (actions - lo) / (hi - lo) - 1
    ahead = np.arange(1, 9)[:, None]
    errors: dict[str, list[np.ndarray]] = {"repeat": [], "linear (last step)": [], "linear (last 4)": [], "damped": []}
    start = 0
    for end in ends:
        episode, start = normalized[start:end], end
        for t in range(8, len(episode) - 8):
            last, future = episode[t - 1], episode[t : t + 8]
            slope1, slope4 = episode[t - 1] - episode[t - 2], (episode[t - 1] - episode[t - 5]) / 4
            guesses = {
                "repeat": np.repeat(last[None], 8, 0),
                "linear (last step)": last + ahead * slope1,
                "linear (last 4)": last + ahead * slope4,
                "damped": last + np.cumsum(0.8**ahead, 0) * slope4,
            }
            for name, guess in guesses.items():
                errors[name].append(np.abs(np.clip(guess, -1, 1) - future).max(1))
    table = {
        name: {"median_by_lookahead": np.median(e, 0).round(4).tolist(), "mean_worst": float(np.mean(np.max(e, 1)))}
        for name, e in ((n, np.array(v)) for n, v in errors.items())
    }
    json.dump({"windows": len(errors["repeat"]), "predictors": table}, open(out, "w"), indent=1)
    print(
        f"{len(errors['repeat'])} windows\n\n| predictor | median max error, 1..8 ahead | mean of each window's worst |"
    )
    print("|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {' '.join(f'{v:.3f}' for v in row['median_by_lookahead'])} | {row['mean_worst']:.3f} |")


def x0_levels(path: str, out: str) -> None:
    from warm_variants import chain_filled  # this script's directory is on sys.path when run as a script

    from policy_accel.checkpoint import load_policy
    from policy_accel.solvers.base import Noise, evaluate_steps

    torch.set_num_threads(1)
    policy = load_policy("checkpoints/pusht")
    schedule = policy.schedule()
    T, shift = schedule.num_steps, policy.config.n_action_steps
    keep = policy.config.horizon - shift
    levels = torch.arange(T)
    repeat_errors, x0_errors = [], []
    with torch.inference_mode():
        for p in torch.load(path, weights_only=True):
            if p["init"] is None:
                continue
            noise = Noise(p["x_T"], p["z"])
            clean = p["init"][-1, :, -1:, :].expand(-1, shift, -1)
            init = chain_filled(schedule, p["init"], noise, clean, keep)
            _, eps = evaluate_steps(policy.denoiser, schedule, init[:-1], levels, p["cond"])
            x0 = schedule.predict_x0(init[:-1, 0], eps[:, 0], levels)  # (T, H, A)
            truth = p["sample"][0, keep:]
            x0_errors.append((x0[:, keep:] - truth).abs().amax((1, 2)).numpy())
            repeat_errors.append(float((clean[0] - truth).abs().max()))
    errors = np.array(x0_errors)
    result = {
        "problems": len(repeat_errors),
        "repeat_median": float(np.median(repeat_errors)),
        "x0_median_by_level": np.median(errors, 0).round(4).tolist(),
    }
    json.dump(result, open(out, "w"), indent=1)
    print(
        f"{len(repeat_errors)} warm problems; median tail error (max |.|): "
        f"repeated last action {result['repeat_median']:.3f}"
    )
    for j in (0, 10, 30, 50, 60, 70, 80, 90, 99):
        print(f"  clean prediction at level {j:2d} (0 = pure noise): {result['x0_median_by_level'][j]:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "demos":
        demos(sys.argv[2])
    else:
        x0_levels(sys.argv[2], sys.argv[3])
