"""Named configurations: ``configs/experiment/<name>.yaml``, the one schema for "a configuration by name".

A named configuration is a Hydra override file of the run config ``configs/rollout.yaml``: it picks the ``solver``
and ``policy`` (sampler) groups and sets run options such as ``warm_start``, ``renoise_steps`` or
``solver.noise``. Every entry point selects configurations by these names and builds each one through
:func:`policy_accel.experiment.build.build_session`, so a name means the same policy, sampler, solver and warm start
everywhere:

    python eval/rollout.py +experiment=newton_broyden_warm                       # one, closed loop
    python eval/benchmark.py 'only=[seq_ddim_10,newton_broyden_warm]'             # a sweep of them
    python eval/latency.py 'configurations=[seq_ddim_10,newton_broyden_warm]'     # their latency
    python eval/solver_bench.py 'configurations=[seq_ddpm100,paradigms]'         # their offline solves

A *family* file (one with ``family_steps``, e.g. ``seq_ddim``) stands for one configuration per step count:
``seq_ddim_10`` is ``+experiment=seq_ddim policy.schedule.num_inference_steps=10`` and records its name through the
file's ``configuration`` key; ``seq_ddim`` in a list of names expands to every step count of ``family_steps``. Files
stay for configurations that mean something on their own (a warm start, a solver setting, a baseline).

Inside a Hydra application (``@hydra.main``) the configuration is composed with that application's config search
path (``config_path="../configs"`` in every entry point); outside one, from ``config_dir``.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from policy_accel.errors import ConfigError
from policy_accel.experiment.build import SessionSetup, build_session
from policy_accel.policy import DiffusionPolicy

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIG = "rollout"  # the config a named configuration overrides
EXPERIMENT_GROUP = "experiment"
STEPS_KEY = "policy.schedule.num_inference_steps"  # what a family's members differ in


def families(config_dir: Path = CONFIG_DIR) -> dict[str, list[int]]:
    """Every family file and its step counts (``family_steps``)."""
    return {name: list(steps) for name, steps in _read_families(Path(config_dir).resolve())}


@functools.cache
def _read_families(config_dir: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Read once per process: every name lookup (a sweep's, each row of a front) asks, and the files do not change
    under a running command."""
    found = []
    for path in sorted((config_dir / EXPERIMENT_GROUP).glob("*.yaml")):
        steps = OmegaConf.load(path).get("family_steps")
        if steps is not None:
            found.append((path.stem, tuple(int(k) for k in steps)))
    return tuple(found)


def resolve(name: str, config_dir: Path = CONFIG_DIR) -> tuple[str, list[str]]:
    """The experiment file of configuration ``name`` and the overrides that make it: ``([name], [])`` for a file of
    its own, ``(family, [steps override])`` for a family member ``<family>_<steps>``. Raises ConfigError."""
    path = Path(config_dir) / EXPERIMENT_GROUP / f"{name}.yaml"
    known = families(config_dir)
    if path.is_file() and name not in known:
        return name, []
    match = re.fullmatch(r"(.+)_(\d+)", name)
    if match and match[1] in known:
        return match[1], [f"{STEPS_KEY}={int(match[2])}"]
    names = configuration_names(config_dir)
    if name in known:
        hint = f" ({name} is a family: name a member such as {name}_{known[name][0]})"
    else:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"unknown configuration {name!r}{hint}; defined in {path.parent}: {', '.join(names)}")


def configuration_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Every defined configuration (family members at their ``family_steps``), sorted."""
    known = families(config_dir)
    names = [p.stem for p in (Path(config_dir) / EXPERIMENT_GROUP).glob("*.yaml") if p.stem not in known]
    names += [f"{family}_{k}" for family, steps in known.items() for k in steps]
    return sorted(names)


def check_names(names: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """``names`` with each family expanded to its members, or a :class:`ConfigError` naming an unknown one."""
    known = families(config_dir)
    out = []
    for name in names:
        if name in known:
            out += [f"{name}_{k}" for k in known[name]]
        else:
            resolve(name, config_dir)
            out.append(name)
    return out


def compose_configuration(
    name: str,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    config_dir: Path = CONFIG_DIR,
) -> DictConfig:
    """The run config of configuration ``name``: ``configs/rollout.yaml`` with ``+experiment=<name>``, then
    ``overrides`` (Hydra override strings: a group choice such as ``policy=ddim16`` wins over the configuration's),
    then ``values`` (dotted key -> value, each replacing that node: how an entry point hands its own ``task``,
    ``device`` or ``threads`` to every configuration it runs)."""
    experiment, member = resolve(name, config_dir)
    arguments = [f"+{EXPERIMENT_GROUP}={experiment}", *member, *overrides]
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(RUN_CONFIG, overrides=arguments)
        else:
            with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
                cfg = compose(RUN_CONFIG, overrides=arguments)
    except HydraException as err:
        message = " ".join(str(err).split())  # one line: Hydra lists the available options on lines of their own
        raise ConfigError(f"configuration {name!r} with overrides {list(overrides)}: {message}") from None
    with open_dict(cfg):
        for key, value in (values or {}).items():
            if isinstance(value, DictConfig | ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def build_configuration(
    name: str,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    policy: DiffusionPolicy | None = None,
    config_dir: Path = CONFIG_DIR,
) -> tuple[DictConfig, SessionSetup]:
    """Configuration ``name`` composed (:func:`compose_configuration`) and its setup built by
    :func:`~policy_accel.experiment.build.build_session` (``policy``: run this already-loaded policy)."""
    cfg = compose_configuration(name, overrides, values, config_dir)
    return cfg, build_session(cfg, policy=policy)


__all__ = [
    "CONFIG_DIR",
    "build_configuration",
    "check_names",
    "compose_configuration",
    "configuration_names",
    "families",
    "resolve",
]
