"""Measured cost model: the denoiser call at every batch size, each named configuration's latency per inference
at batch 1, and how much of it is spent outside the network.

    python eval/latency.py                                            # this CPU, committed PushT checkpoint
    python eval/latency.py 'engines=[torch,openvino,onnxruntime]' bf16=true   # every CPU engine, one run
    python eval/latency.py device=cuda 'engines=[torch,cuda_graphs]'  # a GPU, eager vs CUDA graphs
    python eval/latency.py model=dp_original                          # DP's original-size U-Net
    python eval/latency.py 'configurations=[seq_ddim_10,newton_broyden_warm]'   # any configs/experiment/ names

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

import logging
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from policy_accel.errors import ConfigError, report_user_errors
from policy_accel.experiment.build import (
    SessionSetup,
    cfg_bool,
    cfg_device,
    cfg_int,
    prepare_out_dir,
    write_json_atomic,
    write_text_atomic,
)
from policy_accel.experiment.configurations import build_configuration, check_names
from policy_accel.experiment.hardware import hardware
from policy_accel.experiment.timing import flops_per_row, gemm_gflops, timing_policy
from policy_accel.model.engine import resolve_engine
from policy_accel.policy import DiffusionPolicy
from policy_accel.profiling import control_sequences
from policy_accel.solvers.sequential import fused_chain

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

    def chain(self, schedule, compile: bool = False):
        """The engine's whole-chain program, timed as network time (its T calls counted in ``batches``)."""
        program = fused_chain(self.forward, schedule, compile)
        if program is None:
            return None

        def timed(x_T, xi, cond):
            start = time.perf_counter()
            out = program(x_T, xi, cond)
            self.seconds += time.perf_counter() - start
            self.batches.extend([x_T.shape[0]] * schedule.num_steps)
            return out

        return timed


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


BLOCK_WARMUP, BLOCK_CALLS = 5, 5


def time_network_interleaved(policy: DiffusionPolicy, variants: list, use, batches: list[int], repeats: int) -> dict:
    """Median call time per batch size of every engine variant, the variants taking turns in blocks (one size at a
    time: interleaving sizes made the small ones slower, large calls evicting the caches). Each block times
    ``BLOCK_CALLS`` calls after ``BLOCK_WARMUP`` untimed ones: right after an eager block torch's OpenMP threads are
    still spinning on the cores, and an engine's first calls ran 2x slower (quiet probe, committed U-Net at batch 1:
    OpenVINO 1.83 ms over its first 3 calls after eager ones, 0.91 ms from the 6th on); a controller runs one engine."""
    device = policy.device
    H, A = policy.chunk_shape
    times: dict[str, dict[str, list[float]]] = {v: {str(b): [] for b in batches} for v, _ in variants}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, H, A, device=device)
            t = torch.randint(0, 100, (b,), device=device)
            c = torch.randn(b, policy.config.cond_dim, device=device)
            for rep in range(repeats + 1):
                for variant, options in variants:
                    use(variant, options)
                    block = []
                    for call in range(BLOCK_WARMUP + BLOCK_CALLS):
                        timer = NetworkTimer(policy.denoiser, device)
                        timer(x, t, c)
                        if call >= BLOCK_WARMUP:
                            block.append(timer.seconds)
                    if rep:  # the first round warms every variant up
                        times[variant][str(b)].append(float(np.median(block)))
    return {v: {b: float(np.median(ts) * 1e3) for b, ts in table.items()} for v, table in times.items()}


def network_table(policy: DiffusionPolicy, network_ms: dict[str, float], flops: float) -> dict:
    """An engine's call times with its attained GFLOP/s and its max deviation from the eager module."""
    H, A = policy.chunk_shape
    deviation = 0.0
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in network_ms:
            b = int(b)
            x = torch.randn(b, H, A, generator=gen).to(policy.device)
            t = torch.randint(0, policy.config.schedule.num_train_timesteps, (b,), generator=gen).to(policy.device)
            c = torch.randn(b, policy.config.cond_dim, generator=gen).to(policy.device)
            gap = (policy.denoiser(x, t, c) - policy.model(x, t, c)).abs().max()
            deviation = max(deviation, float(gap))
    return {
        "network_ms": network_ms,
        "gflops": {b: flops * int(b) / (ms * 1e-3) / 1e9 for b, ms in network_ms.items()},
        "max_abs_dev_vs_eager": deviation,
    }


