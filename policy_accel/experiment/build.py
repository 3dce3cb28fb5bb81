"""One function builds a policy setup from a run config, so every entry point honours every option alike.

``eval/rollout.py`` and ``eval/realtime.py`` (and the soak) read the same config groups (``task``, ``solver``,
``policy``) and the same run options (``checkpoint``, ``trust_pickle``, ``warm_start``, ``tail_fill``,
``renoise_steps``, ``budget``, ``check_exactness``, ...). Building the policy, schedule, solver and session in one
place is what keeps the real-time loop from running another policy than the rollout would. Every value is
checked here, once, with an error that names the user's key, the value and what is allowed.

Run identity (:func:`run_id`) lives here too; output directories are claimed for a whole run and written
atomically by :mod:`policy_accel.experiment.outputs` (its helpers are re-exported here).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from policy_accel.errors import ConfigError
from policy_accel.experiment.outputs import prepare_out_dir, write_json_atomic, write_text_atomic
from policy_accel.io.checkpoint import load_policy
from policy_accel.model.engine import ENGINES, PRECISIONS, resolve_engine
from policy_accel.policy import DiffusionPolicy
from policy_accel.schedule import Schedule, ScheduleConfig
from policy_accel.schema import FieldError, Ge, Gt, Le, MinLen, check_mapping, check_value
from policy_accel.session import NOISE_POLICIES, Session
from policy_accel.solvers import SOLVERS, make_solver
from policy_accel.solvers.base import Budget, Solver
from policy_accel.warm_starts import TAIL_FILLS, is_warm_start, options_key, warm_start_choices

_ABSENT = object()
# Keys that never change a result (where it goes, whether it is skipped, a GIF): left out of the run identity.
RUN_CONTROL_KEYS = ("hydra", "out_dir", "skip_existing", "save_video", "offline_results", "soak")


# ------------------------------------------------------------------------------------------------
# typed reads of config values: one line naming the key, the value and what is allowed
# ------------------------------------------------------------------------------------------------


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return None if value is _ABSENT else value


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _read(cfg: DictConfig, key: str, hint: Any, optional: bool) -> Any:
    """``key``'s value checked against ``hint`` by the one schema checker (policy_accel/schema.py)."""
    return check_value(_get(cfg, key), hint | None if optional else hint, key)


