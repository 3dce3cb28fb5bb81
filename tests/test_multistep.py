"""The sequential samplers a diffusers user reaches for after DDIM (DPM-Solver++ 2M, UniPC, DDIM leading/trailing),
each against diffusers' own ``step`` loop on the same noise and the same network."""

from __future__ import annotations

import pytest
import torch

from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise

FAMILIES = [  # (kind, spacing, extra ScheduleConfig fields)
    ("dpmpp2m", None, {}),
    ("unipc", None, {}),
    ("ddim", "leading", {}),
    ("ddim", "trailing", {}),
    ("dpmpp2m", None, {"thresholding": True, "sample_max_value": 1.5}),
    ("unipc", "trailing", {"thresholding": True, "sample_max_value": 1.5}),
    ("dpmpp2m", None, {"clip_sample": False}),
    ("ddim", "trailing", {"thresholding": True, "sample_max_value": 1.5}),
]


def _denoiser(random_net, scale: float):
    """The random U-Net with its output scaled so that predicted clean samples leave [-1, 1] (clipping is used)."""
    return lambda x, t, c: scale * random_net(x, t, c)


def diffusers_loop(config: ScheduleConfig, denoiser, x: torch.Tensor, cond: torch.Tensor, first_step: int = 0):
    """A plain diffusers sampling loop (from ``first_step``, as img2img does with ``set_begin_index``)."""
    scheduler = config.make_scheduler()
    if first_step:
        scheduler.set_begin_index(first_step)
    for t in scheduler.timesteps[first_step:]:
        eps = denoiser(x, t.expand(x.shape[0]), cond)
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("kind,spacing,extra", FAMILIES)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("batch", [1, 3])
def test_sequential_solver_matches_diffusers_step_loop(random_net, kind, spacing, extra, steps, batch):
    config = ScheduleConfig(kind=kind, num_inference_steps=steps, timestep_spacing=spacing, **extra)
    schedule = Schedule(config)
    g = torch.Generator().manual_seed(steps * 10 + batch)
    noise = Noise.draw(steps, (batch, 16, 2), g)
    cond = torch.randn(batch, random_net.config.global_cond_dim, generator=g)
    denoiser = _denoiser(random_net, 3.0)
    ours = make_solver("sequential").solve(denoiser, schedule, noise, cond)
    expected = diffusers_loop(config, denoiser, noise.x_T.clone(), cond)
    assert ours.iterations == steps and ours.nfe == steps * batch and ours.converged
    # Our coefficients are computed in float64, diffusers' in float32: 3e-5 apart at most on these chains (unclipped
    # chains reach |x| ~ 1e3 on this random network, hence the relative scale).
    assert (ours.sample - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(schedule.timesteps, config.make_scheduler().timesteps)


@pytest.mark.parametrize("kind", ["dpmpp2m", "unipc"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_tail_restarts_the_multistep_history_like_diffusers_begin_index(random_net, kind, k):
    config = ScheduleConfig(kind=kind, num_inference_steps=8)
    tail = Schedule(config).tail(k)
    assert tail.timesteps.tolist() == config.make_scheduler().timesteps[8 - k :].tolist()
    g = torch.Generator().manual_seed(k)
    start, cond = torch.randn(2, 16, 2, generator=g), torch.randn(2, random_net.config.global_cond_dim, generator=g)
    denoiser = _denoiser(random_net, 3.0)
    ours = make_solver("sequential").solve(denoiser, tail, Noise(start, torch.zeros(k, 2, 16, 2)), cond)
    expected = diffusers_loop(config, denoiser, start.clone(), cond, 8 - k)
    assert (ours.sample - expected).abs().max() <= 1e-4


def test_multistep_levels_are_diffusers_alphas_and_add_noise_is_the_forward_process():
    config = ScheduleConfig(kind="dpmpp2m", num_inference_steps=5)
    schedule, scheduler = Schedule(config), config.make_scheduler()
    abar = scheduler.alphas_cumprod[scheduler.timesteps]
    torch.testing.assert_close(schedule.sqrt_alpha_prod, abar.sqrt(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(schedule.sqrt_beta_prod, (1 - abar).sqrt(), rtol=1e-6, atol=1e-6)
    x0, eps = torch.rand(2, 16, 2) * 2 - 1, torch.randn(2, 16, 2)
    torch.testing.assert_close(
        schedule.add_noise(x0, eps, 2), scheduler.add_noise(x0, eps, scheduler.timesteps[2:3]), rtol=1e-5, atol=1e-5
    )


def test_clipping_matters_and_the_default_clip_is_thresholding_at_one():
    """clip_sample (the checkpoint's) clamps x0, which is diffusers' thresholding at sample_max_value 1.0."""
    clip = Schedule(ScheduleConfig(kind="unipc", num_inference_steps=4))
    thresh1 = Schedule(ScheduleConfig(kind="unipc", num_inference_steps=4, thresholding=True, sample_max_value=1.0))
    thresh2 = Schedule(ScheduleConfig(kind="unipc", num_inference_steps=4, thresholding=True, sample_max_value=2.0))
    none = Schedule(ScheduleConfig(kind="unipc", num_inference_steps=4, clip_sample=False))
    # At the last step (alpha ~ 1) x0 ~ y: values up to ~2.5, so a max value of 2 rescales rather than clamps.
    y, eps, index = 1.2 * torch.randn(2, 16, 2), 0.01 * torch.randn(2, 16, 2), torch.full((2,), 3)
    torch.testing.assert_close(clip.predict_x0(y, eps, index), thresh1.predict_x0(y, eps, index))
    assert clip.predict_x0(y, eps, index).abs().max() <= 1.0 < none.predict_x0(y, eps, index).abs().max()
    assert not torch.allclose(thresh2.predict_x0(y, eps, index), clip.predict_x0(y, eps, index))
    assert thresh2.predict_x0(y, eps, index).abs().max() <= 1.0


def test_trailing_ddim_one_step_starts_from_pure_noise_level():
    assert Schedule(ScheduleConfig(kind="ddim", num_inference_steps=1)).timesteps.tolist() == [0]
    assert Schedule(
        ScheduleConfig(kind="ddim", num_inference_steps=1, timestep_spacing="trailing")
    ).timesteps.tolist() == [99]


@pytest.mark.parametrize("solver", ["paradigms", "parataa", "newton"])
def test_parallel_solvers_refuse_multistep_schedules(random_net, solver):
    schedule = Schedule(ScheduleConfig(kind="dpmpp2m", num_inference_steps=4))
    noise = Noise.draw(4, (1, 16, 2), torch.Generator().manual_seed(0))
    cond = torch.zeros(1, random_net.config.global_cond_dim)
    with pytest.raises(ValueError, match="multistep sampler"):
        make_solver(solver).solve(random_net, schedule, noise, cond)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"timestep_spacing": "sideways"}, "unknown timestep_spacing"),
        ({"kind": "ddpm", "timestep_spacing": "trailing"}, "not supported for ddpm"),
        ({"kind": "unipc", "thresholding": True, "sample_max_value": 0.5}, "sample_max_value >= 1"),
        ({"kind": "dpmpp2m", "thresholding": True, "dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
    ],
)
def test_bad_sampler_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_time_budget_returns_the_clean_prediction_flagged(random_net):
    from policy_accel.solvers.base import Budget

    schedule = Schedule(ScheduleConfig(kind="unipc", num_inference_steps=6))
    noise = Noise.draw(6, (1, 16, 2), torch.Generator().manual_seed(0))
    cond = torch.zeros(1, random_net.config.global_cond_dim)
    result = make_solver("sequential").solve(random_net, schedule, noise, cond, budget=Budget(max_iterations=2))
    assert result.iterations == 2 and not result.converged and result.stop_reason == "iteration_budget"
    assert torch.isfinite(result.sample).all() and result.sample.abs().max() <= 1.0
