"""Per-round overhead of every solver outside the network (#26): operators dispatched and host reads per solve
(counted with a dispatch-mode counter, exact on any device), and time per round outside the network, at batch 1.

    python eval/overhead.py                                   # this CPU, committed PushT checkpoint
    python eval/overhead.py device=cuda      # a GPU (engine=auto: CUDA graphs)
    python eval/overhead.py device=cuda model=dp_original out_dir=reports/overhead/cuda_dp_original

Solves come from closed-loop-like sequences (the task dataset's episodes, one inference every n_action_steps
frames) through the Session the rollouts use; warm rows use exact warm starts with coupled noise and are
judged on their warm inferences. Each row runs a timed pass (wall time and time inside the network, device
synchronised around each call) and a counting pass (operators and host reads outside the network), then cold
solves with a zero-cost stand-in denoiser (zeros) to time the solver's own work alone. Writes overhead.json
(``{"hardware", "rows": [...]}``) and overhead.md.
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from policy_accel.errors import ConfigError, report_user_errors
from policy_accel.experiment.build import cfg_device, cfg_int, prepare_out_dir, write_json_atomic, write_text_atomic
from policy_accel.experiment.hardware import hardware
from policy_accel.experiment.timing import timing_policy
from policy_accel.policy import DiffusionPolicy
from policy_accel.profiling import ProfiledSolver, control_sequences
from policy_accel.session import Session
from policy_accel.solvers import make_solver

log = logging.getLogger("overhead")


def run(policy: DiffusionPolicy, schedule, solver, warm: bool, sequences, count: bool) -> list:
    """Drive one solver through the control sequences; the solve records of the inferences this row judges.
    The same solver instance serves every pass, so its per-shape buffers are built in the warm-up pass."""
    profiled = ProfiledSolver(solver, count=count)
    noise = "coupled" if warm else "fresh"
    session = Session(policy, profiled, schedule, warm_start=warm, noise=noise)
    for i, seq in enumerate(sequences):
        session.reset(seed=i)
        for obs in seq:
            session.plan(obs[None])
    return [r for r in profiled.records if r.warm == warm]


def standin_ms_per_round(policy: DiffusionPolicy, schedule, spec: dict, repeats: int) -> float:
    """Cold solves whose denoiser costs nothing (zeros): the solver's own time per round."""
    solver = make_solver(spec["solver"], **spec.get("options", {}))
    cond = torch.zeros(1, policy.config.cond_dim, device=policy.device)
    generator = torch.Generator().manual_seed(0)

    def zeros(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    per_round = []
    with torch.inference_mode():
        for k in range(repeats + 1):
            noise = policy.draw_noise(schedule, 1, generator)
            ProfiledSolver(solver).solve(zeros, schedule, noise, cond)  # builds buffers; then timed below
            profiled = ProfiledSolver(solver)
            result = profiled.solve(zeros, schedule, noise, cond)
            if k:  # the first repeat warms caches
                per_round.append(profiled.records[0].solve_s * 1e3 / result.iterations)
    return float(np.median(per_round))


def check_rows(cfg: DictConfig, policy: DiffusionPolicy) -> dict:
    """The solver rows (an entry set to null on the command line, e.g. solvers.parataa=null, is skipped), each solver
    and schedule built once here so that a bad one fails in seconds with its key, not after minutes of timing."""
    specs = {k: v for k, v in OmegaConf.to_container(cfg.solvers).items() if v is not None}
    if not specs:
        raise ConfigError("solvers: every row is null; nothing to measure")
    for name, spec in specs.items():
        if not isinstance(spec, dict) or "solver" not in spec:
            raise ConfigError(f"solvers.{name}={spec!r} is not allowed: expected {{solver: NAME, options: {{...}}}}")
        try:
            make_solver(spec["solver"], **(spec.get("options") or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"solvers.{name}: {err}") from None
        if not isinstance(spec.get("warm", False), bool):
            raise ConfigError(f"solvers.{name}.warm={spec['warm']!r} is not allowed: expected true or false")
    for label, overrides in OmegaConf.to_container(cfg.schedules).items():
        if overrides is None:
            continue
        try:
            policy.schedule(**overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"schedules.{label}={overrides!r} is not allowed: {err}") from None
    return specs


@hydra.main(config_path="../configs", config_name="overhead", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    cfg_device(cfg)
    for key in ("threads", "n_episodes", "n_inferences", "standin_repeats"):
        cfg_int(cfg, key, minimum=1)
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    policy = timing_policy(cfg.checkpoint, cfg.model, device, cfg.engine)
    specs = check_rows(cfg, policy)  # every row buildable before the first is timed (minutes later)
    out_dir = prepare_out_dir(cfg.out_dir)
    sequences = control_sequences(
        cfg.task.dataset,
        cfg.task.get("obs_keys"),
        cfg.n_episodes,
        cfg.n_inferences,
        policy.config.n_action_steps,
        policy.config.n_obs_steps,
    )
    result = {"hardware": hardware(device, cfg.threads), "engine": policy.engine.to_dict(), "rows": []}
    standin = {}
    started = time.perf_counter()
    for label, overrides in OmegaConf.to_container(cfg.schedules).items():
        if overrides is None:
            continue
        schedule = policy.schedule(**overrides)
        for name, spec in specs.items():
            solver = make_solver(spec["solver"], **spec.get("options", {}))
            warm = bool(spec.get("warm", False))
            run(policy, schedule, solver, warm, [sequences[0][:2]], count=False)  # warm-up: buffers, caches, graphs
            timed = run(policy, schedule, solver, warm, sequences, count=False)
            counted = run(policy, schedule, solver, warm, sequences, count=True)
            rounds = float(np.mean([r.rounds for r in timed]))
            solve_ms = float(np.median([r.solve_s for r in timed]) * 1e3)
            network_ms = float(np.median([r.network_s for r in timed]) * 1e3)
            row = {
                "solver": name,
                "schedule": label,
                "warm": warm,
                "rounds": rounds,
                "solver_ops_per_round": float(np.mean([r.ops / r.rounds for r in counted])),
                "host_reads_per_solve": float(np.mean([r.host_reads for r in counted])),
                "overhead_ms_per_round": float(np.median([(r.solve_s - r.network_s) * 1e3 / r.rounds for r in timed])),
                "network_ms": network_ms,
                "solve_ms": solve_ms,
            }
            result["rows"].append(row)
            standin[(name, label)] = standin_ms_per_round(policy, schedule, spec, cfg.standin_repeats)
            log.info("%s %s: %s, stand-in %.3f ms/round", name, label, row, standin[(name, label)])
            write_json_atomic(out_dir / "overhead.json", result)
    command = "python eval/overhead.py " + " ".join(sys.argv[1:])
    write_text_atomic(
        out_dir / "overhead.md", markdown(result, standin, command.strip(), time.perf_counter() - started)
    )


def markdown(result: dict, standin: dict, command: str, seconds: float) -> str:
    lines = [
        "# Per-round overhead outside the network (batch 1)",
        "",
        f"{result['hardware']}; denoiser engine: {result['engine']['name']} {result['engine']['version']}",
        "",
        f"Made by `{command}` ({seconds / 60:.0f} min). Operators and host reads are counted with a dispatch-mode "
        "counter (`policy_accel.profiling.OpCounter`): every ATen operator of one solve outside its network calls, "
        "views included, a composite operator (einsum, matmul) once; host reads are `item`/`bool`/`nonzero`/boolean "
        "indexing, copies off a device, and `tolist`/numpy reads counted where the library makes them. Those counts "
        "are exact and do not depend on the machine. Times are medians over the row's solves, measured while other "
        "jobs may have been running on this machine: read them as indicative. `overhead ms/round` = (solve - time "
        "inside network calls) / rounds with the real network; `stand-in ms/round` = a cold solve's time per round "
        "with a zero-cost denoiser (zeros), i.e. the solver's own work alone (its rounds differ from the real "
        "network's).",
        "",
        "| solver | schedule | warm | rounds | ops/round | host reads/solve | overhead ms/round | stand-in ms/round "
        "| network ms | solve ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['solver']} | {r['schedule']} | {'yes' if r['warm'] else 'no'} | {r['rounds']:.1f} | "
            f"{r['solver_ops_per_round']:.1f} | {r['host_reads_per_solve']:.1f} | {r['overhead_ms_per_round']:.2f} | "
            f"{standin[(r['solver'], r['schedule'])]:.2f} | {r['network_ms']:.1f} | {r['solve_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