def cfg_int(cfg: DictConfig, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
    """An integer (not a bool, not a string) >= ``minimum``; ``optional`` allows null."""
    return _read(cfg, key, int if minimum is None else Annotated[int, Ge(minimum)], optional)


def cfg_float(
    cfg: DictConfig,
    key: str,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    optional: bool = False,
) -> float | None:
    """A finite number in [minimum, maximum] (``strict``: > minimum); ``optional`` allows null."""
    bounds = [] if minimum is None else [Gt(minimum) if strict else Ge(minimum)]
    bounds += [] if maximum is None else [Le(maximum)]
    value = _read(cfg, key, Annotated[(float, *bounds)] if bounds else float, optional)
    return None if value is None else float(value)


def cfg_bool(cfg: DictConfig, key: str) -> bool:
    """A real boolean: ``"no"``, ``"false"``, 0 or 1 are refused, never guessed."""
    return _read(cfg, key, bool, optional=False)


def cfg_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> str:
    return _read(cfg, key, Literal[tuple(choices)], optional=False)


def cfg_str(cfg: DictConfig, key: str, optional: bool = False) -> str | None:
    return _read(cfg, key, Annotated[str, MinLen(1)], optional)


def cfg_warm_start(cfg: DictConfig) -> bool | str:
    """``warm_start``: false, true (exact) or an approximate kind (policy_accel/warm_starts.py); results.json records
    this."""
    value = _get(cfg, "warm_start")
    if is_warm_start(value):
        return value
    raise _bad("warm_start", value, warm_start_choices())


def cfg_warm_options(cfg: DictConfig, warm_start: bool | str) -> dict | None:
    """The knobs of a warm start that has a mapping of them (``rti``, ``falcon``, ...), None for the others."""
    key = options_key(warm_start)
    if key is None or key not in cfg:
        return None
    value = _get(cfg, key)
    if not isinstance(value, dict):
        raise _bad(key, value, f"a mapping of {key} options (see policy_accel/warm_starts.py)")
    return value


def cfg_seeds(cfg: DictConfig) -> list[int]:
    """``seeds`` (a non-empty list of integers) or ``n_episodes`` seeds from ``start_seed``."""
    seeds = _get(cfg, "seeds")
    if seeds is not None:
        ints = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        if not ints or not seeds:
            raise _bad("seeds", seeds, "a non-empty list of integers, e.g. seeds=[100000,100003], or null")
        if len(set(seeds)) != len(seeds):
            raise _bad("seeds", seeds, "distinct seeds (each episode once)")
        return list(seeds)
    start = cfg_int(cfg, "start_seed", minimum=0)
    return list(range(start, start + cfg_int(cfg, "n_episodes", minimum=1)))


def cfg_device(cfg: DictConfig) -> str:
    value = cfg_str(cfg, "device")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise _bad("device", value, "a torch device such as cpu, cuda or cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _bad("device", value, "cpu (no CUDA device is available here)")
    return value


def cfg_budget(cfg: DictConfig) -> Budget | None:
    """``budget.max_iterations`` (rounds) and ``budget.time_ms`` (wall clock per inference); None when neither."""
    rounds = cfg_int(cfg, "budget.max_iterations", minimum=1, optional=True)
    time_ms = None
    if "time_ms" in cfg.budget:
        time_ms = cfg_float(cfg, "budget.time_ms", minimum=0, strict=True, optional=True)
    if rounds is None and time_ms is None:
        return None
    return Budget(rounds, None if time_ms is None else time_ms / 1e3)


# ------------------------------------------------------------------------------------------------
# the setup
# ------------------------------------------------------------------------------------------------


@dataclass
class SessionSetup:
    """Everything a run needs, built from one config the same way for every entry point."""

    policy: DiffusionPolicy
    schedule: Schedule
    solver: Solver
    session: Session
    checkpoint: str  # what was loaded (default: the task's checkpoint)
    seeds: list[int]
    warm_start: bool | str
    device: str
    threads: int


_Layout = tuple[dict[str, list[int]], dict[str, int]]  # an image observation: camera (C, H, W)s and low-dim sizes


def _observes(layout: _Layout | None, obs_dim: int | None) -> str:
    return f"a low-dim vector (obs_dim={obs_dim})" if layout is None else f"cameras {layout[0]} and low-dim {layout[1]}"


def check_task_dims(policy: DiffusionPolicy, task: DictConfig, checkpoint: str) -> None:
    """Refuse a policy whose observations or action size differ from the task's: it was trained for something else.
    An image task (``cameras``, ``low_dim``) needs a policy whose encoder takes exactly those, a low-dim task
    (``obs_dim``) a policy without an encoder."""
    encoder = policy.config.encoder
    if "cameras" in task or encoder is not None:
        task_layout = None
        if "cameras" in task:
            task_layout = ({k: list(v) for k, v in _get(task, "cameras").items()}, dict(_get(task, "low_dim") or {}))
        policy_layout = None if encoder is None else ({k: list(v) for k, v in encoder.cameras}, dict(encoder.low_dim))
        if policy_layout is None or policy_layout != task_layout or policy.config.action_dim != task.action_dim:
            policy_observes = _observes(policy_layout, policy.config.obs_dim)
            task_observes = _observes(task_layout, task.get("obs_dim"))
            raise ConfigError(
                f"checkpoint {checkpoint} observes {policy_observes} with action_dim={policy.config.action_dim}, but "
                f"task {task.name!r} observes {task_observes} with action_dim={task.action_dim}: the policy was "
                "trained for another task or observation layout"
            )
        return
    got = (policy.config.obs_dim, policy.config.action_dim)
    want = (task.obs_dim, task.action_dim)
    if got != want:
        raise ConfigError(
            f"checkpoint {checkpoint} expects obs_dim={got[0]}, action_dim={got[1]}, but task {task.name!r} has "
            f"obs_dim={want[0]}, action_dim={want[1]}: the policy was trained for another task or observation layout"
        )


def build_session(cfg: DictConfig, *, check_task: bool = True, policy: DiffusionPolicy | None = None) -> SessionSetup:
    """Check every run option of ``cfg`` and build the policy, sampler, solver and session it describes.

    ``policy``: an already-loaded policy to run instead of loading ``checkpoint`` again (a timing
    tool that runs many configurations on one network, e.g. eval/latency.py's original-size U-Net).

    Raises :class:`~policy_accel.errors.ConfigError` (a bad value: names the key) or
    :class:`~policy_accel.errors.CheckpointError` (a bad checkpoint: names the file) before anything runs.
    """
    threads = cfg_int(cfg, "threads", minimum=1)
    device = cfg_device(cfg)
    seeds = cfg_seeds(cfg)
    warm_start = cfg_warm_start(cfg)
    tail_fill = cfg_choice(cfg, "tail_fill", TAIL_FILLS) if "tail_fill" in cfg else "repeat"
    renoise_steps = cfg_int(cfg, "renoise_steps", minimum=1, optional=True) if "renoise_steps" in cfg else None
    check_exactness = cfg_bool(cfg, "check_exactness") if "check_exactness" in cfg else False
    noise = cfg_choice(cfg, "solver.noise", NOISE_POLICIES)
    solver_name = cfg_choice(cfg, "solver.name", sorted(SOLVERS))
    trust_pickle = cfg_bool(cfg, "trust_pickle") if "trust_pickle" in cfg else False
    checkpoint = cfg_str(cfg, "checkpoint")
    budget = cfg_budget(cfg)
    engine = cfg_choice(cfg, "engine", ENGINES) if "engine" in cfg else "auto"
    engine_precision = cfg_choice(cfg, "engine_precision", PRECISIONS) if "engine_precision" in cfg else "f32"
    engine_fuse = cfg_bool(cfg, "engine_fuse") if "engine_fuse" in cfg else False
    resolve_engine(engine, device)  # refused before the checkpoint is read
    options = _get(cfg, "solver.options") or {}
    if not isinstance(options, dict):
        raise _bad("solver.options", options, "a mapping of solver options")
    try:
        solver = make_solver(solver_name, **options)
    except FieldError as err:  # the option as the user spelled it
        raise err.under("solver.options.") from None

    torch.set_num_threads(threads)
    if policy is None:
        policy = load_policy(checkpoint, device=device, trust_pickle=trust_pickle, engine="torch")
        policy.use_engine(engine, threads, engine_precision, fuse_chains=engine_fuse)
    if check_task:
        check_task_dims(policy, cfg.task, checkpoint)
    overrides = _get(cfg, "policy.schedule") or {}
    if not isinstance(overrides, dict):
        raise _bad("policy.schedule", overrides, "a mapping such as {kind: ddim, num_inference_steps: 10}")
    check_mapping(overrides, ScheduleConfig, "policy.schedule.", owner="the sampler")
    try:
        schedule = policy.schedule(**overrides)
    except FieldError as err:
        raise err.under("policy.schedule.") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"policy.schedule={overrides!r} is not a usable sampler for {checkpoint}: {err}") from None
    try:
        session = Session(
            policy,
            solver,
            schedule,
            warm_start,
            noise,
            budget,
            check_exactness=check_exactness,
            renoise_steps=renoise_steps,
            tail_fill=tail_fill,
            warm_options=cfg_warm_options(cfg, warm_start),
        )
    except ValueError as err:  # e.g. renoise_steps past the schedule's length, or without warm_start=renoise
        raise ConfigError(str(err)) from None
    return SessionSetup(policy, schedule, solver, session, str(checkpoint), seeds, session.warm.key, device, threads)


# ------------------------------------------------------------------------------------------------
# run identity and output directories
# ------------------------------------------------------------------------------------------------


def identity_config(cfg: DictConfig) -> dict:
    """Every resolved setting except where the output goes (``RUN_CONTROL_KEYS``): what makes two runs the same."""
    container = OmegaConf.to_container(cfg, resolve=False)
    keep = [k for k in container if k not in RUN_CONTROL_KEYS]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)


