"""The one owner of the observation history: DP's first-observation padding, the window, and reset."""

import numpy as np
import pytest

from policy_accel.observations import ObservationHistory


def test_first_observation_pads_the_window_then_the_window_slides():
    h = ObservationHistory(3)
    h.push(np.array([1.0]))
    np.testing.assert_array_equal(h.stacked(), [[1.0], [1.0], [1.0]])
    h.push(np.array([2.0]))
    h.push(np.array([3.0]))
    h.push(np.array([4.0]))
    np.testing.assert_array_equal(h.stacked(), [[2.0], [3.0], [4.0]])
    np.testing.assert_array_equal(h.latest, [4.0])


def test_clear_starts_a_new_episode_with_padding_again():
    h = ObservationHistory(2)
    h.push(np.array([1.0]))
    h.push(np.array([2.0]))
    h.clear()
    assert not h
    h.push(np.array([5.0]))
    np.testing.assert_array_equal(h.stacked(), [[5.0], [5.0]])


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_bad_window_length_is_refused(n):
    with pytest.raises(ValueError, match="n_obs_steps"):
        ObservationHistory(n)


def test_an_empty_history_has_nothing_to_condition_on():
    with pytest.raises(ValueError, match="empty"):
        ObservationHistory(2).stacked()
