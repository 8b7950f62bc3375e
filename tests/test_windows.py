"""MultiDiffusion frame windows: placement over any clip length and averaging of overlapping predictions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tcan_core.animation.windows import (
    WINDOW_WEIGHTINGS,
    WindowAccumulator,
    WindowTask,
    context_windows,
    iterate_windows,
    window_weights,
)


@st.composite
def window_args(draw):
    """(num_frames, length, overlap) with 1 <= num_frames <= 1000, 1 <= length <= 32, 0 <= overlap < length."""
    length = draw(st.integers(1, 32))
    overlap = draw(st.integers(0, length - 1))
    num_frames = draw(st.integers(1, 1000))
    return num_frames, length, overlap


def cyclic_overlap(a: list[int], b: list[int]) -> int:
    """How many frames two windows share."""
    return len(set(a) & set(b))


# -- placement, open clip -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(args=window_args())
def test_open_windows_cover_every_frame_with_full_windows(args):
    num_frames, length, overlap = args
    windows = context_windows(num_frames, length, overlap)
    covered = set()
    for w in windows:
        assert len(w) == len(set(w)) == min(length, num_frames)
        assert w == list(range(w[0], w[0] + len(w)))
        covered.update(w)
    assert covered == set(range(num_frames))
    assert windows[0][0] == 0
    assert windows[-1][-1] == num_frames - 1


@settings(max_examples=300, deadline=None)
@given(args=window_args())
def test_open_windows_advance_by_at_most_the_stride_and_overlap_by_at_least_overlap(args):
    num_frames, length, overlap = args
    windows = context_windows(num_frames, length, overlap)
    stride = length - overlap
    for prev, nxt in zip(windows, windows[1:]):
        assert 0 < nxt[0] - prev[0] <= stride
        assert cyclic_overlap(prev, nxt) >= overlap
    for prev, nxt in zip(windows[:-1], windows[1:-1]):
        assert nxt[0] - prev[0] == stride


def test_default_windows_have_stride_12_and_the_last_one_ends_at_the_last_frame():
    windows = context_windows(40)
    assert [w[0] for w in windows] == [0, 12, 24]
    assert windows[-1] == list(range(24, 40))
    windows = context_windows(45)
    assert [w[0] for w in windows] == [0, 12, 24, 29]
    assert all(len(w) == 16 for w in windows)


def test_a_thousand_frames_with_the_defaults():
    windows = context_windows(1000)
    assert [w[0] for w in windows[:-1]] == list(range(0, 984, 12))
    assert windows[-1] == list(range(984, 1000))
    assert len(windows) == 83


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 32), data=st.data())
def test_a_clip_no_longer_than_a_window_is_one_window_in_order(length, data):
    num_frames = data.draw(st.integers(1, length))
    overlap = data.draw(st.integers(0, length - 1))
    for closed in (False, True):
        assert context_windows(num_frames, length, overlap, closed) == [list(range(num_frames))]


def test_one_frame_and_exactly_one_window():
    assert context_windows(1) == [[0]]
    assert context_windows(16) == [list(range(16))]
    assert context_windows(16, closed_loop=True) == [list(range(16))]


# -- placement, closed loop ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(args=window_args())
def test_closed_loop_covers_every_frame_and_wraps_with_overlap(args):
    num_frames, length, overlap = args
    windows = context_windows(num_frames, length, overlap, closed_loop=True)
    covered = set()
    for w in windows:
        assert len(w) == len(set(w)) == min(length, num_frames)
        covered.update(w)
    assert covered == set(range(num_frames))
    if num_frames <= length:
        return
    stride = length - overlap
    for k, w in enumerate(windows):
        assert w == [(k * stride + i) % num_frames for i in range(length)]
    for prev, nxt in zip(windows, windows[1:] + windows[:1]):
        assert cyclic_overlap(prev, nxt) >= overlap
    if overlap > 0:
        last = windows[-1]
        assert num_frames - 1 in last and 0 in last
        assert last.index(0) == last.index(num_frames - 1) + 1


def test_closed_loop_example_by_hand():
    windows = context_windows(28, 16, 4, closed_loop=True)
    assert windows == [list(range(0, 16)), list(range(12, 28)), list(range(24, 28)) + list(range(0, 12))]


# -- argument errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 0}, "num_frames must be at least 1, got 0"),
        ({"num_frames": -3}, "got -3"),
        ({"num_frames": 10, "length": 0}, "context length must be at least 1 frame, got 0"),
        ({"num_frames": 10, "overlap": -1}, "context overlap must be 0 or more frames, got -1"),
        ({"num_frames": 10, "length": 8, "overlap": 8}, "overlap 8 with length 8"),
        ({"num_frames": 10, "length": 8, "overlap": 9}, "at most 7"),
        ({"num_frames": 10.5}, "whole number, got 10.5"),
        ({"num_frames": 10, "length": True}, "whole number, got True"),
    ],
)
def test_bad_window_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        context_windows(**kwargs)


def test_bad_step_count_raises():
    with pytest.raises(ValueError, match="num_steps must be at least 1, got 0"):
        iterate_windows(20, 0)


# -- the progress plan --------------------------------------------------------------------------


def test_plan_counts_steps_times_windows_and_flags_step_borders():
    plan = iterate_windows(40, 3, 16, 4)
    windows = context_windows(40, 16, 4)
    assert len(plan) == 3 * len(windows) == 9
    tasks = list(plan)
    assert len(tasks) == len(plan)
    assert tasks[0] == WindowTask(0, 0, 3, tuple(range(16)))
    assert [t.step for t in tasks] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [list(t.frames) for t in tasks[3:6]] == windows
    assert [t.first_in_step for t in tasks] == [True, False, False] * 3
    assert [t.last_in_step for t in tasks] == [False, False, True] * 3
    single = list(iterate_windows(5, 2))
    assert all(t.first_in_step and t.last_in_step for t in single)


# -- fusion -------------------------------------------------------------------------------------


def test_one_window_covering_the_clip_returns_its_prediction_exactly():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        pred = torch.randn(2, 4, 7, 3, 5, generator=gen).to(dtype)
        acc = WindowAccumulator(7)
        acc.add(context_windows(7)[0], pred)
        out = acc.result()
        assert out.dtype == dtype
        assert torch.equal(out, pred)


def test_overlapping_frames_get_the_mean_of_their_windows():
    gen = torch.Generator().manual_seed(1)
    windows = context_windows(20, 16, 4)
    assert windows == [list(range(0, 16)), list(range(4, 20))]
    a = torch.randn(1, 4, 16, 2, 3, generator=gen)
    b = torch.randn(1, 4, 16, 2, 3, generator=gen)
    acc = WindowAccumulator(20)
    acc.add(windows[0], a)
    acc.add(windows[1], b)
    expected = torch.cat([a[:, :, :4], (a[:, :, 4:] + b[:, :, :12]) / 2, b[:, :, 12:]], dim=2)
    assert torch.equal(acc.result(), expected)


def test_three_way_overlap_by_hand():
    windows = context_windows(6, 4, 3)
    assert windows == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    acc = WindowAccumulator(6)
    for value, w in zip((3.0, 6.0, 12.0), windows):
        acc.add(w, torch.full((1, 1, 4, 1, 1), value))
    got = acc.result().reshape(-1).tolist()
    assert got == [3.0, 4.5, 7.0, 7.0, 9.0, 12.0]


def test_closed_loop_fusion_wraps_the_average_onto_the_first_frames():
    windows = context_windows(5, 3, 1, closed_loop=True)
    assert windows == [[0, 1, 2], [2, 3, 4], [4, 0, 1]]
    acc = WindowAccumulator(5)
    for value, w in zip((1.0, 2.0, 4.0), windows):
        acc.add(w, torch.full((1, 2, 3, 1, 1), value))
    got = acc.result()[0, 0, :, 0, 0].tolist()
    assert got == [2.5, 2.5, 1.5, 2.0, 3.0]


@settings(max_examples=60, deadline=None)
@given(args=window_args(), closed=st.booleans(), weighting=st.sampled_from(WINDOW_WEIGHTINGS),
       seed=st.integers(0, 2**31))
def test_averaging_identical_predictions_gives_them_back(args, closed, weighting, seed):
    num_frames, length, overlap = args
    num_frames = min(num_frames, 120)
    clip = torch.randn(1, 2, num_frames, 2, 2, generator=torch.Generator().manual_seed(seed))
    acc = WindowAccumulator(num_frames, weighting)
    windows = context_windows(num_frames, length, overlap, closed)
    for w in windows:
        acc.add(w, clip[:, :, w])
    most_windows_per_frame = max(sum(f in w for w in windows) for f in range(num_frames))
    if weighting == "uniform" and most_windows_per_frame <= 2:
        # x and (x + x) / 2 are exact in floating point
        assert torch.equal(acc.result(), clip)
    else:
        torch.testing.assert_close(acc.result(), clip, rtol=1e-5, atol=1e-6)


def test_half_precision_is_accumulated_in_float32_and_returned_in_half():
    big = torch.full((1, 1, 2, 1, 1), 2048.0, dtype=torch.float16)
    one = torch.ones((1, 1, 2, 1, 1), dtype=torch.float16)
    acc = WindowAccumulator(2)
    for pred in (big, one, one):
        acc.add([0, 1], pred)
    out = acc.result()
    assert out.dtype == torch.float16
    # a float16 running sum would lose both ones (2048 + 1 rounds to 2048) and give 682.5
    assert torch.equal(out, torch.full_like(big, 2050.0 / 3))
    assert out[0, 0, 0, 0, 0].item() == 683.5


@pytest.mark.parametrize("weighting", WINDOW_WEIGHTINGS)
def test_device_follows_the_prediction(weighting):
    acc = WindowAccumulator(20, weighting)
    for w in context_windows(20, 16, 4):
        acc.add(w, torch.empty(1, 4, 16, 8, 8, device="meta", dtype=torch.bfloat16))
    out = acc.result()
    assert out.device.type == "meta"
    assert out.dtype == torch.bfloat16
    assert out.shape == (1, 4, 20, 8, 8)


def test_reset_starts_a_new_step_with_the_same_buffers():
    acc = WindowAccumulator(4)
    acc.add([0, 1, 2, 3], torch.ones(1, 1, 4, 1, 1))
    acc.reset()
    acc.add([0, 1, 2, 3], torch.full((1, 1, 4, 1, 1), 5.0))
    assert torch.equal(acc.result(), torch.full((1, 1, 4, 1, 1), 5.0))


def test_window_tensor_indices_and_extra_spatial_dims_are_accepted():
    acc = WindowAccumulator(3)
    pred = torch.arange(6.0).reshape(1, 2, 3)
    acc.add(torch.tensor([2, 0, 1]), pred)
    assert torch.equal(acc.result(), pred[:, :, [1, 2, 0]])


# -- weighting ----------------------------------------------------------------------------------


def test_uniform_weighting_is_the_default():
    assert WindowAccumulator(3).weighting == "uniform"
    assert torch.equal(window_weights(5), torch.ones(5))


# -- fusion errors ------------------------------------------------------------------------------


def test_fusion_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="num_frames must be at least 1, got 0"):
        WindowAccumulator(0)
    with pytest.raises(ValueError, match="unknown window weighting 'gauss'"):
        WindowAccumulator(4, "gauss")
    with pytest.raises(ValueError, match="unknown window weighting 'gauss'"):
        window_weights(4, "gauss")
    acc = WindowAccumulator(4)
    with pytest.raises(ValueError, match="no window prediction was added"):
        acc.result()
    with pytest.raises(ValueError, match=r"got \(4, 3\)"):
        acc.add([0, 1, 2], torch.zeros(4, 3))
    with pytest.raises(ValueError, match="lists 2 frames but its prediction has 3"):
        acc.add([0, 1], torch.zeros(1, 1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"indices \[4\] are outside the clip of 4 frames"):
        acc.add([2, 3, 4], torch.zeros(1, 1, 3, 2, 2))
    with pytest.raises(ValueError, match="more than once"):
        acc.add([1, 1, 2], torch.zeros(1, 1, 3, 2, 2))
    with pytest.raises(ValueError, match="must be integers"):
        acc.add(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(1, 1, 3, 2, 2))
    acc.add([0, 1, 2], torch.zeros(1, 1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 1, 2, 3\) does not match"):
        acc.add([3], torch.zeros(1, 1, 1, 2, 3))
    with pytest.raises(ValueError, match=r"frames \[3\] \(of 1 uncovered\) got no window prediction"):
        acc.result()
