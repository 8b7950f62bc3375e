"""TCAN retargeting (Algorithm 1) in both modes: properties checked on random skeletons built by forward
kinematics, and hand-computed cases that separate the authors' code from the pack's Algorithm 1 reading."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcan_core.pose.retarget import (MODE_ALGORITHM_1, MODE_AUTHORS, MODES, PROPORTIONS_AUTO, PROPORTIONS_CHOSEN,
                                     auto_proportions_frame, retarget_poses)
from tcan_core.pose_format import PoseSequence

# Written out from DESIGN.md section 6 rather than imported, so the test checks the module's table.
PARENT = {0: 1, 2: 1, 5: 1, 8: 1, 11: 1, 3: 2, 4: 3, 6: 5, 7: 6, 9: 8, 10: 9, 12: 11, 13: 12,
          14: 0, 15: 0, 16: 14, 17: 15}
ORDER = (0, 2, 5, 8, 11, 14, 15, 3, 6, 9, 12, 16, 17, 4, 7, 10, 13)
PAIRS = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))

seeds = st.integers(0, 2**32 - 1)
frames_st = st.integers(1, 6)


def build(neck: np.ndarray, lengths: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Forward kinematics: ``[F,2]`` neck, ``[F,18]`` bone lengths and angles -> ``[F,18,3]`` body."""
    frames = neck.shape[0]
    body = np.zeros((frames, 18, 3))
    body[:, 1, :2] = neck
    for j in ORDER:
        direction = np.stack([np.cos(angles[:, j]), np.sin(angles[:, j])], -1)
        body[:, j, :2] = body[:, PARENT[j], :2] + direction * lengths[:, j, None]
    body[..., 2] = 1.0
    return body


def sequence(body: np.ndarray, width: int = 512, height: int = 512) -> PoseSequence:
    seq = PoseSequence.empty(body.shape[0], 1, width, height)
    seq.body[:, 0] = body
    seq.people[:] = 1
    return seq


def random_lengths(rng, symmetric: bool) -> np.ndarray:
    lengths = rng.uniform(15.0, 80.0, 18)
    if symmetric:
        for r, l in PAIRS:
            lengths[l] = lengths[r]
    return lengths


def symmetrised(lengths: np.ndarray) -> np.ndarray:
    out = lengths.copy()
    for r, l in PAIRS:
        out[r] = out[l] = (lengths[r] + lengths[l]) / 2
    return out


def driving_clip(rng, frames: int, l0: np.ndarray):
    """A driving clip whose bones are ``l0`` in frame 0 and foreshortened by ``fs[t]`` later."""
    fs = rng.uniform(0.3, 1.5, (frames, 18))
    fs[0] = 1.0
    neck = rng.uniform(150.0, 350.0, (frames, 2))
    angles = rng.uniform(-np.pi, np.pi, (frames, 18))
    return build(neck, l0[None] * fs, angles), fs


def bone(body: np.ndarray, j: int) -> np.ndarray:
    return body[..., j, :2] - body[..., PARENT[j], :2]


def max_symmetrised(lengths: np.ndarray) -> np.ndarray:
    out = lengths.copy()
    for r, l in PAIRS:
        out[r] = out[l] = max(lengths[r], lengths[l])
    return out


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st)
@pytest.mark.parametrize("mode", MODES)
def test_neck_stays_where_it_should(mode, seed, frames):
    rng = np.random.default_rng(seed)
    char_len = random_lengths(rng, symmetric=False)
    ref = build(rng.uniform(100, 400, (1, 2)), char_len[None], rng.uniform(-np.pi, np.pi, (1, 18)))
    l0 = random_lengths(rng, symmetric=False)
    drv, fs = driving_clip(rng, frames, l0)
    s = symmetrised(char_len)[list(PARENT)].sum() / l0[list(PARENT)].sum()
    # The authors scale the neck's motion by this frame's neck->nose ratio; Algorithm 1 by s.
    scale = char_len[0] / (l0[0] * fs[:, 0, None]) if mode == MODE_AUTHORS else s

    out = retarget_poses(sequence(ref), sequence(drv, 640, 480), "reference", mode=mode)
    expected = ref[0, 1, :2] + scale * (drv[:, 1, :2] - drv[0, 1, :2])
    np.testing.assert_allclose(out.poses.body[:, 0, 1, :2], expected, rtol=1e-5, atol=1e-2)
    assert (out.poses.width, out.poses.height) == (512, 512)
    assert out.body_scale == pytest.approx(s, rel=1e-5)

    out = retarget_poses(sequence(ref), sequence(drv, 640, 480), "driving", mode=mode)
    np.testing.assert_allclose(out.poses.body[:, 0, 1, :2], drv[:, 1, :2], rtol=1e-5, atol=1e-2)
    assert (out.poses.width, out.poses.height) == (640, 480)


