"""Observations: the one check every entry path runs, and the history a policy conditions on (DP's padding).

DP conditions on the last ``n_obs_steps`` observations and, at an episode's start, repeats the first observation to
fill the window; the offline rollout, the real-time controller and the timing tools all feed the policy through
:class:`ObservationHistory` so they cannot disagree about which observations it saw.

Why one check (:func:`check_observation`): an observation enters through ``Session.select_action``, ``Session.plan``
/ ``policy.condition``, the episode loop and the controller; a check on one of them only lets a bad value in through
another. Only real numbers are observations: a bool array would read as 0/1, a complex one would lose its imaginary
part in the cast, a string array ("250.0") would be parsed. Finiteness is checked as the network sees it (float32:
1e300 is finite in float64 and inf in float32).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from policy_accel.errors import ObservationError

if TYPE_CHECKING:  # torch is only needed when a tensor is passed
    import torch

_AXES = {1: ("dim",), 2: ("batch", "dim"), 3: ("batch", "step", "dim")}


def _shape_text(shape: Sequence[int | None]) -> str:
    """``(B, 2, 18)``: a ``None`` axis is the batch, any length >= 1."""
    parts = ["B" if n is None else str(n) for n in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def check_observation(
    obs: Any, shape: Sequence[int | None] | None, what: str = "observation"
) -> np.ndarray | torch.Tensor:
    """``obs`` as an array (numpy) or tensor (torch) of real numbers of ``shape``, finite as float32; else
    :class:`ObservationError` naming what, the problem and the expected shape. ``None`` in ``shape``: any length >= 1;
    ``shape=None``: any shape (the first observation of an episode whose size was not declared).
    """
    expected = "expected real numbers (integer or float)"
    if shape is not None:
        expected += f" of shape {_shape_text(shape)}"
    is_tensor = type(obs).__module__.startswith("torch") and hasattr(obs, "is_complex")
    if is_tensor:
        import torch

        if obs.is_complex() or obs.dtype == torch.bool or not (obs.is_floating_point() or _torch_integer(obs)):
            raise ObservationError(f"{what} has dtype {obs.dtype}: {expected}")
    else:
        try:
            obs = np.asarray(obs)
        except ValueError as err:  # ragged nested lists
            raise ObservationError(f"{what} is not an array: {err}; {expected}") from None
        if obs.dtype.kind not in "iuf":
            raise ObservationError(f"{what} has dtype {obs.dtype}: {expected}")
    got = tuple(obs.shape)
    if shape is None:
        shape = got
    if len(got) != len(shape) or any(n is not None and g != n or g < 1 for g, n in zip(got, shape, strict=False)):
        raise ObservationError(f"{what} has shape {got}: {expected}")
    if is_tensor:
        bad = ~torch.isfinite(obs.to(torch.float32))
        index = [int(i) for i in torch.nonzero(bad)[0]] if bad.any() else None
        count = int(bad.sum()) if index is not None else 0
    else:
        with np.errstate(over="ignore"):
            bad = ~np.isfinite(obs.astype(np.float32))
        index = [int(i) for i in np.argwhere(bad)[0]] if bad.any() else None
        count = int(bad.sum()) if index is not None else 0
    if index is not None:
        where = ", ".join(f"{axis} {i}" for axis, i in zip(_AXES.get(len(index), ()), index, strict=False))
        raise ObservationError(
            f"{what} is not finite as float32 (NaN or inf) at [{where or index}] ({count} value(s)): raw values "
            "must be finite and within float32's range (|x| < 3.4e38)"
        )
    return obs


def _torch_integer(tensor: torch.Tensor) -> bool:
    import torch

    return tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class ObservationHistory:
    """The newest ``n_obs_steps`` observations of one episode; the first ``push`` pads the window with itself.

    Each observation is checked (:func:`check_observation`) against ``(obs_dim,)``, or, without ``obs_dim``, against
    the shape of the episode's first observation.
    """

    def __init__(self, n_obs_steps: int, obs_dim: int | None = None):
        if isinstance(n_obs_steps, bool) or not isinstance(n_obs_steps, int) or n_obs_steps < 1:
            raise ValueError(f"n_obs_steps={n_obs_steps!r} must be an integer >= 1")
        if obs_dim is not None and (isinstance(obs_dim, bool) or not isinstance(obs_dim, int) or obs_dim < 1):
            raise ValueError(f"obs_dim={obs_dim!r} must be an integer >= 1 or None")
        self.n_obs_steps = n_obs_steps
        self.obs_dim = obs_dim
        self._window: deque[np.ndarray] = deque(maxlen=n_obs_steps)

    def check(self, obs: Any) -> np.ndarray:
        """``obs`` as a numpy array if it can be pushed next; raises :class:`ObservationError` otherwise."""
        if self._window:
            shape = self._window[-1].shape
        elif self.obs_dim is not None:
            shape = (self.obs_dim,)
        else:  # the episode's first observation sets the shape
            shape = tuple(obs.shape) if hasattr(obs, "shape") else None
        obs = check_observation(obs, shape)
        return obs.detach().cpu().numpy() if not isinstance(obs, np.ndarray) else obs

    def push(self, obs: Any) -> None:
        """Add the newest observation (at an episode's start it fills the whole window, as DP does)."""
        obs = self.check(obs)
        if not self._window:
            self._window.extend([obs] * self.n_obs_steps)
        else:
            self._window.append(obs)

    def clear(self) -> None:
        """Forget the episode: the next ``push`` pads again."""
        self._window.clear()

    def __bool__(self) -> bool:
        return bool(self._window)

    @property
    def latest(self) -> np.ndarray:
        """The newest observation (an empty history has none)."""
        if not self._window:
            raise ValueError("the observation history is empty: push an observation first")
        return self._window[-1]

    def stacked(self) -> np.ndarray:
        """(n_obs_steps, *obs_shape), oldest first: what the policy conditions on."""
        if not self._window:
            raise ValueError("the observation history is empty: push an observation first")
        return np.stack(self._window)
