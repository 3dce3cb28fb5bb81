"""Observations: the one check every entry path runs, and the history a policy conditions on (DP's padding).

DP conditions on the last ``n_obs_steps`` observations and, at an episode's start, repeats the first observation to
fill the window; the offline rollout, the real-time controller and the timing tools all feed the policy through
:class:`ObservationHistory` so they cannot disagree about which observations it saw.

Why one check (:func:`check_observation`): an observation enters through ``Session.select_action``, ``Session.plan``
/ ``policy.condition``, the episode loop and the controller; a check on one of them only lets a bad value in through
another. Only real numbers are observations: a bool array would read as 0/1, a complex one would lose its imaginary
part in the cast, a string array ("250.0") would be parsed. Finiteness is checked as the network sees it (float32:
1e300 is finite in float64 and inf in float32).

A policy with an image encoder observes a dict (:func:`check_observation_dict`): each camera name -> its image and
each low-dim key -> its vector, every value checked by :func:`check_observation`. Camera images are float in [0, 1]
and channels-first, ``(C, H, W)`` per step, as Diffusion Policy's environments give them (PushTImageEnv: float32);
an integer (uint8) image is refused rather than guessed at (scaled by 255? already in [0, 1]?).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

from policy_accel.errors import ObservationError

if TYPE_CHECKING:  # torch is only needed when a tensor is passed
    import torch

_AXES = {1: ("dim",), 2: ("batch", "dim"), 3: ("batch", "step", "dim")}
IMAGE = "a camera image (float in [0, 1], channels first)"
Observation: TypeAlias = "np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor]"


class ObservationLayout(Protocol):
    """The keys of a dict observation, in the order the policy concatenates them (an
    :class:`~policy_accel.model.vision.EncoderConfig` is one): camera images ``(name, (C, H, W))`` and low-dim
    vectors ``(name, dim)``."""

    @property
    def cameras(self) -> tuple[tuple[str, tuple[int, int, int]], ...]: ...

    @property
    def low_dim(self) -> tuple[tuple[str, int], ...]: ...


def _shape_text(shape: Sequence[int | None]) -> str:
    """``(B, 2, 18)``: a ``None`` axis is the batch, any length >= 1."""
    parts = ["B" if n is None else str(n) for n in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def check_observation(
    obs: Any, shape: Sequence[int | None] | None, what: str = "observation", *, image: bool = False
) -> np.ndarray | torch.Tensor:
    """``obs`` as an array (numpy) or tensor (torch) of real numbers of ``shape``, finite as float32; else
    :class:`ObservationError` naming what, the problem and the expected shape. ``None`` in ``shape``: any length >= 1;
    ``shape=None``: any shape (the first observation of an episode whose size was not declared). ``image``: a
    camera image, float (an integer dtype is refused) with every value in [0, 1].
    """
    expected = f"expected {IMAGE}" if image else "expected real numbers (integer or float)"
    if shape is not None:
        expected += f" of shape {_shape_text(shape)}"
    is_tensor = type(obs).__module__.startswith("torch") and hasattr(obs, "is_complex")
    if is_tensor:
        import torch

        real = obs.is_floating_point() or not image and _torch_integer(obs)
        if obs.is_complex() or obs.dtype == torch.bool or not real:
            raise ObservationError(f"{what} has dtype {obs.dtype}: {expected}")
    else:
        try:
            obs = np.asarray(obs)
        except ValueError as err:  # ragged nested lists
            raise ObservationError(f"{what} is not an array: {err}; {expected}") from None
        if obs.dtype.kind not in ("f" if image else "iuf"):
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
    if image:
        low, high = float(obs.min()), float(obs.max())
        if low < 0 or high > 1:
            raise ObservationError(
                f"{what} has values in [{low:.4g}, {high:.4g}]: {expected} (a uint8 image divided by 255)"
            )
    return obs


def check_observation_dict(
    obs: Any, layout: ObservationLayout, lead: Sequence[int | None] = (), what: str = "observation"
) -> dict[str, np.ndarray | torch.Tensor]:
    """``obs`` as a dict holding exactly ``layout``'s cameras and low-dim keys, each of shape ``(*lead, *its shape)``
    (:func:`check_observation`, images with ``image=True``) with one length per ``None`` axis of ``lead`` (the
    batch); else :class:`ObservationError` naming the key."""
    cameras, low_dim = dict(layout.cameras), dict(layout.low_dim)
    names = [*cameras, *low_dim]
    if not isinstance(obs, Mapping):
        raise ObservationError(f"{what} is a {type(obs).__name__}: expected a dict with keys {names}")
    for name in names:
        if name not in obs:
            kind = "camera" if name in cameras else "low-dim key"
            raise ObservationError(f"{what} has no {kind} {name!r} (expected keys {names})")
    for name in obs:
        if name not in names:
            raise ObservationError(f"{what} has an unexpected key {name!r} (expected keys {names})")
    checked = {}
    for name in names:
        image = name in cameras
        shape = (*lead, *(cameras[name] if image else (low_dim[name],)))
        checked[name] = check_observation(obs[name], shape, f"{what}[{name!r}]", image=image)
    for axis, n in enumerate(lead):
        lengths = {name: value.shape[axis] for name, value in checked.items()}
        if n is None and len(set(lengths.values())) > 1:
            raise ObservationError(f"{what}: the keys' batch sizes (axis {axis}) differ: {lengths}")
    return checked


def stack_observations(observations: Sequence[Observation]) -> Observation:
    """Observations (arrays, or dicts of arrays) stacked along a new first axis (dicts key by key)."""
    first = observations[0]
    if isinstance(first, Mapping):
        return {key: np.stack([np.asarray(o[key]) for o in observations]) for key in first}
    return np.stack([np.asarray(o) for o in observations])


def unstack_observations(observations: Observation) -> list[Observation]:
    """The rows of a batch of observations (an array, or a dict of arrays with one first-axis length)."""
    if isinstance(observations, Mapping):
        n = len(next(iter(observations.values())))
        return [{key: value[i] for key, value in observations.items()} for i in range(n)]
    return list(observations)


def _torch_integer(tensor: torch.Tensor) -> bool:
    import torch

    return tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class ObservationHistory:
    """The newest ``n_obs_steps`` observations of one episode; the first ``push`` pads the window with itself.

    Each observation is checked (:func:`check_observation`) against ``(obs_dim,)``, or with ``layout`` it is a dict
    of that layout's cameras and low-dim keys (:func:`check_observation_dict`); with neither, later observations are
    checked against the keys and shapes of the episode's first. The history keeps copies (numpy), so a caller may
    reuse its buffers.
    """

    def __init__(self, n_obs_steps: int, obs_dim: int | None = None, layout: ObservationLayout | None = None):
        if isinstance(n_obs_steps, bool) or not isinstance(n_obs_steps, int) or n_obs_steps < 1:
            raise ValueError(f"n_obs_steps={n_obs_steps!r} must be an integer >= 1")
        if obs_dim is not None and (isinstance(obs_dim, bool) or not isinstance(obs_dim, int) or obs_dim < 1):
            raise ValueError(f"obs_dim={obs_dim!r} must be an integer >= 1 or None")
        if obs_dim is not None and layout is not None:
            raise ValueError("give obs_dim (vector observations) or layout (dict observations), not both")
        self.n_obs_steps = n_obs_steps
        self.obs_dim = obs_dim
        self.layout = layout
        self._window: deque[Observation] = deque(maxlen=n_obs_steps)

    def check(self, obs: Any, episode_start: bool = False) -> Observation:
        """A numpy copy of ``obs`` if it can be pushed next (``episode_start``: as a new episode's first
        observation); raises :class:`ObservationError` otherwise."""
        if self.layout is not None:
            checked: Any = check_observation_dict(obs, self.layout)
        elif self.obs_dim is not None:
            checked = check_observation(obs, (self.obs_dim,))
        else:  # the episode's first observation sets the keys and shapes
            checked = _check_like(obs, None if episode_start or not self._window else self._window[-1])
        if isinstance(checked, Mapping):
            return {key: _numpy_copy(value) for key, value in checked.items()}
        return _numpy_copy(checked)

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
    def latest(self) -> Observation:
        """The newest observation (an empty history has none)."""
        if not self._window:
            raise ValueError("the observation history is empty: push an observation first")
        return self._window[-1]

    def stacked(self) -> Observation:
        """(n_obs_steps, *obs_shape), oldest first, or a dict of such arrays: what the policy conditions on."""
        if not self._window:
            raise ValueError("the observation history is empty: push an observation first")
        return stack_observations(self._window)


def _check_like(obs: Any, template: Observation | None) -> Any:
    """``obs`` checked against the keys and shapes of ``template`` (``None``: any keys and shapes)."""
    if template is not None and isinstance(obs, Mapping) != isinstance(template, Mapping):
        kinds = ["a dict" if isinstance(o, Mapping) else "an array" for o in (obs, template)]
        raise ObservationError(f"observation is {kinds[0]}: the episode's first observation was {kinds[1]}")
    if isinstance(obs, Mapping):
        if template is not None and set(obs) != set(template):
            raise ObservationError(
                f"observation has keys {list(obs)}: the episode's first observation had {list(template)}"
            )
        shapes = {key: None if template is None else template[key].shape for key in obs}
        return {key: check_observation(obs[key], shape, f"observation[{key!r}]") for key, shape in shapes.items()}
    shape = template.shape if template is not None else tuple(obs.shape) if hasattr(obs, "shape") else None
    return check_observation(obs, shape)


def _numpy_copy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.copy()
    return value.detach().cpu().numpy().copy()