def assert_bones(out: np.ndarray, drv: np.ndarray, lengths: np.ndarray) -> None:
    """Every bone of ``out`` [F,18,3] has ``lengths`` [F,18] and the driving bone's direction."""
    for j in PARENT:
        got, drive = bone(out, j), bone(drv, j)
        np.testing.assert_allclose(np.hypot(*got.T), lengths[:, j], rtol=1e-4, atol=1e-2)
        # The direction is the driving frame's: parallel and pointing the same way.
        cross = got[:, 0] * drive[:, 1] - got[:, 1] * drive[:, 0]
        np.testing.assert_allclose(cross / (np.hypot(*got.T) * np.hypot(*drive.T)), 0.0, atol=1e-4)
        assert ((got * drive).sum(-1) > 0).all()


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st)
def test_bone_length_is_character_length_times_foreshortening(seed, frames):
    rng = np.random.default_rng(seed)
    char_len = random_lengths(rng, symmetric=False)
    ref = build(rng.uniform(100, 400, (1, 2)), char_len[None], rng.uniform(-np.pi, np.pi, (1, 18)))
    l0 = random_lengths(rng, symmetric=False)
    drv, fs = driving_clip(rng, frames, l0)

    out = retarget_poses(sequence(ref), sequence(drv), "reference", mode=MODE_ALGORITHM_1)
    assert_bones(out.poses.body[:, 0].astype(np.float64), drv, symmetrised(char_len)[None] * fs)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st, clip=st.floats(0.5, 2.0))
def test_authors_bone_is_larger_side_times_clipped_foreshortening(seed, frames, clip):
    rng = np.random.default_rng(seed)
    char_len = random_lengths(rng, symmetric=False)
    ref = build(rng.uniform(100, 400, (1, 2)), char_len[None], rng.uniform(-np.pi, np.pi, (1, 18)))
    l0 = random_lengths(rng, symmetric=False)
    drv, fs = driving_clip(rng, frames, l0)

    out = retarget_poses(sequence(ref), sequence(drv), "reference", mode=MODE_AUTHORS, clip=clip)
    want = max_symmetrised(char_len)[None] * np.minimum(fs, clip)
    want[:, 0] = char_len[0]  # the neck->nose bone takes the character's length, unforeshortened
    # The authors leave bones shorter than a tenth of the character's neck->nose length as they are.
    short = l0[None] * fs < 0.1 * char_len[0]
    want = np.where(short, l0[None] * fs, want)
    want[:, 0] = char_len[0]
    assert_bones(out.poses.body[:, 0].astype(np.float64), drv, want)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st, scale=st.floats(0.25, 4.0))
def test_driving_in_character_proportions_comes_back_unchanged(seed, frames, scale):
    rng = np.random.default_rng(seed)
    l0 = random_lengths(rng, symmetric=True)
    drv, _ = driving_clip(rng, frames, l0)

    # Same proportions and size, on the same canvas: reference mode changes nothing.
    out = retarget_poses(sequence(drv[:1]), sequence(drv), "reference", mode=MODE_ALGORITHM_1).poses.body[:, 0]
    np.testing.assert_allclose(out, drv, rtol=1e-5, atol=1e-2)

    # Points lost after the first frame (the neck too) change nothing else.
    holed = drv.copy()
    holed[1:][rng.random(holed[1:].shape[:2]) < 0.3] = 0.0
    out = retarget_poses(sequence(drv[:1]), sequence(holed), "reference", mode=MODE_ALGORITHM_1).poses.body[:, 0]
    np.testing.assert_allclose(out, holed, rtol=1e-5, atol=1e-2)

    # Same proportions at another size: the driving canvas keeps the driving poses.
    ref = drv[:1].copy()
    ref[..., :2] = (ref[..., :2] - ref[:, 1:2, :2]) * scale + 256.0
    out = retarget_poses(sequence(ref), sequence(drv), "driving", mode=MODE_ALGORITHM_1).poses.body[:, 0]
    np.testing.assert_allclose(out, drv, rtol=1e-5, atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st, scale=st.floats(0.25, 4.0))