@hydra.main(config_path="../configs", config_name="latency", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    names = check_names(list(cfg.configurations))
    check_options(cfg)
    engines = check_engines(list(cfg.engines), cfg.device)
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    policy = timing_policy(cfg.checkpoint, cfg.model, device, engines[0])
    # Every configuration is checked and built before the first is timed: a bad one fails in seconds, not later.
    # The setups share the policy, so each runs on whichever engine serves it at the time.
    shared = {"task": cfg.task, "checkpoint": cfg.checkpoint, "device": cfg.device, "threads": cfg.threads}
    setups = {
        name: build_configuration(name, values={**shared, "check_exactness": False}, policy=policy) for name in names
    }
    out_dir = prepare_out_dir(cfg.out_dir)
    flops = flops_per_row(policy)
    result = {
        "hardware": hardware(device, cfg.threads),
        "device": str(device),
        "model": cfg.model,
        "denoiser": policy.config.denoiser,
        "inpainting": policy.config.inpainting,
        "architecture": policy.config.to_dict()[policy.config.denoiser],
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "flops_per_row": flops,
        "gemm_gflops": {e: gemm_gflops(e) for e in ("torch", "openvino") if e in engines}
        if device.type == "cpu"
        else {},
        "baseline": engines[0],
        "engines": {},
    }
    sequences = control_sequences(
        cfg.task.dataset,
        cfg.task.get("obs_keys"),
        cfg.n_episodes,
        cfg.n_inferences,
        policy.config.n_action_steps,
        policy.config.n_obs_steps,
    )
    # Every comparison interleaved, so that the host's drift (this shared machine's speed moves by 20-50 % within
    # minutes) falls on all engines alike: call times batch by batch, then each configuration engine by engine.
    variants = [(e, {}) for e in engines]
    if cfg.dynamic and device.type == "cpu":  # OpenVINO's one dynamic-batch program (before static size buckets)
        variants.append(("openvino_dynamic", {"engine": "openvino", "static_shapes": False}))
    if cfg.fused and device.type == "cpu":  # short sequential chains as one program each
        variants.append(("openvino_fused", {"engine": "openvino", "fuse_chains": True}))
    if cfg.bf16 and device.type == "cpu":  # approximate: the call only, labelled, never a configuration's engine
        variants.append(("openvino_bf16", {"engine": "openvino", "precision": "bf16"}))

    def use(variant: str, options: dict) -> None:
        policy.use_engine(
            options.get("engine", variant), cfg.threads, **{k: v for k, v in options.items() if k != "engine"}
        )

    for variant, options in variants:
        use(variant, options)  # compile (or read the cache) before anything is timed
        result["engines"][variant] = {"engine": policy.engine.to_dict(), "samplers": {}}
    tables = time_network_interleaved(policy, variants, use, list(cfg.batches), cfg.repeats)
    for variant, _ in variants:
        use(variant, dict(variants)[variant])
        result["engines"][variant].update(network_table(policy, tables[variant], flops))
    for name, (run_cfg, setup) in tqdm(setups.items(), desc="latency", dynamic_ncols=True):
        for variant, options in variants:
            if variant == "openvino_bf16" or (variant == "openvino_fused" and setup.solver.name != "sequential"):
                continue  # bf16: the call only; fused: sequential chains only (others run as per-call openvino)
            use(variant, options)
            setup.session.prepare()
            if variant == "openvino_fused" and fused_chain(policy.denoiser, setup.session.schedule) is None:
                continue  # a chain too long or multistep: the same as per-call openvino
            table = result["engines"][variant]
            run_configuration(setup, sequences[:1], profile=False)  # warm-up (caches, the worker's request)
            timed = run_configuration(setup, sequences, profile=False)
            profiled = run_configuration(setup, sequences, profile=True)
            summary = summarize(timed, profiled, setup.session.warm.uses_previous, table["network_ms"])
            table["samplers"][name] = {"spec": describe(name, run_cfg, setup), **summary}
            log.info("%s on %s: %s", name, variant, {k: round(v, 3) for k, v in summary.items()})
        write_json_atomic(out_dir / "latency.json", result)
    write_json_atomic(out_dir / "latency.json", result)
    write_text_atomic(out_dir / "latency.md", markdown(result))
    print(markdown(result))


def check_options(cfg: DictConfig) -> None:
    """The run's own options, before anything is built or timed (each error names the key)."""
    cfg_device(cfg)
    for key in ("threads", "repeats", "n_episodes", "n_inferences"):
        cfg_int(cfg, key, minimum=1)
    batches = list(cfg.batches)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ConfigError(f"batches={batches} is not allowed: expected a non-empty list of integers >= 1")
    cfg_bool(cfg, "bf16")
    cfg_bool(cfg, "fused")
    cfg_bool(cfg, "dynamic")


def check_engines(engines: list, device: str) -> list[str]:
    """The engines to compare, the first being the baseline: each known and installed here, none twice."""
    if not engines or len(set(engines)) != len(engines):
        raise ConfigError(f"engines={engines} is not allowed: expected distinct engine names, e.g. [torch,openvino]")
    resolved = [resolve_engine(e, device) for e in engines]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"engines={engines} names one engine twice (auto is {resolve_engine('auto', device)} here)")
    return resolved


