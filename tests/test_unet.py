"""The denoiser has Diffusion Policy's architecture and state-dict names."""

from __future__ import annotations

from pathlib import Path

import torch

from policy_accel.model.unet import ConditionalUnet1D, UNetConfig

DP_KEYS = Path(__file__).parent / "data" / "dp_pusht_lowdim_unet_keys.txt"


def _dp_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Diffusion Policy's PushT low-dim U-Net (down_dims 256/512/1024, step embedding 256, 2 x 20 obs)."""
    shapes = {}
    for line in DP_KEYS.read_text().splitlines():
        name, shape = line.split(" ", 1)
        shapes[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def test_state_dict_names_and_shapes_match_diffusion_policy():
    config = UNetConfig(input_dim=2, global_cond_dim=40, diffusion_step_embed_dim=256, down_dims=[256, 512, 1024])
    ours = {k: tuple(v.shape) for k, v in ConditionalUnet1D(config).state_dict().items()}
    assert ours == _dp_state_dict_shapes()


def test_a_dp_state_dict_loads_strictly():
    config = UNetConfig(input_dim=2, global_cond_dim=40, diffusion_step_embed_dim=256, down_dims=[256, 512, 1024])
    state = {k: torch.zeros(s) for k, s in _dp_state_dict_shapes().items()}
    ConditionalUnet1D(config).load_state_dict(state, strict=True)


def test_per_sample_timesteps_equal_separate_calls(random_net):
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(3, 16, 2, generator=g), torch.randn(3, 36, generator=g)
    t = torch.tensor([99, 50, 0])
    with torch.no_grad():
        batched = random_net(x, t, cond)
        for i in range(3):
            single = random_net(x[i : i + 1], t[i : i + 1], cond[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)
        assert random_net(x, torch.tensor(7), cond).shape == (3, 16, 2)