def test_authors_mode_keeps_a_clip_in_character_proportions_that_never_outgrows_the_clip(seed, frames, scale):
    rng = np.random.default_rng(seed)
    l0 = random_lengths(rng, symmetric=True)
    l0[0] = 15.0  # a small head: no bone is under a tenth of the (scaled) head, which the authors leave alone
    fs = rng.uniform(0.65, 1.1, (frames, 18))
    fs[0] = 1.0
    fs[:, 0] = 1.0  # the authors give the neck->nose bone the character's length in every frame
    drv = build(rng.uniform(150.0, 350.0, (frames, 2)), l0[None] * fs, rng.uniform(-np.pi, np.pi, (frames, 18)))

    out = retarget_poses(sequence(drv[:1]), sequence(drv), "reference", mode=MODE_AUTHORS).poses.body[:, 0]
    np.testing.assert_allclose(out, drv, rtol=1e-5, atol=1e-2)
    ref = drv[:1].copy()
    ref[..., :2] = (ref[..., :2] - ref[:, 1:2, :2]) * scale + 256.0
    out = retarget_poses(sequence(ref), sequence(drv), "driving", mode=MODE_AUTHORS).poses.body[:, 0]
    np.testing.assert_allclose(out, drv, rtol=1e-5, atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=st.integers(2, 6), drop=st.floats(0.05, 0.6))
@pytest.mark.parametrize("mode", MODES)
def test_missing_points_stay_missing(mode, seed, frames, drop):
    rng = np.random.default_rng(seed)
    ref = build(rng.uniform(100, 400, (1, 2)), random_lengths(rng, False)[None], rng.uniform(-3, 3, (1, 18)))
    drv, _ = driving_clip(rng, frames, random_lengths(rng, False))
    drv[..., 2] = rng.uniform(0.2, 1.0, drv.shape[:2])
    missing = rng.random(drv.shape[:2]) < drop
    drv[missing] = 0.0
    seq = sequence(drv)
    seq.hands[:, 0, :, :, :2] = rng.uniform(0, 512, (frames, 2, 21, 2))
    seq.hands[:, 0, :, :, 2] = (rng.random((frames, 2, 21)) > drop).astype(np.float32)
    seq.face[:, 0, :, :2] = rng.uniform(0, 512, (frames, 70, 2))
    seq.face[:, 0, :, 2] = (rng.random((frames, 70)) > drop).astype(np.float32)
    if not (drv[..., 2] > 0).any():
        return
    for canvas in ("reference", "driving"):
        out = retarget_poses(sequence(ref), seq, canvas, mode=mode).poses
        np.testing.assert_array_equal(out.body[:, 0, :, 2], seq.body[:, 0, :, 2])
        np.testing.assert_array_equal(out.hands[:, 0, ..., 2], seq.hands[:, 0, ..., 2])
        np.testing.assert_array_equal(out.face[:, 0, :, 2], seq.face[:, 0, :, 2])
        assert (out.body[:, 0][missing] == 0).all()
        assert np.isfinite(out.body).all()


