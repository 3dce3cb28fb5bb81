"""Measured cost model: the denoiser call at every batch size, each named configuration's latency per inference
at batch 1, and how much of it is spent outside the network.

    python eval/latency.py                                            # this CPU, committed PushT checkpoint
    python eval/latency.py device=cuda cuda_graphs=true               # a GPU, with CUDA graphs
    python eval/latency.py device=cuda cuda_graphs=true model=dp_original   # DP's original-size U-Net
    python eval/latency.py 'configurations=[seq_ddim10,newton_broyden_warm]'   # any configs/experiment/ names

Configurations are named configurations (``configs/experiment/<name>.yaml``,
policy_accel/experiment/configurations.py), each
built by ``build_session`` on the one network timed here (``checkpoint``, or ``model=dp_original``) with this
run's task, device and threads, and ``check_exactness`` off (its untimed reference solve would count as network
time). Latencies come from closed-loop-like sequences: the task dataset's episodes, one inference every
``n_action_steps`` frames, through the setup's Session as in a rollout (so warm starts see a shifted
previous trajectory and a new observation). Each configuration runs twice: a timed pass, and a profiled pass that
also times every network call (synchronising the device around it) to split the latency into network and
everything else. Writes ``latency.json`` and ``latency.md``.
"""

from __future__ import annotations

import json
import logging
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from policy_accel.errors import report_user_errors
from policy_accel.experiment.build import SessionSetup, prepare_out_dir
from policy_accel.experiment.configurations import build_configuration, check_names
from policy_accel.experiment.hardware import hardware
from policy_accel.experiment.timing import timing_policy
from policy_accel.policy import DiffusionPolicy
from policy_accel.profiling import control_sequences

log = logging.getLogger("latency")


class NetworkTimer:
    """Wraps the denoiser and accumulates the time spent inside it (device synchronised) and its batch sizes."""

    def __init__(self, forward, device: torch.device):
        self.forward, self.device, self.seconds, self.batches = forward, device, 0.0, []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, *args):
        self._sync()
        start = time.perf_counter()
        out = self.forward(*args)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.batches.append(args[0].shape[0])
        return out


def cost_model_ms(network_ms: dict[str, float], batches: list[int]) -> float:
    """What these calls would cost at the measured fixed-batch call times (linear in between and beyond):
    the network-only time of an inference, the floor its latency could reach with zero overhead."""
    sizes = np.array([int(b) for b in network_ms], dtype=float)
    times = np.array(list(network_ms.values()))
    order = np.argsort(sizes)
    sizes, times = sizes[order], times[order]
    b = np.asarray(batches, dtype=float)
    inside = np.interp(b, sizes, times)
    beyond = times[-1] * b / sizes[-1]
    return float(np.where(b > sizes[-1], beyond, inside).sum())


def time_network(policy: DiffusionPolicy, batches: list[int], repeats: int) -> dict[str, float]:
    """Median call time per batch size, each size timed in a block of consecutive calls as solvers make them
    (interleaving sizes made the small ones ~30 % slower: the large calls before them evict the caches)."""
    device = policy.device
    H, A = policy.chunk_shape
    out = {}
    for b in batches:
        x = torch.randn(b, H, A, device=device)
        t = torch.randint(0, 100, (b,), device=device)
        c = torch.randn(b, policy.config.unet.global_cond_dim, device=device)
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 2):
                timer = NetworkTimer(policy.denoiser, device)
                timer(x, t, c)
                times.append(timer.seconds)
        out[str(b)] = float(np.median(times[2:]) * 1e3)
    return out


def run_configuration(setup: SessionSetup, sequences: list[np.ndarray], profile: bool) -> list[tuple]:
    """(warm, latency ms, network ms, rounds, network evaluations, call batch sizes) for every inference."""
    policy, session = setup.policy, setup.session
    timer = NetworkTimer(policy._forward, policy.device)
    if profile:
        policy._forward = timer
    rows = []
    try:
        for i, seq in enumerate(sequences):
            session.reset(seed=i)
            for k, obs in enumerate(seq):
                timer.seconds, timer.batches = 0.0, []
                _, _, record = session.plan(obs[None])
                rows.append(
                    (k > 0, record.latency_s * 1e3, timer.seconds * 1e3, record.iterations, record.nfe, timer.batches)
                )
    finally:
        policy._forward = timer.forward
    return rows


def describe(name: str, cfg: DictConfig, setup: SessionSetup) -> dict:
    """What a configuration ran, recorded beside its figures (``spec`` in latency.json)."""
    return {
        "experiment": name,
        "solver": setup.solver.name,
        "options": OmegaConf.to_container(cfg.solver.options, resolve=True),
        "schedule": OmegaConf.to_container(cfg.policy.schedule, resolve=True),
        "warm_start": setup.warm_start,
        "noise": setup.session.noise,
        "approximate": setup.session.approximate,
    }