def markdown(result: dict) -> str:
    base = result["engines"][result["baseline"]]
    batches = list(base["network_ms"])
    limit = max(result["gemm_gflops"].values(), default=None)
    limit_text = (
        "; fp32 GEMM reference " + ", ".join(f"{e} {v:.0f}" for e, v in result["gemm_gflops"].items()) + " GFLOP/s"
        if limit
        else ""
    )
    lines = [
        f"# Latency report ({result['model']}, {result['parameters'] / 1e6:.2f} M parameters, "
        f"{result['flops_per_row'] / 1e6:.1f} MFLOP per row)",
        "",
        result["hardware"] + limit_text,
        "",
        "## Denoiser call (ms, median; speed-up vs " + result["baseline"] + " in this run)",
        "",
        "| engine | "
        + " | ".join(f"b={b}" for b in batches)
        + " | max dev vs eager | GFLOP/s at b=1"
        + (" | % of GEMM limit" if limit else "")
        + " |",
        "|---|" + "---|" * (len(batches) + 2 + bool(limit)),
    ]
    for name, table in result["engines"].items():
        label = f"{name} (approx.)" if table["engine"]["approximate"] else name
        cells = [
            f"{ms:.2f} ({base['network_ms'][b] / ms:.2f}x)" if name != result["baseline"] else f"{ms:.2f}"
            for b, ms in table["network_ms"].items()
        ]
        g1 = table["gflops"].get("1")
        row = f"| {label} | " + " | ".join(cells) + f" | {table['max_abs_dev_vs_eager']:.1e} | "
        row += f"{g1:.0f}" if g1 is not None else "–"
        row += f" | {100 * g1 / limit:.0f}% |" if limit and g1 is not None else (" | – |" if limit else " |")
        lines.append(row)
    lines += [
        "",
        "## Per inference at batch 1 (warm rows: warm inferences only)",
        "",
        "| engine | sampler | p50 ms | p95 ms | vs "
        + result["baseline"]
        + " | vs seq. DDPM-100 | rounds | network evals "
        "| network ms | outside network | cost-model ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, table in result["engines"].items():
        seq = table["samplers"].get("seq_ddpm100", {}).get("latency_ms_p50")
        for name, r in table["samplers"].items():
            ref = base["samplers"].get(name, {}).get("latency_ms_p50")
            vs_base = f"{ref / r['latency_ms_p50']:.2f}x" if ref and engine != result["baseline"] else "–"
            ratio = f"{seq / r['latency_ms_p50']:.2f}x" if seq else "–"
            label = f"{name} (approx.)" if r.get("spec", {}).get("approximate") else name  # not the sampler's output
            lines.append(
                f"| {engine} | {label} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p95']:.2f} | {vs_base} | {ratio} | "
                f"{r['iterations_mean']:.1f} | {r['nfe_mean']:.0f} | {r['network_ms_p50']:.2f} | "
                f"{100 * r['overhead_frac']:.1f}% | {r['cost_model_ms_p50']:.2f} |"
            )
    lines += [
        "",
        "Max dev: max |engine - eager module| over one random call at every batch size above (float32). GFLOP/s: "
        "FLOPs counted by torch's FLOP counter per row, over the median call time. Cost-model ms: the inference's "
        "network calls priced at the fixed-batch call times of its engine (its floor with zero overhead). All rows "
        "of this report ran in one process, one after another; compare only within it.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
