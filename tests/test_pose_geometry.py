"""TCAN retargeting (Algorithm 1): properties checked on random skeletons built by forward kinematics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcan_core.pose.retarget import retarget_poses
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


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st)
def test_neck_stays_where_it_should(seed, frames):
    rng = np.random.default_rng(seed)
    char_len = random_lengths(rng, symmetric=False)
    ref = build(rng.uniform(100, 400, (1, 2)), char_len[None], rng.uniform(-np.pi, np.pi, (1, 18)))
    l0 = random_lengths(rng, symmetric=False)
    drv, _ = driving_clip(rng, frames, l0)
    s = symmetrised(char_len)[list(PARENT)].sum() / l0[list(PARENT)].sum()

    out = retarget_poses(sequence(ref), sequence(drv, 640, 480), "reference")
    expected = ref[0, 1, :2] + s * (drv[:, 1, :2] - drv[0, 1, :2])
    np.testing.assert_allclose(out.poses.body[:, 0, 1, :2], expected, rtol=1e-5, atol=1e-2)
    assert (out.poses.width, out.poses.height) == (512, 512)
    assert out.body_scale == pytest.approx(s, rel=1e-5)

    out = retarget_poses(sequence(ref), sequence(drv, 640, 480), "driving")
    np.testing.assert_allclose(out.poses.body[:, 0, 1, :2], drv[:, 1, :2], rtol=1e-5, atol=1e-2)
    assert (out.poses.width, out.poses.height) == (640, 480)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st)
def test_bone_length_is_character_length_times_foreshortening(seed, frames):
    rng = np.random.default_rng(seed)
    char_len = random_lengths(rng, symmetric=False)
    ref = build(rng.uniform(100, 400, (1, 2)), char_len[None], rng.uniform(-np.pi, np.pi, (1, 18)))
    l0 = random_lengths(rng, symmetric=False)
    drv, fs = driving_clip(rng, frames, l0)
    target = symmetrised(char_len)

    out = retarget_poses(sequence(ref), sequence(drv), "reference").poses.body[:, 0].astype(np.float64)
    for j in PARENT:
        got, drive = bone(out, j), bone(drv, j)
        np.testing.assert_allclose(np.hypot(*got.T), target[j] * fs[:, j], rtol=1e-4, atol=1e-2)
        # The direction is the driving frame's: parallel and pointing the same way.
        cross = got[:, 0] * drive[:, 1] - got[:, 1] * drive[:, 0]
        np.testing.assert_allclose(cross / (np.hypot(*got.T) * np.hypot(*drive.T)), 0.0, atol=1e-4)
        assert ((got * drive).sum(-1) > 0).all()


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=frames_st, scale=st.floats(0.25, 4.0))
def test_driving_in_character_proportions_comes_back_unchanged(seed, frames, scale):
    rng = np.random.default_rng(seed)
    l0 = random_lengths(rng, symmetric=True)
    drv, _ = driving_clip(rng, frames, l0)

    # Same proportions and size, on the same canvas: reference mode changes nothing.
    out = retarget_poses(sequence(drv[:1]), sequence(drv), "reference").poses.body[:, 0]
    np.testing.assert_allclose(out, drv, rtol=1e-5, atol=1e-2)

    # Points lost after the first frame (the neck too) change nothing else.
    holed = drv.copy()
    holed[1:][rng.random(holed[1:].shape[:2]) < 0.3] = 0.0
    out = retarget_poses(sequence(drv[:1]), sequence(holed), "reference").poses.body[:, 0]
    np.testing.assert_allclose(out, holed, rtol=1e-5, atol=1e-2)

    # Same proportions at another size: the driving canvas keeps the driving poses.
    ref = drv[:1].copy()
    ref[..., :2] = (ref[..., :2] - ref[:, 1:2, :2]) * scale + 256.0
    out = retarget_poses(sequence(ref), sequence(drv), "driving").poses.body[:, 0]
    np.testing.assert_allclose(out, drv, rtol=1e-5, atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, frames=st.integers(2, 6), drop=st.floats(0.05, 0.6))
def test_missing_points_stay_missing(seed, frames, drop):
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
        out = retarget_poses(sequence(ref), seq, canvas).poses
        np.testing.assert_array_equal(out.body[:, 0, :, 2], seq.body[:, 0, :, 2])
        np.testing.assert_array_equal(out.hands[:, 0, ..., 2], seq.hands[:, 0, ..., 2])
        np.testing.assert_array_equal(out.face[:, 0, :, 2], seq.face[:, 0, :, 2])
        assert (out.body[:, 0][missing] == 0).all()
        assert np.isfinite(out.body).all()


def test_point_with_missing_parent_moves_only_with_its_ancestors():
    rng = np.random.default_rng(3)
    ref = build(np.array([[256.0, 150.0]]), random_lengths(rng, True)[None] * 2, rng.uniform(-3, 3, (1, 18)))
    drv, _ = driving_clip(rng, 2, random_lengths(rng, True))
    drv[1, 3] = 0.0  # right elbow lost in frame 1: the wrist keeps its place relative to the shoulder
    out = retarget_poses(sequence(ref), sequence(drv), "driving").poses.body[:, 0]
    assert out[1, 3, 2] == 0
    wrist_from_shoulder = drv[1, 4, :2] - drv[1, 2, :2]
    s = retarget_poses(sequence(ref), sequence(drv), "driving").body_scale
    np.testing.assert_allclose(out[1, 4, :2] - out[1, 2, :2], wrist_from_shoulder / s, rtol=1e-4, atol=1e-2)


def test_hands_follow_wrists_and_face_follows_nose():
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
    res = retarget_poses(sequence(ref), seq, "reference")
    out, s = res.poses, res.body_scale
    for h, wrist in ((0, 7), (1, 4)):
        got = out.hands[:, 0, h, :, :2] - out.body[:, 0, wrist, None, :2]
        want = (seq.hands[:, 0, h, :, :2] - drv[:, wrist, None, :2]) * s
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)
    head = char_len[0] / l0[0]
    got = out.face[:, 0, :, :2] - out.body[:, 0, 0, None, :2]
    np.testing.assert_allclose(got, (seq.face[:, 0, :, :2] - drv[:, 0, None, :2]) * head, rtol=1e-4, atol=1e-2)


def test_frames_without_person_stay_empty_and_person_zero_is_used():
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
    res = retarget_poses(ref, seq, "reference")
    assert res.empty_frames == 1
    np.testing.assert_array_equal(res.poses.people, [1, 0, 1, 1])
    assert (res.poses.body[1] == 0).all()
    np.testing.assert_allclose(res.poses.body[:, 0][[0, 2, 3]], drv[[0, 2, 3]], rtol=1e-5, atol=1e-2)


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