@pytest.mark.parametrize("mode", MODES)
def test_point_with_missing_parent_moves_only_with_its_ancestors(mode):
    rng = np.random.default_rng(3)
    ref = build(np.array([[256.0, 150.0]]), random_lengths(rng, True)[None] * 2, rng.uniform(-3, 3, (1, 18)))
    drv, _ = driving_clip(rng, 2, random_lengths(rng, True))
    drv[1, 3] = 0.0  # right elbow lost in frame 1: the wrist keeps its place relative to the shoulder
    res = retarget_poses(sequence(ref), sequence(drv), "driving", mode=mode)
    out = res.poses.body[:, 0]
    assert out[1, 3, 2] == 0
    wrist_from_shoulder = drv[1, 4, :2] - drv[1, 2, :2]
    scale = res.head_ratio if mode == MODE_AUTHORS else res.body_scale
    assert res.output_scale == pytest.approx(1.0 / scale)
    np.testing.assert_allclose(out[1, 4, :2] - out[1, 2, :2], wrist_from_shoulder / scale, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_hands_follow_wrists_and_face_follows_nose(mode):
    rng = np.random.default_rng(5)
    char_len = random_lengths(rng, True) * 2.0
    ref = build(np.array([[256.0, 200.0]]), char_len[None], rng.uniform(-3, 3, (1, 18)))
    l0 = random_lengths(rng, True)
    drv, _ = driving_clip(rng, 3, l0)
    seq = sequence(drv)
    # Hand points a few pixels from their wrists (left hand <- joint 7, right hand <- joint 4).
    for h, wrist in ((0, 7), (1, 4)):
        seq.hands[:, 0, h, :, :2] = drv[:, wrist, None, :2] + rng.uniform(-10, 10, (3, 21, 2))
        seq.hands[:, 0, h, :, 2] = 1.0
    seq.face[:, 0, :, :2] = drv[:, 0, None, :2] + rng.uniform(-8, 8, (3, 70, 2))
    seq.face[:, 0, :, 2] = 1.0
    res = retarget_poses(sequence(ref), seq, "reference", mode=mode)
    out, s = res.poses, res.body_scale
    head = char_len[0] / l0[0]
    assert res.head_ratio == pytest.approx(head)
    # Algorithm 1 sizes hands by the body scale; the authors' mode by the first frame's neck->nose ratio.
    hand = s if mode == MODE_ALGORITHM_1 else head
    for h, wrist in ((0, 7), (1, 4)):
        got = out.hands[:, 0, h, :, :2] - out.body[:, 0, wrist, None, :2]
        want = (seq.hands[:, 0, h, :, :2] - drv[:, wrist, None, :2]) * hand
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)
    got = out.face[:, 0, :, :2] - out.body[:, 0, 0, None, :2]
    np.testing.assert_allclose(got, (seq.face[:, 0, :, :2] - drv[:, 0, None, :2]) * head, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_frames_without_person_stay_empty_and_person_zero_is_used(mode):
    rng = np.random.default_rng(7)
    drv, _ = driving_clip(rng, 4, random_lengths(rng, True))
    seq = PoseSequence.empty(4, 2, 512, 512)
    seq.body[:, 0] = drv
    seq.body[:, 1] = drv + np.array([100.0, 0.0, 0.0])
    seq.people[:] = [2, 0, 1, 2]
    seq.body[1] = 0.0
    ref = PoseSequence.empty(1, 2, 512, 512)
    ref.body[0, 0] = drv[0]
    ref.body[0, 1] = drv[0] * np.array([3.0, 3.0, 1.0])
    ref.people[:] = 2
    res = retarget_poses(ref, seq, "reference", mode=mode)
    assert res.empty_frames == 1
    np.testing.assert_array_equal(res.poses.people, [1, 0, 1, 1])
    assert (res.poses.body[1] == 0).all()
    np.testing.assert_allclose(res.poses.body[0, 0], drv[0], rtol=1e-5, atol=1e-2)
    if mode == MODE_ALGORITHM_1:
        np.testing.assert_allclose(res.poses.body[:, 0][[0, 2, 3]], drv[[0, 2, 3]], rtol=1e-5, atol=1e-2)


def descendants(j: int) -> list[int]:
    kids = [c for c, parent in PARENT.items() if parent == j]
    return kids + [d for c in kids for d in descendants(c)]


def authors_walk(frame: np.ndarray, ref: np.ndarray, first: np.ndarray, clip: float = 1.1) -> np.ndarray:
    """The authors' per-frame procedure, move by move (without their whole-pixel truncation): ``[18,3]`` -> ``[18,2]``."""
    x = frame[:, :2].astype(np.float64).copy()
    length = lambda pts, j: float(np.hypot(*(pts[j, :2] - pts[PARENT[j], :2])))  # noqa: E731
    head_ref = length(ref, 0)
    fore = {j: min(length(x, j) / length(first, j), clip) for j in PARENT}
    ratio = head_ref / length(x, 0)
    neck_move = (x[1] - first[1, :2]) * ratio
    target = max_symmetrised(np.array([length(ref, j) if j in PARENT else 0.0 for j in range(18)]))
    for j in ORDER:
        if j == 0:
            f = ratio
        elif length(x, j) < 0.1 * head_ref or target[j] < 0.1 * head_ref:
            continue
        else:
            f = target[j] * fore[j] / length(x, j)
        step = (x[j] - x[PARENT[j]]) * (f - 1.0)
        x[[j] + descendants(j)] += step
    return x - x[1] + ref[1, :2] + neck_move


@settings(max_examples=25, deadline=None)
@given(seed=seeds, frames=frames_st, noise=st.floats(0.0, 8.0))
def test_authors_mode_equals_the_authors_procedure_move_by_move(seed, frames, noise):
    rng = np.random.default_rng(seed)
    ref = build(rng.uniform(100, 400, (1, 2)), random_lengths(rng, False)[None], rng.uniform(-np.pi, np.pi, (1, 18)))
    drv, _ = driving_clip(rng, frames, random_lengths(rng, False))
    drv[..., :2] += rng.normal(0.0, noise, drv[..., :2].shape)
    out = retarget_poses(sequence(ref), sequence(drv), mode=MODE_AUTHORS).poses.body[:, 0, :, :2]
    want = np.stack([authors_walk(drv[t], ref[0], drv[0]) for t in range(frames)])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-2)


