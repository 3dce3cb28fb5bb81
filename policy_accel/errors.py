"""The project's expected errors, and the wrapper every command uses to report them in one line.

Why one exception family: a bad config value, a bad checkpoint, a refused pickle or a bad observation is the
user's input, not a bug, so a command ends with one readable line on stderr and a non-zero exit status instead of
a traceback. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
EXIT_USER_ERROR = 1  # as Hydra's own config errors and eval/convert.py


class UserError(Exception):
    """An error caused by the user's input (config, checkpoint, observation): reported without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value (command line, Hydra config or function argument) of the wrong type or range."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, unsupported, non-finite or does not match its config."""


class PickleRefusedError(CheckpointError):
    """A pickle checkpoint was not opened because ``trust_pickle`` was not an explicit ``True``."""


class ObservationError(UserError, ValueError):
    """An observation history of the wrong shape, or non-finite as the network sees it (float32)."""


class OutDirInUseError(UserError, RuntimeError):
    """Another live run holds the output directory: two runs into one directory would mix or lose results."""


class ResultsError(UserError, ValueError):
    """A results.json that breaks its schema (a NaN or non-numeric score, latency or count): never ranked."""


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_user_errors(func: F) -> F:
    """Wrap a command's main (or Hydra task) function: a :class:`UserError` ends it with ``error: <message>``.

    In a single run the message is the only line on stderr and the exit status is 1. Inside a Hydra multirun the
    job must fail without stopping the process (the launcher runs the other jobs and reports the failure), so the
    error is logged to the job's log and re-raised as Hydra's compact error, which Hydra prints without traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            message = f"error: {err}"
            if _in_multirun():
                from hydra.errors import CompactHydraException  # Hydra prints str(exc) without traceback

                log.error("%s", message)
                raise CompactHydraException(message) from None
            sys.stderr.write(message.replace("\n", " ") + "\n")
            sys.stderr.flush()
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]


__all__ = [
    "EXIT_USER_ERROR",
    "CheckpointError",
    "ConfigError",
    "ObservationError",
    "OutDirInUseError",
    "PickleRefusedError",
    "ResultsError",
    "UserError",
    "report_user_errors",
]
