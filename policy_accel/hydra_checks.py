"""A Hydra callback that checks the run (or sweep) directory before Hydra creates it.

Why: Hydra makes ``hydra.run.dir`` before the task function runs, so a directory under a regular file or without
write permission ends in Hydra's own traceback, outside :func:`policy_accel.errors.report_user_errors`. Checked
here, it is one ``error: hydra.run.dir=... cannot be written`` line and exit status 1, like every other bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from policy_accel.errors import EXIT_USER_ERROR


def _check_dir(key: str, path: Any) -> None:
    try:
        Path(str(path)).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        sys.stderr.write(f"error: {key}={str(path)!r} cannot be written: {err.strerror or err}\n")
        raise SystemExit(EXIT_USER_ERROR) from None


class RunDirCheck(Callback):
    """``hydra.callbacks.run_dir._target_: policy_accel.hydra_checks.RunDirCheck`` in an entry point's config."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_dir("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_dir("hydra.sweep.dir", config.hydra.sweep.dir)