# Hand-computed cases that separate the modes. Joints: 0 nose, 1 neck, 2/5 shoulders, 3/6 elbows, 4/7 wrists.
def hand_pose(points: dict[int, tuple[float, float]]) -> np.ndarray:
    body = np.zeros((18, 3))
    for j, (x, y) in points.items():
        body[j] = (x, y, 1.0)
    return body


def test_unequal_pair_takes_the_larger_side_in_authors_mode_and_the_mean_in_algorithm_1():
    # Character: upper arms 40 (right) and 60 (left); driving: 50 and 50, same head and shoulders.
    ref = hand_pose({0: (100, 80), 1: (100, 100), 2: (80, 100), 3: (40, 100), 5: (120, 100), 6: (180, 100)})
    drv = hand_pose({0: (100, 80), 1: (100, 100), 2: (80, 100), 3: (30, 100), 5: (120, 100), 6: (170, 100)})
    authors = retarget_poses(sequence(ref[None]), sequence(drv[None]), mode=MODE_AUTHORS).poses.body[0, 0]
    np.testing.assert_allclose(authors[[3, 6], :2], [[20, 100], [180, 100]], atol=1e-4)  # max(40, 60) = 60
    paper = retarget_poses(sequence(ref[None]), sequence(drv[None]), mode=MODE_ALGORITHM_1).poses.body[0, 0]
    np.testing.assert_allclose(paper[[3, 6], :2], [[30, 100], [170, 100]], atol=1e-4)  # mean(40, 60) = 50


def test_bone_growing_half_again_is_clipped_to_1_1_in_authors_mode():
    # Frame 0 matches the character (forearm 40); in frame 1 the forearm is 60 (1.5x its first length).
    ref = hand_pose({0: (100, 80), 1: (100, 100), 2: (80, 100), 3: (40, 100), 4: (0, 100)})
    drv = np.stack([ref, hand_pose({0: (100, 80), 1: (100, 100), 2: (80, 100), 3: (40, 100), 4: (-20, 100)})])
    authors = retarget_poses(sequence(ref[None]), sequence(drv), mode=MODE_AUTHORS).poses.body[:, 0]
    assert authors[1, 4, 0] == pytest.approx(40 - 44, abs=1e-4)  # 40 * 1.1 = 44
    looser = retarget_poses(sequence(ref[None]), sequence(drv), mode=MODE_AUTHORS, clip=2.0).poses.body[:, 0]
    assert looser[1, 4, 0] == pytest.approx(-20, abs=1e-4)
    paper = retarget_poses(sequence(ref[None]), sequence(drv), mode=MODE_ALGORITHM_1).poses.body[:, 0]
    assert paper[1, 4, 0] == pytest.approx(-20, abs=1e-4)  # 40 * 1.5 = 60, not clipped
    np.testing.assert_allclose(authors[:, :4], paper[:, :4], atol=1e-4)


