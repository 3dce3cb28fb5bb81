"""Task registry: name -> environment factory. Tasks are optional imports so a missing simulator
fails only when its task is asked for, with the install hint."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial


def _pusht() -> Callable[[], object]:
    from envs.pusht import make_env

    return make_env


def _pusht_image() -> Callable[[], object]:
    from envs.pusht_image import make_env

    return make_env


def _robomimic(name: str) -> Callable[[], Callable[[], object]]:
    def factory() -> Callable[[], object]:
        from envs.robomimic import make_env

        return partial(make_env, name)

    return factory


TASKS: dict[str, Callable[[], Callable[[], object]]] = {
    "pusht": _pusht,
    "pusht_image": _pusht_image,
    "lift": _robomimic("lift"),
    "can": _robomimic("can"),
}


def env_factory(task: str) -> Callable[[], object]:
    """The environment constructor for ``task`` (keywords ``max_episode_steps``, ``render_offscreen``); unknown names
    fail naming the valid ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[task]()
