"""Gap filling and the One-Euro filter on pose tracks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcan_core.pose.smooth import fill_gaps_array, one_euro_array, smooth_poses
from tcan_core.pose_format import PoseSequence


def smooth_clip(rng, frames: int, people: int = 1) -> PoseSequence:
    """Every point of body, face and hands on its own slow sinusoid, all seen."""
    seq = PoseSequence.empty(frames, people, 640, 480)
    t = np.arange(frames)[:, None, None, None] / 30.0
    for arr in (seq.body, seq.face):
        shape = arr.shape[1:3]
        arr[..., :2] = rng.uniform(50, 400, shape + (2,)) + 20 * np.sin(2 * t + rng.uniform(0, 6, shape + (2,)))
        arr[..., 2] = rng.uniform(0.3, 1.0, shape)
    hand_shape = seq.hands.shape[1:4]
    seq.hands[..., :2] = rng.uniform(50, 400, hand_shape + (2,)) + 10 * np.sin(3 * t[..., None])
    seq.hands[..., 2] = 1.0
    seq.people[:] = people
    return seq


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), frames=st.integers(1, 40), max_gap=st.integers(0, 10))
def test_clean_track_is_unchanged_by_gap_filling(seed, frames, max_gap):
    rng = np.random.default_rng(seed)
    seq = smooth_clip(rng, frames, people=2)
    seq.body[:, 1, 5] = 0.0  # a point never seen stays missing
    res = smooth_poses(seq, max_gap=max_gap, one_euro=False)
    assert res.filled_points == 0
    np.testing.assert_array_equal(res.poses.body, seq.body)
    np.testing.assert_array_equal(res.poses.face, seq.face)
    np.testing.assert_array_equal(res.poses.hands, seq.hands)
    np.testing.assert_array_equal(res.poses.people, seq.people)


@settings(max_examples=30, deadline=None)
@given(start=st.integers(1, 10), a=st.floats(-500, 500), b=st.floats(-40, 40), conf=st.floats(0.1, 1.0))
def test_three_frame_gap_on_a_line_is_filled_on_the_line(start, a, b, conf):
    frames = start + 3 + 4
    t = np.arange(frames, dtype=np.float64)
    track = np.stack([a + b * t, 2 * a - 0.5 * b * t, np.full(frames, conf)], -1)[:, None]
    holed = track.copy()
    holed[start:start + 3] = 0.0
    filled, count = fill_gaps_array(holed, max_gap=3)
    assert count == 3
    np.testing.assert_allclose(filled, track, rtol=1e-9, atol=1e-9)
    too_short, count = fill_gaps_array(holed, max_gap=2)
    assert count == 0
    assert (too_short[start:start + 3] == 0).all()


def test_leading_and_trailing_gaps_stay_missing():
    track = np.zeros((8, 1, 3))
    track[2:5] = [[10.0, 20.0, 1.0]]
    filled, count = fill_gaps_array(track, max_gap=10)
    assert count == 0
    np.testing.assert_array_equal(filled, track)


def test_person_missing_for_two_frames_is_bridged():
    rng = np.random.default_rng(0)
    seq = smooth_clip(rng, 10)
    seq.body[4:6] = seq.face[4:6] = seq.hands[4:6] = 0.0
    seq.people[4:6] = 0
    res = smooth_poses(seq, max_gap=2, one_euro=False)
    np.testing.assert_array_equal(res.poses.people, np.ones(10))
    assert res.filled_points == 2 * 130
    assert res.frames_without_person == 0
    assert (res.poses.body[4:6, 0, :, 2] > 0).all()
    res = smooth_poses(seq, max_gap=1, one_euro=False)
    np.testing.assert_array_equal(res.poses.people, seq.people)
    assert res.frames_without_person == 2


@settings(max_examples=20, deadline=None)
@given(x=st.floats(-1000, 1000), y=st.floats(-1000, 1000), frames=st.integers(1, 30),
       min_cutoff=st.floats(0.05, 10.0), beta=st.floats(0.0, 2.0))
def test_one_euro_leaves_a_constant_signal_constant(x, y, frames, min_cutoff, beta):
    track = np.tile([[[x, y, 0.8]]], (frames, 3, 1))
    out = one_euro_array(track, fps=30.0, min_cutoff=min_cutoff, beta=beta)
    np.testing.assert_allclose(out, track, rtol=1e-12, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sigma=st.floats(0.5, 10.0))
def test_one_euro_reduces_jitter(seed, sigma):
    rng = np.random.default_rng(seed)
    frames, points = 200, 20
    track = np.zeros((frames, points, 3))
    track[..., :2] = rng.uniform(0, 500, (points, 2)) + rng.normal(0, sigma, (frames, points, 2))
    track[..., 2] = 1.0
    out = one_euro_array(track, fps=30.0, min_cutoff=1.0, beta=0.0)
    assert out[20:, :, :2].var(0).mean() < 0.25 * track[20:, :, :2].var(0).mean()
    np.testing.assert_array_equal(out[..., 2], track[..., 2])


def test_one_euro_beta_reduces_lag_on_fast_moves():
    t = np.arange(60, dtype=np.float64)
    track = np.stack([np.where(t < 30, 100.0, 100.0 + 15.0 * (t - 30)), np.full(60, 50.0), np.ones(60)], -1)[:, None]
    slow = one_euro_array(track, fps=30.0, min_cutoff=1.0, beta=0.0)
    fast = one_euro_array(track, fps=30.0, min_cutoff=1.0, beta=0.1)
    lag_slow = np.abs(slow[40:, 0, 0] - track[40:, 0, 0]).mean()
    lag_fast = np.abs(fast[40:, 0, 0] - track[40:, 0, 0]).mean()
    assert lag_fast < 0.5 * lag_slow


def test_one_euro_restarts_after_a_gap_and_keeps_missing_points_missing():
    track = np.zeros((6, 1, 3))
    track[:2] = [[0.0, 0.0, 1.0]]
    track[4:] = [[300.0, 300.0, 1.0]]
    out = one_euro_array(track, fps=30.0)
    assert (out[2:4] == 0).all()
    np.testing.assert_allclose(out[4, 0], [300.0, 300.0, 1.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"fps": 0.0}, "fps must be above 0"),
    ({"min_cutoff": 0.0}, "min_cutoff and d_cutoff"),
    ({"beta": -1.0}, "beta must be 0 or more"),
    ({"max_gap": -1}, "max_gap must be 0 or more"),
])
def test_bad_settings_are_refused(kwargs, match):
    seq = smooth_clip(np.random.default_rng(0), 4)
    with pytest.raises(ValueError, match=match):
        smooth_poses(seq, **kwargs)
