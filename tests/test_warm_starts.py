"""The published APPROXIMATE warm starts (policy_accel/warm_starts.py): RTI-DP and Falcon run through Session,
are labelled approximate, their knobs change what they do, and bad knobs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policy_accel.session import Session
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise, shift_chunk
from policy_accel.warm_starts import FalconConfig, RTIConfig, TailRestart, falcon_select, rti_guess


def _obs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 512, size=(1, 2, 18))


def _plans(session: Session, n: int = 3) -> list:
    session.reset(seed=0)
    return [session.plan(_obs(i)) for i in range(n)]


def test_rti_runs_the_last_steps_from_the_shifted_clean_chunk_without_noise(trained_policy):
    schedule = trained_policy.schedule(kind="ddpm", num_inference_steps=100)
    session = Session(trained_policy, make_solver("sequential"), schedule, "rti", warm_options={"steps": 3})
    assert session.approximate
    (_, first, r0), (_, second, r1), _ = _plans(session)
    assert r0.iterations == 100 and not r0.warm
    assert r1.iterations == 3 and r1.warm and r1.nfe == 3
    # RTI-DP's PushT config: DDPM-100 steps [2, 1, 0]; the chain starts at the guess itself (no re-noising).
    noise = Noise.draw(100, (1, 16, 2), torch.Generator().manual_seed(1))
    rti = TailRestart(3, renoise=False)
    rti.bind(schedule, 2, make_solver("sequential"))
    rti.update(first)
    chain = rti.prepare(schedule, noise, 8, None)
    assert chain.warm and chain.schedule.timesteps.tolist() == [2, 1, 0]
    torch.testing.assert_close(chain.noise.x_T, shift_chunk(first.sample, 8), rtol=0, atol=0)
    torch.testing.assert_close(chain.noise.z, noise.z[-3:], rtol=0, atol=0)


def test_rti_steps_knob_and_discrete_clip(trained_policy):
    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=10)
    session = Session(trained_policy, make_solver("sequential"), schedule, "rti", warm_options={"steps": 5})
    assert [r.iterations for _, _, r in _plans(session)] == [10, 5, 5]
    sample = torch.tensor([[[0.3, -0.2], [0.7, 0.4]]])
    guess = rti_guess(sample, 1, RTIConfig(discrete_dims=(1,), discrete_factor=2.0))
    torch.testing.assert_close(guess, torch.tensor([[[0.7, 0.5], [0.7, 0.5]]]))  # shifted, last repeated, dim 1 +-0.5


@pytest.mark.parametrize(
    "options,match",
    [
        ({"steps": 0}, "rti.steps"),
        ({"steps": 11}, "rti.steps"),
        ({"discrete_dims": [2]}, "not action dimensions"),
        ({"discrete_factor": 0.0}, "discrete_factor"),
        ({"stepz": 3}, "rti.stepz=3 is not allowed: not an option"),
    ],
)
def test_bad_rti_options_are_refused(trained_policy, options, match):
    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=10)
    with pytest.raises(ValueError, match=match):
        Session(trained_policy, make_solver("sequential"), schedule, "rti", warm_options=options)


def test_warm_options_without_rti_or_falcon_are_refused(trained_policy):
    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=10)
    with pytest.raises(ValueError, match="only used with"):
        Session(trained_policy, make_solver("sequential"), schedule, False, warm_options={"steps": 3})


def _falcon(policy, steps: int = 10, **options) -> Session:
    schedule = policy.schedule(kind="ddim", num_inference_steps=steps)
    return Session(policy, make_solver("sequential"), schedule, "falcon", warm_options=options)


def test_falcon_greedy_with_a_loose_threshold_restarts_at_the_least_noisy_allowed_level(trained_policy):
    session = _falcon(trained_policy, threshold=10.0, temperature=0.0, min_steps=3)
    assert session.approximate
    records = [r for _, _, r in _plans(session)]
    assert records[0].iterations == 10 and not records[0].warm
    assert [r.iterations for r in records[1:]] == [3, 3] and all(r.warm for r in records[1:])
    # 7 buffered candidates (3..9 steps left) screened in one call, which is also the chosen start's first step.
    assert records[1].nfe == 7 + 2


def test_falcon_tight_threshold_or_full_exploration_falls_back_to_a_cold_start(trained_policy):
    tight = [r for _, _, r in _plans(_falcon(trained_policy, threshold=1e-9))]
    assert [r.iterations for r in tight] == [10, 11, 11]  # the spent screening round + the full chain
    assert not any(r.warm for r in tight)
    explore = [r for _, _, r in _plans(_falcon(trained_policy, threshold=10.0, explore=1.0))]
    assert not any(r.warm for r in explore)


def test_falcon_max_steps_and_buffer_limit_the_candidates(trained_policy):
    session = _falcon(trained_policy, threshold=10.0, temperature=0.0, min_steps=4, max_steps=4, buffer=1)
    records = [r for _, _, r in _plans(session)]
    assert [r.iterations for r in records[1:]] == [4, 4] and records[1].nfe == 1 + 3


def test_falcon_warm_result_is_the_tail_solve_from_the_chosen_candidate(trained_policy):
    """Reusing the screening call's output as the first step changes nothing: same as a plain tail solve."""
    from policy_accel.warm_starts import FalconState, falcon_solve

    schedule = trained_policy.schedule(kind="ddim", num_inference_steps=10)
    config = FalconConfig(threshold=10.0, temperature=0.0, min_steps=3, max_steps=3)
    solver, g = make_solver("sequential"), torch.Generator().manual_seed(0)
    cond = trained_policy.condition(_obs(0))
    noise = trained_policy.draw_noise(schedule, 1, g)
    with torch.inference_mode():
        _, state, info = falcon_solve(
            FalconState(), trained_policy.denoiser, solver, schedule, noise, cond, 8, config, g
        )
        assert info["start_steps"] == [0]
        noise2 = trained_policy.draw_noise(schedule, 1, g)
        entry, last = state.entries[0], state.previous_sample[:, -1:, :].expand(1, 8, 2)
        fill = schedule.sqrt_alpha_prod[7] * last + schedule.sqrt_beta_prod[7] * noise2.x_T[:, -8:, :]
        start = shift_chunk(entry.state, 8, fill)
        result, _, info = falcon_solve(state, trained_policy.denoiser, solver, schedule, noise2, cond, 8, config, g)
        assert info["start_steps"] == [7]
        # the candidate: the level-7 state shifted by 8, its new tail the last clean action noised to level 7
        plain = solver.solve(trained_policy.denoiser, schedule.tail(3), Noise(start, noise2.z[7:]), cond)
    assert state.entries[0].step == 7
    torch.testing.assert_close(result.sample, plain.sample, rtol=0, atol=0)


