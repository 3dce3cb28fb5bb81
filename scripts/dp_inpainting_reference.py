"""DP's own DiffusionUnetLowdimPolicy (obs_as_global_cond=False) vs our inpainting policy: same weights
(checkpoints/pusht_inpainting loaded strictly into DP's ConditionalUnet1D), same normalizers, same noise (DP's
generator order: x_T, then one draw per step t > 0), observations from the demonstrations. Prints max |ours - DP|
(2026-12-06: 0.0 on 3 seeds x 4 rows, normalized action channels and executed raw actions).

Set-up (DP's source is not installable here; only these Python files are needed, einops from
scripts/vision_reference.py's /tmp/tv, diffusers is in the venv):

    G=<a git dir of real-stanford/diffusion_policy>
    for f in __init__.py policy/__init__.py policy/diffusion_unet_lowdim_policy.py policy/base_lowdim_policy.py \
        model/__init__.py model/common/__init__.py model/common/normalizer.py model/common/module_attr_mixin.py \
        model/common/dict_of_tensor_mixin.py model/diffusion/__init__.py model/diffusion/conditional_unet1d.py \
        model/diffusion/conv1d_components.py model/diffusion/positional_embedding.py \
        model/diffusion/mask_generator.py common/__init__.py common/pytorch_util.py; do
      mkdir -p /tmp/dpfull/diffusion_policy/$(dirname $f)
      out=/tmp/dpfull/diffusion_policy/$f
      git --git-dir=$G show HEAD:diffusion_policy/$f > $out || touch $out
    done
    PYTHONPATH=/tmp/dpfull:/tmp/tv:. .venv/bin/python scripts/dp_inpainting_reference.py
"""

import numpy as np
import torch
import zarr
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusion_policy.model.common.normalizer import LinearNormalizer as DPNorm
from diffusion_policy.model.common.normalizer import SingleFieldLinearNormalizer
from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D as DPUnet
from diffusion_policy.policy.diffusion_unet_lowdim_policy import DiffusionUnetLowdimPolicy

from policy_accel.io.checkpoint import load_policy
from policy_accel.solvers import make_solver
from policy_accel.solvers.base import Noise

torch.set_num_threads(1)
ours = load_policy("checkpoints/pusht_inpainting", engine="torch")
c = ours.config
u = c.unet
net = DPUnet(
    input_dim=u.input_dim,
    local_cond_dim=None,
    global_cond_dim=None,
    diffusion_step_embed_dim=u.diffusion_step_embed_dim,
    down_dims=list(u.down_dims),
    kernel_size=u.kernel_size,
    n_groups=u.n_groups,
    cond_predict_scale=u.cond_predict_scale,
)
missing = net.load_state_dict(ours.model.state_dict(), strict=True)
net.eval()
sched = DDPMScheduler(
    num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon"
)
dp = DiffusionUnetLowdimPolicy(
    model=net,
    noise_scheduler=sched,
    horizon=c.horizon,
    obs_dim=c.obs_dim,
    action_dim=c.action_dim,
    n_action_steps=c.n_action_steps,
    n_obs_steps=c.n_obs_steps,
    obs_as_local_cond=False,
    obs_as_global_cond=False,
    pred_action_steps_only=False,
)
norm = DPNorm()
norm["obs"] = SingleFieldLinearNormalizer.create_manual(ours.obs_normalizer.scale, ours.obs_normalizer.offset, {})
norm["action"] = SingleFieldLinearNormalizer.create_manual(
    ours.action_normalizer.scale, ours.action_normalizer.offset, {}
)
dp.set_normalizer(norm)
dp.eval()

root = zarr.open("data/pusht/expert.zarr", "r")
kp = np.asarray(root["data/keypoint"][:400]).reshape(400, -1)
st = np.asarray(root["data/state"][:400])
obs_all = np.concatenate([kp, st[:, :2]], axis=1).astype(np.float32)
B, T = 4, 100
idx = np.array([10, 100, 200, 350])
obs = np.stack([obs_all[i - 1 : i + 1] for i in idx])  # (B, 2, 18)
worst = 0.0
for seed in range(3):
    # DP draws x_T then one randn per step t > 0 from the same generator, in that order
    g = torch.Generator().manual_seed(seed)
    shape = (B, c.horizon, c.chunk_dim)
    x_T = torch.randn(shape, generator=g)
    z = torch.stack([torch.randn(shape, generator=g) for _ in range(T - 1)] + [torch.zeros(shape)])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nobs = dp.normalizer["obs"].normalize(torch.from_numpy(obs))
        cond_data = torch.zeros(shape)
        cond_mask = torch.zeros(shape, dtype=torch.bool)
        cond_data[:, : c.n_obs_steps, c.action_dim :] = nobs
        cond_mask[:, : c.n_obs_steps, c.action_dim :] = True
        dp_sample = dp.conditional_sample(cond_data, cond_mask, generator=g)
        cond = ours.condition(obs)
        res = make_solver("sequential").solve(ours.denoiser, ours.schedule(), Noise(x_T, z), cond)
    d_all = float((res.sample[..., : c.action_dim] - dp_sample[..., : c.action_dim]).abs().max())
    dp_raw = dp.normalizer["action"].unnormalize(
        dp_sample[:, c.n_obs_steps - 1 : c.n_obs_steps - 1 + c.n_action_steps, : c.action_dim]
    )
    d_raw = float((torch.from_numpy(ours.actions(res.sample)) - dp_raw).abs().max())
    worst = max(worst, d_all)
    print(f"seed {seed}: max |ours - DP| normalized action channels {d_all:.2e}, executed raw actions {d_raw:.2e}")
print("WORST", worst)
