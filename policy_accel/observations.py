"""The observation history a policy conditions on, with Diffusion Policy's padding: one owner for every loop.

DP conditions on the last ``n_obs_steps`` observations and, at an episode's start, repeats the first observation to
fill the window; the offline rollout, the real-time controller and the timing tools all feed the policy through
this class so they cannot disagree about which observations it saw.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class ObservationHistory:
    """The newest ``n_obs_steps`` observations of one episode; the first ``push`` pads the window with itself."""

    def __init__(self, n_obs_steps: int):
        if isinstance(n_obs_steps, bool) or not isinstance(n_obs_steps, int) or n_obs_steps < 1:
            raise ValueError(f"n_obs_steps={n_obs_steps!r} must be an integer >= 1")
        self.n_obs_steps = n_obs_steps
        self._window: deque[np.ndarray] = deque(maxlen=n_obs_steps)

    def push(self, obs: np.ndarray) -> None:
        """Add the newest observation (at an episode's start it fills the whole window, as DP does)."""
        obs = np.asarray(obs)
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