def test_neck_motion_is_scaled_by_the_neck_nose_ratio_in_authors_mode_and_by_s_in_algorithm_1():
    # Character: head 40, shoulders 20, neck at (200, 50). Driving: head 20, shoulders 20; the neck
    # moves 10 px right in frame 1, and again in frame 2, where a nod foreshortens the head to 10.
    ref = hand_pose({0: (200, 10), 1: (200, 50), 2: (180, 50), 5: (220, 50)})
    drv = np.stack([hand_pose({0: (100 + dx, 100 - h), 1: (100 + dx, 100), 2: (80 + dx, 100), 5: (120 + dx, 100)})
                    for dx, h in ((0, 20), (10, 20), (20, 10))])
    authors = retarget_poses(sequence(ref[None]), sequence(drv), mode=MODE_AUTHORS).poses.body[:, 0]
    # ratio 40/20 = 2 in frames 0-1 and 40/10 = 4 in frame 2: 200 + 10*2, 200 + 20*4.
    np.testing.assert_allclose(authors[:, 1, :2], [[200, 50], [220, 50], [280, 50]], atol=1e-4)
    np.testing.assert_allclose(authors[:, 0, :2] - authors[:, 1, :2], [[0, -40]] * 3, atol=1e-4)
    paper = retarget_poses(sequence(ref[None]), sequence(drv), mode=MODE_ALGORITHM_1)
    assert paper.body_scale == pytest.approx(80 / 60)  # (40 + 20 + 20) / (20 + 20 + 20)
    np.testing.assert_allclose(paper.poses.body[:, 0, 1, :2], [[200, 50], [200 + 40 / 3, 50], [200 + 80 / 3, 50]],
                               atol=1e-4)


# The frame that defines the driving proportions.
@pytest.mark.parametrize("mode", MODES)
def test_chosen_proportions_frame_sets_first_lengths_and_the_neck_start(mode):
    rng = np.random.default_rng(11)
    char_len = random_lengths(rng, symmetric=True)
    ref = build(np.array([[256.0, 200.0]]), char_len[None], rng.uniform(-3, 3, (1, 18)))
    l0 = random_lengths(rng, symmetric=True)
    fs = rng.uniform(0.6, 1.0, (4, 18))
    fs[2] = 1.0
    drv = build(rng.uniform(150, 350, (4, 2)), l0[None] * fs, rng.uniform(-np.pi, np.pi, (4, 18)))
    chosen = retarget_poses(sequence(ref), sequence(drv), mode=mode, proportions=PROPORTIONS_CHOSEN,
                            proportions_frame=2)
    assert chosen.proportions_frame == 2
    out = chosen.poses.body[:, 0].astype(np.float64)
    np.testing.assert_allclose(out[2, 1, :2], ref[0, 1, :2], atol=1e-3)  # that frame sits at the character's neck
    rel = fs / fs[2]
    want = char_len[None] * (np.minimum(rel, 1.1) if mode == MODE_AUTHORS else rel)
    if mode == MODE_AUTHORS:
        want[:, 0] = char_len[0]
    assert_bones(out, drv, want)
    first = retarget_poses(sequence(ref), sequence(drv), mode=mode)
    assert first.proportions_frame == 0
    assert not np.allclose(first.poses.body, chosen.poses.body, atol=1e-2)