def summarize(timed: list, profiled: list, warm: bool, network_ms: dict[str, float]) -> dict:
    # Warm configurations are judged on their warm inferences (an episode's first is a cold solve).
    pick = [r for r in timed if r[0] == warm] if warm else timed
    prof = [r for r in profiled if r[0] == warm] if warm else profiled
    latency = float(np.median([r[1] for r in pick]))
    prof_latency = float(np.median([r[1] for r in prof]))
    network = float(np.median([r[2] for r in prof]))
    return {
        "latency_ms_p50": latency,
        "latency_ms_p95": float(np.percentile([r[1] for r in pick], 95)),
        "iterations_mean": float(np.mean([r[3] for r in pick])),
        "nfe_mean": float(np.mean([r[4] for r in pick])),
        "profiled_latency_ms_p50": prof_latency,
        "network_ms_p50": network,
        "overhead_frac": max(0.0, 1.0 - network / prof_latency),
        "cost_model_ms_p50": float(np.median([cost_model_ms(network_ms, r[5]) for r in prof])),
        "n": len(pick),
    }


@hydra.main(config_path="../configs", config_name="latency", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    names = check_names(list(cfg.configurations))
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    policy = timing_policy(cfg.checkpoint, cfg.model, device, cfg.cuda_graphs)
    # Every configuration is checked and built before the first is timed: a bad one fails in seconds, not later.
    shared = {"task": cfg.task, "checkpoint": cfg.checkpoint, "device": cfg.device, "threads": cfg.threads}
    setups = {
        name: build_configuration(name, values={**shared, "check_exactness": False}, policy=policy) for name in names
    }
    out_dir = prepare_out_dir(cfg.out_dir)
    result = {
        "hardware": hardware(device, cfg.threads),
        "device": str(device),
        "model": cfg.model,
        "unet_down_dims": list(policy.config.unet.down_dims),
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "cuda_graphs": bool(cfg.cuda_graphs),
        "network_ms": time_network(policy, list(cfg.batches), cfg.repeats),
        "samplers": {},
    }
    log.info("%s; network ms by batch: %s", result["hardware"], result["network_ms"])
    task = cfg.task
    sequences = control_sequences(
        task.dataset,
        task.get("obs_keys"),
        cfg.n_episodes,
        cfg.n_inferences,
        policy.config.n_action_steps,
        policy.config.n_obs_steps,
    )
    for name, (run_cfg, setup) in tqdm(setups.items(), desc="latency", dynamic_ncols=True):
        run_configuration(setup, sequences[:1], profile=False)  # warm-up (graphs, caches)
        timed = run_configuration(setup, sequences, profile=False)
        profiled = run_configuration(setup, sequences, profile=True)
        summary = summarize(timed, profiled, setup.warm_start is not False, result["network_ms"])
        result["samplers"][name] = {"spec": describe(name, run_cfg, setup), **summary}
        log.info("%s: %s", name, {k: round(v, 3) for k, v in summary.items()})
        (out_dir / "latency.json").write_text(json.dumps(result, indent=1))
    (out_dir / "latency.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    seq = result["samplers"].get("seq_ddpm100", {}).get("latency_ms_p50")
    seq_model = result["samplers"].get("seq_ddpm100", {}).get("cost_model_ms_p50")
    lines = [
        f"# Latency report ({result['model']}, {result['parameters'] / 1e6:.2f} M parameters, "
        f"CUDA graphs {'on' if result['cuda_graphs'] else 'off'})",
        "",
        result["hardware"],
        "",
        "## Denoiser call (ms, median)",
        "",
        "| batch | " + " | ".join(result["network_ms"]) + " |",
        "|---|" + "---|" * len(result["network_ms"]),
        "| ms | " + " | ".join(f"{v:.2f}" for v in result["network_ms"].values()) + " |",
        "",
        "## Per inference at batch 1 (warm rows: warm inferences only)",
        "",
        "| sampler | p50 ms | p95 ms | vs seq. DDPM-100 | rounds | network evals | network ms | outside network "
        "| cost-model ms | cost-model ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["samplers"].items():
        ratio = f"{seq / r['latency_ms_p50']:.2f}x" if seq else "–"
        ceiling = f"{seq_model / r['cost_model_ms_p50']:.2f}x" if seq_model else "–"
        label = f"{name} (approx.)" if r.get("spec", {}).get("approximate") else name  # not the sampler's output
        lines.append(
            f"| {label} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p95']:.2f} | {ratio} | "
            f"{r['iterations_mean']:.1f} | {r['nfe_mean']:.0f} | {r['network_ms_p50']:.2f} | "
            f"{100 * r['overhead_frac']:.1f}% | {r['cost_model_ms_p50']:.2f} | {ceiling} |"
        )
    lines += [
        "",
        "Cost-model ms: the inference's network calls priced at the fixed-batch call times above (its floor with "
        "zero overhead); cost-model ceiling: sequential DDPM-100's cost-model ms over this one (the speed-up if "
        "both ran at that floor).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
