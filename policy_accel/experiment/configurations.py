"""Named configurations: ``configs/experiment/<name>.yaml``, the one schema for "a configuration by name".

A named configuration is a Hydra override file of the run config ``configs/rollout.yaml``: it picks the ``solver``
and ``policy`` (sampler) groups and sets run options such as ``warm_start``, ``renoise_steps`` or
``solver.noise``. Every entry point selects configurations by these names and builds each one through
:func:`policy_accel.experiment.build.build_session`, so a name means the same policy, sampler, solver and warm start
everywhere:

    python eval/rollout.py +experiment=newton_broyden_warm                       # one, closed loop
    python eval/benchmark.py 'only=[seq_ddim10,newton_broyden_warm]'             # a sweep of them
    python eval/latency.py 'configurations=[seq_ddim10,newton_broyden_warm]'     # their latency
    python eval/solver_bench.py 'configurations=[seq_ddpm100,paradigms]'         # their offline solves

Inside a Hydra application (``@hydra.main``) the configuration is composed with that application's config search
path (``config_path="../configs"`` in every entry point); outside one, from ``config_dir``.
"""

from __future__ import annotations

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


def configuration_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Every defined configuration, sorted."""
    return sorted(p.stem for p in (Path(config_dir) / EXPERIMENT_GROUP).glob("*.yaml"))


def check_names(names: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """``names`` as a list, or a :class:`ConfigError` naming the unknown ones and listing the defined ones."""
    defined = configuration_names(config_dir)
    unknown = [n for n in names if n not in defined]
    if unknown:
        where = Path(config_dir) / EXPERIMENT_GROUP
        raise ConfigError(f"unknown configurations {unknown}; defined in {where}: {', '.join(defined)}")
    return list(names)


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
    check_names([name], config_dir)
    arguments = [f"+{EXPERIMENT_GROUP}={name}", *overrides]
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
]
