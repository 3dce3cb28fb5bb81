"""The policy the timing tools measure (``eval/latency.py``, ``eval/overhead.py``): one definition, so both time the
same network for the same ``model`` choice."""

from __future__ import annotations

import time

import numpy as np
import torch

from policy_accel.errors import ConfigError
from policy_accel.io.checkpoint import load_policy
from policy_accel.model.unet import ConditionalUnet1D, UNetConfig
from policy_accel.policy import DiffusionPolicy, PolicyConfig


def timing_policy(checkpoint: str, model: str, device: torch.device, engine: str = "auto") -> DiffusionPolicy:
    """The checkpoint's policy, or Diffusion Policy's original-size U-Net on it (random weights, timing only), on
    ``device`` and served by ``engine`` (policy_accel/model/engine.py): what the timing tools (latency, overhead)
    measure."""
    policy = load_policy(checkpoint, engine="torch")
    if model == "dp_original":
        if policy.config.denoiser != "unet" or policy.config.inpainting:
            raise ConfigError(
                f"model=dp_original swaps in DP's original-size FiLM U-Net, which needs a FiLM U-Net checkpoint; "
                f"{checkpoint} holds a {policy.config.denoiser}{' with inpainting' if policy.config.inpainting else ''}"
            )
        torch.manual_seed(0)
        unet = UNetConfig(
            input_dim=policy.config.action_dim,
            global_cond_dim=policy.config.cond_dim,
            diffusion_step_embed_dim=256,
            down_dims=[256, 512, 1024],
        )
        config = PolicyConfig(**{**policy.config.to_dict(), "unet": unet})
        policy = DiffusionPolicy(config, ConditionalUnet1D(unet), policy.obs_normalizer, policy.action_normalizer)
    elif model != "checkpoint":
        raise ConfigError(f"unknown model {model!r}; valid: checkpoint, dp_original")
    return policy.to(device).use_engine(engine)


def flops_per_row(policy: DiffusionPolicy) -> float:
    """Floating-point operations of one batch-1 denoiser call, counted by torch's FLOP counter on the eager module
    (convolutions and matrix products: what bounds the call; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = policy.device
    x = torch.zeros((1, *policy.chunk_shape), device=device)
    c = torch.zeros((1, policy.config.cond_dim), device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        policy.model(x, torch.zeros(1, device=device), c)
    return float(counter.get_total_flops())


def gemm_gflops(engine: str, n: int = 2048, repeats: int = 5) -> float:
    """This machine's attained fp32 matrix-product rate (GFLOP/s, median of ``repeats`` n x n x n products) in
    ``engine``'s kernels (torch or openvino): the reference limit a denoiser call is compared with."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    if engine == "openvino":
        import openvino as ov
        import openvino.opset13 as ops

        param = ops.parameter([n, n], ov.Type.f32)
        model = ov.Model([ops.matmul(param, ops.constant(b.numpy()), False, False)], [param])
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()

        def run() -> None:
            request.infer([a.numpy()], share_inputs=True, share_outputs=True)
    elif engine == "torch":

        def run() -> None:
            torch.mm(a, b)
    else:
        raise ValueError(f"no GEMM reference for engine {engine!r}")
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times)) / 1e9