def test_falcon_select_threshold_temperature_and_validity():
    reference = torch.zeros(2, 4, 1)
    estimates = torch.stack([torch.full((2, 4, 1), 0.05), torch.full((2, 4, 1), 0.5)])  # (C=2, B=2, H, A)
    remaining = torch.tensor([5, 2])
    valid = torch.tensor([[True, True], [True, False]])
    g = torch.Generator().manual_seed(0)
    greedy = FalconConfig(threshold=1.0, temperature=0.0)
    assert falcon_select(estimates, reference, remaining, valid, 4, greedy, g).tolist() == [1, 0]  # row 1: 1 invalid
    strict = FalconConfig(threshold=0.1, temperature=0.0)
    assert falcon_select(estimates, reference, remaining, valid, 4, strict, g).tolist() == [0, 0]
    assert falcon_select(estimates, reference, remaining, valid, 4, FalconConfig(threshold=0.01), g).tolist() == [
        -1,
        -1,
    ]
    # temperature: a hot softmax picks the noisier passing candidate sometimes, a cold one almost never
    hot, cold = FalconConfig(threshold=1.0, temperature=100.0), FalconConfig(threshold=1.0, temperature=0.1)
    both = torch.tensor([[True, True], [True, True]])
    picks_hot = [falcon_select(estimates, reference, remaining, both, 4, hot, g)[0].item() for _ in range(200)]
    picks_cold = [falcon_select(estimates, reference, remaining, both, 4, cold, g)[0].item() for _ in range(200)]
    assert 40 < picks_hot.count(0) < 160 and picks_cold.count(0) == 0


@pytest.mark.parametrize(
    "options,match",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"temperature": -1.0}, "temperature"),
        ({"explore": 1.5}, "explore"),
        ({"min_steps": 0}, "min_steps"),
        ({"min_steps": 10}, "min_steps"),
        ({"min_steps": 3, "max_steps": 2}, "max_steps"),
        ({"buffer": 0}, "buffer"),
        ({"thresh": 0.1}, "falcon.thresh=0.1 is not allowed: not an option"),
    ],
)
def test_bad_falcon_options_are_refused(trained_policy, options, match):
    with pytest.raises(ValueError, match=match):
        _falcon(trained_policy, **options)


@pytest.mark.parametrize(
    "warm,extra",
    [("rti", ["rti.steps=2"]), ("falcon", ["falcon.threshold=0.5", "falcon.min_steps=2", "falcon.temperature=0"])],
)
def test_cli_runs_and_labels_the_run_approximate(run_rollout, tmp_path, warm, extra):
    out = tmp_path / warm
    proc = run_rollout(
        "solver=sequential", "policy=ddim4", f"warm_start={warm}", *extra, "n_episodes=1", "task.max_episode_steps=40",
        f"out_dir={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["approximate"] is True and results["warm_start"] == warm
    assert results["warm_options"][extra[0].split("=")[0].split(".")[1]] == pytest.approx(float(extra[0].split("=")[1]))
    assert results["warm_inferences"] >= 1
