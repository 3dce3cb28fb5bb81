"""Task registry: name -> environment factory. Tasks are optional imports so a missing simulator
fails only when its task is asked for, with the install hint."""

from __future__ import annotations

from collections.abc import Callable


def _pusht() -> Callable[[], object]:
    from envs.pusht import make_env

    return make_env


TASKS: dict[str, Callable[[], Callable[[], object]]] = {"pusht": _pusht}


def env_factory(task: str) -> Callable[[], object]:
    """The environment constructor for ``task``; unknown names fail naming the valid ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[task]()
