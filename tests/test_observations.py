"""The one owner of the observation history: DP's first-observation padding, the window, and reset."""

from pathlib import Path

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


@pytest.mark.parametrize("n_obs_steps", [1, 2, 3])
def test_timing_histories_are_the_rollouts_padded_window_for_any_length(n_obs_steps):
    """The timing tools' observation histories (profiling.control_sequences) follow the policy's n_obs_steps and
    DP's start padding, as a rollout's do."""
    from policy_accel.data import load_demonstrations
    from policy_accel.profiling import control_sequences

    dataset = str(Path(__file__).resolve().parents[1] / "data" / "pusht" / "expert.zarr")
    obs = load_demonstrations(dataset, None)["obs"]
    (histories,) = control_sequences(dataset, None, 1, 3, 4, n_obs_steps)
    assert histories.shape == (3, n_obs_steps, obs.shape[1])
    np.testing.assert_array_equal(histories[0], np.stack([obs[0]] * n_obs_steps))  # padded with the first frame
    for k, frame in enumerate((0, 4, 8)):
        expected = [obs[max(frame - n_obs_steps + 1 + i, 0)] for i in range(n_obs_steps)]
        np.testing.assert_array_equal(histories[k], np.stack(expected))