def run_id(cfg: DictConfig) -> str:
    """A short hash of :func:`identity_config`: default run directories differ whenever a setting does."""
    blob = json.dumps(identity_config(cfg), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def _run_id_resolver(*, _root_: DictConfig) -> str:
    return run_id(_root_)


OmegaConf.register_new_resolver("run_id", _run_id_resolver, replace=True)  # ${run_id:} in hydra.run.dir


def differences(found: dict, this: dict, legacy_defaults: dict | None = None) -> dict:
    """``{key: (found, this)}`` for the identity keys where a recorded run differs from this one."""
    legacy_defaults = legacy_defaults or {}
    out = {}
    for key, value in this.items():
        recorded = found.get(key, legacy_defaults.get(key, _ABSENT))
        if recorded != value:
            out[key] = ("(not recorded)" if recorded is _ABSENT else recorded, value)
    return out


__all__ = [
    "RUN_CONTROL_KEYS",
    "SessionSetup",
    "build_session",
    "cfg_bool",
    "cfg_choice",
    "cfg_float",
    "cfg_int",
    "cfg_seeds",
    "cfg_str",
    "cfg_warm_start",
    "check_task_dims",
    "differences",
    "identity_config",
    "prepare_out_dir",
    "run_id",
    "write_json_atomic",
    "write_text_atomic",
]
