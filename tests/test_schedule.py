"""Our batched step functions against diffusers' own ``step`` at every timestep."""

from __future__ import annotations

import pytest
import torch

from policy_accel.schedule import Schedule, ScheduleConfig

SAMPLERS = [("ddpm", 100), ("ddpm", 10), ("ddim", 10), ("ddim", 16), ("ddim", 100)]


@pytest.mark.parametrize("kind,steps", SAMPLERS)
def test_step_matches_diffusers_at_every_timestep(kind, steps):
    config = ScheduleConfig(kind=kind, num_inference_steps=steps)
    schedule = Schedule(config)
    scheduler = config.make_scheduler()
    assert schedule.num_steps == steps
    g = torch.Generator().manual_seed(0)
    # Scale 2 so that some predicted x0 exceed [-1, 1] and clipping is exercised.
    y = 2 * torch.randn(3, 16, 2, generator=g)
    eps = torch.randn(3, 16, 2, generator=g)
    for j, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(eps, t, y, generator=torch.Generator().manual_seed(j)).prev_sample
        z = torch.randn(y.shape, generator=torch.Generator().manual_seed(j))
        index = torch.full((3,), j)
        ours = schedule.step(y, eps, index) + schedule.noise_scale[j] * z
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6, msg=f"{kind}-{steps} step {j} (t={int(t)})")


def test_step_applies_a_different_timestep_per_row():
    schedule = Schedule(ScheduleConfig(kind="ddim", num_inference_steps=16))
    y, eps = torch.randn(4, 16, 2), torch.randn(4, 16, 2)
    rows = torch.tensor([0, 5, 9, 15])
    batched = schedule.step(y, eps, rows)
    for i, j in enumerate(rows):
        single = schedule.step(y[i : i + 1], eps[i : i + 1], j.view(1))
        torch.testing.assert_close(batched[i : i + 1], single)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "dpm"}, "unknown schedule kind"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"prediction_type": "sample"}, "prediction_type"),
    ],
)
def test_bad_schedule_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)