def test_automatic_proportions_frame_is_the_most_complete_and_least_foreshortened():
    rng = np.random.default_rng(13)
    l0 = random_lengths(rng, symmetric=True)
    fs = np.ones((5, 18))
    fs[1] = 0.5  # everything foreshortened
    fs[3, [3, 4, 9]] = 0.7  # a few bones foreshortened
    drv = build(rng.uniform(150, 350, (5, 2)), l0[None] * fs, rng.uniform(-np.pi, np.pi, (5, 18)))
    drv[0, [4, 7, 10]] = 0.0  # frame 0 misses the wrists and an ankle
    drv[2, 16] = 0.0  # frame 2 misses an ear
    assert auto_proportions_frame(sequence(drv)) == 4
    res = retarget_poses(sequence(drv[4:5]), sequence(drv), proportions=PROPORTIONS_AUTO)
    assert res.proportions_frame == 4
    same = retarget_poses(sequence(drv[4:5]), sequence(drv), proportions=PROPORTIONS_CHOSEN, proportions_frame=4)
    np.testing.assert_array_equal(res.poses.body, same.poses.body)
    # A glitch that doubles every bone in one frame does not become the yardstick (the 90th percentile).
    drv2 = np.concatenate([drv] * 3)
    drv2[7, :, :2] = drv2[7, 1:2, :2] + 2.0 * (drv2[7, :, :2] - drv2[7, 1:2, :2])
    assert auto_proportions_frame(sequence(drv2)) == 4


@pytest.mark.parametrize("drop, names", [((1,), ["neck"]), ((0,), ["nose"]), ((0, 1), ["nose", "neck"])])
def test_reference_without_neck_or_nose_is_refused(drop, names):
    rng = np.random.default_rng(1)
    body = build(np.array([[256.0, 150.0]]), random_lengths(rng, True)[None], rng.uniform(-3, 3, (1, 18)))
    body[0, list(drop)] = 0.0
    with pytest.raises(ValueError, match="hand-edited pose JSON") as err:
        retarget_poses(sequence(body), sequence(body), "reference")
    for name in names:
        assert name in str(err.value)


def test_no_person_errors():
    rng = np.random.default_rng(2)
    body = build(np.array([[256.0, 150.0]]), random_lengths(rng, True)[None], rng.uniform(-3, 3, (1, 18)))
    nobody = PoseSequence.empty(3, 0, 512, 512)
    with pytest.raises(ValueError, match="reference pose has no person"):
        retarget_poses(PoseSequence.empty(1, 0, 512, 512), sequence(body))
    with pytest.raises(ValueError, match="no person in any"):
        retarget_poses(sequence(body), nobody)
    with pytest.raises(ValueError, match="no person in any of its 2 frames"):
        retarget_poses(sequence(body), sequence(np.zeros((2, 18, 3))))
    with pytest.raises(ValueError, match="canvas must be one of"):
        retarget_poses(sequence(body), sequence(body), "middle")
    with pytest.raises(ValueError, match="retarget mode must be one of authors_code, algorithm_1, got 'paper'"):
        retarget_poses(sequence(body), sequence(body), mode="paper")
    with pytest.raises(ValueError, match="clip must be a positive number .* got 0"):
        retarget_poses(sequence(body), sequence(body), clip=0)
    with pytest.raises(ValueError, match="proportions must be one of .* got 'best'"):
        retarget_poses(sequence(body), sequence(body), proportions="best")
    with pytest.raises(ValueError, match=r"proportions frame must be a frame of the driving pose \(0..0\), got 3"):
        retarget_poses(sequence(body), sequence(body), proportions=PROPORTIONS_CHOSEN, proportions_frame=3)


def test_cli_and_headless_run_default_to_the_authors_mode():
    from tcan_core.cli import build_parser
    from tcan_core.pipeline import AnimateOptions

    args = ["animate", "--reference", "r.png", "--driving", "d.json", "--out", "o.mp4"]
    assert build_parser().parse_args(args).retarget_mode == MODE_AUTHORS == AnimateOptions().retarget_mode
    for mode in MODES:  # every library mode is offered, and nothing else
        assert build_parser().parse_args(args + ["--retarget-mode", mode]).retarget_mode == mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(args + ["--retarget-mode", "paper"])
