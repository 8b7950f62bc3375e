"""TPC calibration (tcan_core.tpc): Procrustes properties, warping, sparsity, fallback, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcan_core.pose_format import PoseSequence
from tcan_core.tpc import apply_affine, calibrate, fit_similarity, person_mask_from_pose
from tcan_core.tpc.preview import preview_frames

FAST = settings(max_examples=40, deadline=None)

# A standing person on a 128 x 128 canvas, OpenPose-18 order.
SKELETON = np.array([
    [64, 24], [64, 40], [52, 40], [47, 58], [45, 76], [76, 40], [81, 58], [83, 76], [56, 76],
    [56, 98], [56, 120], [72, 76], [72, 98], [72, 120], [60, 21], [68, 21], [56, 23], [72, 23],
], np.float64)
FACE = [0, 14, 15, 16, 17]


def rotation(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def similarity(scale: float, theta: float, shift) -> np.ndarray:
    return np.concatenate([scale * rotation(theta), np.asarray(shift, np.float64)[:, None]], axis=1)


def pose(frames_xy, conf=0.9, width=128, height=128) -> PoseSequence:
    """PoseSequence with one person per frame from ``[F,18,2]`` points; conf scalar or ``[F,18]``."""
    frames_xy = np.asarray(frames_xy, np.float32).reshape(-1, 18, 2)
    seq = PoseSequence.empty(len(frames_xy), 1, width, height)
    seq.body[:, 0, :, :2] = frames_xy
    seq.body[:, 0, :, 2] = conf
    seq.people[:] = 1
    return seq


def gradient_image(height=128, width=128) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x / width, y / height, np.full_like(x, 0.5, dtype=np.float64)], -1).astype(np.float32)


points_strategy = st.integers(3, 18).flatmap(
    lambda n: st.lists(st.tuples(st.floats(0, 512), st.floats(0, 512)), min_size=n, max_size=n)
).map(lambda pts: np.asarray(pts, np.float64)).filter(lambda p: p.std(axis=0).min() > 20)


@FAST
@given(points_strategy, st.floats(0.2, 5.0), st.floats(-3.1, 3.1), st.floats(-200, 200),
       st.floats(-200, 200), st.integers(0, 2**31 - 1))
def test_recovers_known_similarity_with_noise(src, scale, theta, tx, ty, seed):
    rng = np.random.default_rng(seed)
    truth = similarity(scale, theta, (tx, ty))
    dst = apply_affine(truth, src) + rng.uniform(-0.02, 0.02, src.shape)
    weights = rng.uniform(0.3, 1.0, len(src))
    fit = fit_similarity(src[None], dst[None], weights[None])
    assert fit.valid[0] and not fit.clamped[0]
    assert fit.scale[0] == pytest.approx(scale, rel=2e-3)
    assert abs(np.angle(np.exp(1j * (fit.angle[0] - theta)))) < 2e-3
    # Over the points' own extent the recovered map agrees with the true one to noise level.
    assert np.abs(apply_affine(fit.matrix[0], src) - apply_affine(truth, src)).max() < 0.1


@FAST
@given(points_strategy, st.floats(0.3, 3.0), st.floats(-3.1, 3.1))
def test_mirrored_points_never_give_a_reflection(src, scale, theta):
    mirrored = src * np.array([-1.0, 1.0])
    dst = apply_affine(similarity(scale, theta, (300, 40)), mirrored)
    fit = fit_similarity(src[None], dst[None], np.ones((1, len(src))))
    linear = fit.matrix[0, :, :2]
    assert np.linalg.det(linear) > 0
    assert np.allclose(linear / fit.scale[0], rotation(fit.angle[0]), atol=1e-9)
    upright = fit_similarity(src[None], dst[None], np.ones((1, len(src))), allow_rotation=False,
                             scale_range=(0.1, 10.0))
    assert np.linalg.det(upright.matrix[0, :, :2]) > 0


@FAST
@given(points_strategy, st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_zero_weight_removes_a_points_influence(src, outlier, rotate, seed):
    rng = np.random.default_rng(seed)
    dst = apply_affine(similarity(1.5, 0.4, (10, -20)), src) + rng.normal(0, 3, src.shape)
    weights = rng.uniform(0.3, 1.0, len(src))
    base = fit_similarity(src[None], dst[None], weights[None], allow_rotation=rotate)
    src_plus = np.vstack([src, rng.uniform(0, 512, (1, 2))])
    dst_plus = np.vstack([dst, outlier])
    with_zero = fit_similarity(src_plus[None], dst_plus[None], np.append(weights, 0.0)[None],
                               allow_rotation=rotate)
    assert np.allclose(with_zero.matrix, base.matrix, rtol=1e-9, atol=1e-6)
    with_one = fit_similarity(src_plus[None], dst_plus[None], np.append(weights, 1.0)[None],
                              allow_rotation=rotate)
    assert not np.allclose(with_one.matrix, base.matrix, atol=1e-3)


def test_no_rotation_mode_keeps_the_reference_upright():
    src = SKELETON
    dst = apply_affine(similarity(0.5, 0.0, (30, 7)), src)
    fit = fit_similarity(src[None], dst[None], np.ones((1, 18)), allow_rotation=False)
    assert np.allclose(fit.matrix[0], similarity(0.5, 0.0, (30, 7)), atol=1e-9)
    tilted = apply_affine(similarity(0.5, 0.6, (30, 7)), src)
    fit = fit_similarity(src[None], tilted[None], np.ones((1, 18)), allow_rotation=False)
    assert fit.angle[0] == 0.0
    assert np.allclose(fit.matrix[0, :, :2], fit.scale[0] * np.eye(2))


def test_scale_outside_range_is_clamped_and_centroids_still_meet():
    src = SKELETON
    weights = np.linspace(0.4, 1.0, 18)
    frames = np.stack([apply_affine(similarity(s, 0.2, (5, 5)), src) for s in (10.0, 0.02, 1.0)])
    fit = fit_similarity(np.broadcast_to(src, frames.shape), frames, np.broadcast_to(weights, (3, 18)),
                         scale_range=(0.1, 5.0))
    assert np.allclose(fit.scale, [5.0, 0.1, 1.0])
    assert fit.clamped.tolist() == [True, True, False]
    centre_src = (weights[:, None] * src).sum(0) / weights.sum()
    centre_dst = (weights[None, :, None] * frames).sum(1) / weights.sum()
    assert np.allclose(apply_affine(fit.matrix, np.broadcast_to(centre_src, (3, 1, 2)))[:, 0], centre_dst)


def test_frames_without_two_distinct_points_are_not_valid():
    src = np.broadcast_to(SKELETON[:3], (3, 3, 2)).copy()
    dst = src + 5
    weights = np.array([[1.0, 0, 0], [0, 0, 0], [1, 1, 1]])
    dst[2] = 7.0  # all three driving points at one spot
    fit = fit_similarity(src, dst, weights)
    assert fit.valid.tolist() == [False, False, False]
    assert np.allclose(fit.matrix, similarity(1.0, 0.0, (0, 0)))


def test_person_mask_covers_the_skeleton_and_is_empty_without_points():
    body = np.concatenate([SKELETON, np.full((18, 1), 0.9)], axis=1)
    mask = person_mask_from_pose(body, 128, 128)
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    cols, rows = np.round(SKELETON).astype(int).T
    assert mask[rows, cols].all()
    torso_centre = np.round(SKELETON[[2, 5, 8, 11]].mean(0)).astype(int)
    assert mask[torso_centre[1], torso_centre[0]] == 1
    assert mask[:, :20].sum() == 0 and mask[:, 110:].sum() == 0
    body[:, 2] = 0.0
    assert person_mask_from_pose(body, 128, 128).sum() == 0


def test_portrait_mask_extends_the_torso_below_the_shoulders():
    body = np.concatenate([SKELETON, np.full((18, 1), 0.9)], axis=1)
    body[[3, 4, 6, 7, 8, 9, 10, 11, 12, 13], 2] = 0.0
    mask = person_mask_from_pose(body, 128, 128)
    assert mask[60, 64] == 1  # below the shoulders (y = 40), where the chest is


def _expected_square(matrix: np.ndarray, lo: float, hi: float, height: int, width: int, band: float = 1e-6):
    """Pixels whose centre is inside the square [lo, hi]^2 mapped through ``matrix``, and those within ``band``
    output pixels of its edge."""
    corners = apply_affine(matrix, np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]]))
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([x, y], -1).astype(np.float64)
    side = 1.0 if np.linalg.det(matrix[:, :2]) > 0 else -1.0
    inside = np.ones((height, width), bool)
    on_edge = np.zeros((height, width), bool)
    for a, b in zip(corners, np.roll(corners, -1, axis=0)):
        edge, rel = b - a, pixels - a
        distance = side * (edge[0] * rel[..., 1] - edge[1] * rel[..., 0]) / np.linalg.norm(edge)
        inside &= distance > 0
        on_edge |= np.abs(distance) < band
    return inside, on_edge


@settings(max_examples=30, deadline=None)
@given(st.floats(0.5, 2.0), st.floats(-3.1, 3.1), st.floats(-15, 15), st.floats(-15, 15))
def test_warped_square_mask_lands_where_the_transform_puts_it(scale, theta, dx, dy):
    ref_mask = np.zeros((128, 128), np.float32)
    ref_mask[40:88, 40:88] = 1.0  # pixel centres 40..87 cover [39.5, 87.5]
    out_h, out_w = 200, 176
    # Rotate and scale about the square's centre, then centre it on the output canvas.
    centre = np.array([63.5, 63.5])
    linear = scale * rotation(theta)
    truth = np.concatenate([linear, (np.array([out_w / 2 + dx, out_h / 2 + dy]) - linear @ centre)[:, None]], 1)
    driving = pose(apply_affine(truth, SKELETON)[None], width=out_w, height=out_h)
    cal = calibrate(gradient_image(), pose(SKELETON[None]), driving, reference_mask=ref_mask,
                    keypoint_set="all", sparsity=1)
    assert np.allclose(cal.transforms[0], truth, atol=1e-3)
    # Pixels within 1.5 px of the edge may go either way: the warp interpolates bilinearly, and on strong
    # shrinks it first area-reduces the mask (anti-aliasing), which softens the edge by about a pixel.
    want, on_edge = _expected_square(truth, 39.5, 87.5, out_h, out_w, band=1.5)
    got, want = cal.masks[0].numpy()[~on_edge] > 0.5, want[~on_edge]
    assert np.array_equal(got, want), f"{int((got != want).sum())} pixels away from the edge disagree"
    assert cal.masks.min() >= 0 and cal.masks.max() <= 1
    assert cal.images.min() >= 0 and cal.images.max() <= 1


def test_sparsity_reuses_the_last_calibrated_frame():
    shifts = np.arange(10) * 3.0
    driving = pose(SKELETON[None] + np.stack([shifts, np.zeros(10)], -1)[:, None])
    covered = []
    cal = calibrate(gradient_image(), pose(SKELETON[None]), driving, sparsity=4, callback=covered.append)
    assert cal.calibrated_frames.tolist() == [0, 4, 8]
    assert cal.frame_to_calibrated.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert covered == [4, 4, 2]
    assert cal.images.shape == (3, 128, 128, 3) and cal.masks.shape == (3, 128, 128)
    assert np.allclose(cal.transforms[:, 0, 2], shifts[(np.arange(10) // 4) * 4], atol=1e-4)
    frames = cal.frame_images()
    assert frames.shape == (10, 128, 128, 3)
    assert (frames[5] == frames[4]).all() and (frames[7] == cal.images[1]).all()
    assert not (frames[8] == frames[4]).all()
    assert (cal.frame_masks([9])[0] == cal.masks[2]).all()
    every = calibrate(gradient_image(), pose(SKELETON[None]), driving, sparsity=1)
    assert np.allclose(every.transforms[:, 0, 2], shifts, atol=1e-4)
    assert (every.images[4] == cal.images[1]).all()


def test_frames_that_cannot_be_fitted_reuse_the_nearest_fitted_frame():
    driving_xy = SKELETON[None] + np.stack([np.arange(9) * 2.0, np.zeros(9)], -1)[:, None]
    conf = np.full((9, 18), 0.9)
    conf[[0, 3, 4], :] = 0.0  # frames 0, 3, 4 lose the face; 0 falls back to 1, 4 to 5
    conf[8, FACE[1:]] = 0.0   # frame 8 keeps only the nose: one point
    cal = calibrate(gradient_image(), pose(SKELETON[None]), pose(driving_xy, conf), sparsity=4)
    assert cal.source_frames.tolist() == [1, 5, 7]
    assert cal.fell_back.tolist() == [True, True, True]
    assert np.allclose(cal.transforms[:, 0, 2], [2, 2, 2, 2, 10, 10, 10, 10, 14], atol=1e-4)
    text = cal.summary()
    assert "Fell back" in text and "4 (from 5)" in text and "8 (from 7)" in text


def test_a_tie_falls_back_to_the_earlier_frame():
    conf = np.full((3, 18), 0.9)
    conf[1] = 0.0
    driving = pose(SKELETON[None] + np.array([[[0, 0]], [[5, 0]], [[9, 0]]]), conf)
    cal = calibrate(gradient_image(), pose(SKELETON[None]), driving, sparsity=1)
    assert cal.source_frames.tolist() == [0, 0, 2]


def test_no_fittable_frame_names_the_keypoint_set_to_choose():
    conf = np.full((4, 18), 0.9)
    conf[:, FACE] = 0.0
    driving = pose(np.broadcast_to(SKELETON, (4, 18, 2)), conf)
    with pytest.raises(ValueError, match="no driving frame shares two or more 'face'.*choose keypoint set 'body'"):
        calibrate(gradient_image(), pose(SKELETON[None]), driving, keypoint_set="face")
    ref_conf = np.full((1, 18), 0.9)
    ref_conf[0, FACE] = 0.1
    with pytest.raises(ValueError, match="reference pose has only 0 of the 'face' keypoints.*'body'"):
        calibrate(gradient_image(), pose(SKELETON[None], ref_conf), pose(SKELETON[None]))
    lone = np.zeros((2, 18))
    lone[:, 0] = 0.9
    with pytest.raises(ValueError, match="no keypoint set fits any frame"):
        calibrate(gradient_image(), pose(SKELETON[None]), pose(np.broadcast_to(SKELETON, (2, 18, 2)), lone))


def test_clamped_transforms_are_counted_in_the_report():
    big = apply_affine(similarity(8.0, 0.0, (-400, -100)), SKELETON)
    driving = pose(np.stack([big, SKELETON, big]), width=128, height=128)
    cal = calibrate(gradient_image(), pose(SKELETON[None]), driving, sparsity=1, scale_range=(0.5, 4.0))
    assert cal.clamped.tolist() == [True, False, True]
    assert np.allclose(cal.scales, [4.0, 1.0, 4.0])
    assert "Clamped to scale range 0.5..4: 2 of 3 calibrated frames: 0, 2" in cal.summary()


def test_mask_is_derived_from_the_pose_only_when_none_is_given():
    driving = pose(SKELETON[None])
    derived = calibrate(gradient_image(), pose(SKELETON[None]), driving)
    assert derived.mask_from_pose and "segmentation mask" in derived.summary()
    expected = person_mask_from_pose(pose(SKELETON[None]).body[0, 0], 128, 128)
    assert np.abs(derived.masks[0].numpy() - expected).max() < 1e-4
    given_mask = np.zeros((128, 128), np.float32)
    given_mask[10:50, 10:50] = 1.0
    supplied = calibrate(gradient_image(), pose(SKELETON[None]), driving, reference_mask=given_mask)
    assert not supplied.mask_from_pose and "segmentation mask" not in supplied.summary()
    assert np.abs(supplied.masks[0].numpy() - given_mask).max() < 1e-4


def test_reference_pose_on_another_canvas_is_scaled_to_the_image():
    driving = pose(apply_affine(similarity(0.8, 0.3, (20, 10)), SKELETON)[None])
    same = calibrate(gradient_image(), pose(SKELETON[None]), driving)
    doubled = calibrate(gradient_image(), pose(SKELETON[None] * 2, width=256, height=256), driving)
    assert np.allclose(same.transforms, doubled.transforms, atol=1e-4)


def test_output_canvas_is_the_driving_size_and_driving_masks_follow_the_driving_person():
    driving = pose(apply_affine(similarity(1.2, 0.0, (40, 30)), SKELETON)[None], width=240, height=180)
    cal = calibrate(gradient_image(), pose(SKELETON[None]), driving, keypoint_set="body")
    assert cal.images.shape == (1, 180, 240, 3) and (cal.width, cal.height) == (240, 180)
    person = cal.driving_person_masks()
    assert person.shape == (1, 180, 240)
    cols, rows = np.round(driving.body[0, 0, :, :2]).astype(int).T
    assert (person[0].numpy()[rows, cols] == 1).all()
    assert cal.keypoint_indices == tuple(range(1, 14))


def test_person_index_picks_the_person_in_reference_and_driving_poses():
    two = PoseSequence.empty(1, 2, 128, 128)
    two.body[0, 0, :, :2], two.body[0, 1, :, :2] = SKELETON, SKELETON + [10, 0]
    two.body[0, :, :, 2] = 0.9
    two.people[:] = 2
    driving = PoseSequence.empty(2, 2, 128, 128)
    driving.body[:, 0, :, :2], driving.body[:, 1, :, :2] = SKELETON + [0, 5], SKELETON + [30, 0]
    driving.body[:, :, :, 2] = 0.9
    driving.people[:] = [2, 1]
    cal = calibrate(gradient_image(), two, driving, person_index=1, sparsity=1)
    # Frame 0: person 1 of both (shift 30 - 10); frame 1 has no person 1 and falls back to frame 0.
    assert np.allclose(cal.transforms[:, :, 2], [[20, 0], [20, 0]], atol=1e-4)
    assert cal.no_person_frames.tolist() == [1]
    first = calibrate(gradient_image(), pose(SKELETON[None]), driving, sparsity=1)
    assert np.allclose(first.transforms[:, :, 2], [[0, 5], [0, 5]], atol=1e-4)
    assert "1 driving frames have more than one person" in first.summary()


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(ref=PoseSequence.empty(1, 0, 128, 128)), "reference pose has no person: the pose detector"),
    (lambda a: a.update(ref=pose(SKELETON[None], conf=0.1)), "reference pose has no person: person 0 has no keypoint"),
    (lambda a: a.update(ref=pose(np.stack([SKELETON, SKELETON]))), "reference pose must have 1 frame, got 2"),
    (lambda a: a.update(mask=np.zeros((128, 128), np.float32)), "reference mask is empty"),
    (lambda a: a.update(mask=np.ones((128, 128, 1), np.float32)), r"reference mask must be one \[H,W\] mask"),
    (lambda a: a.update(mask=np.ones((64, 128), np.float32)), "reference mask is 128x64 but the reference image is 128x128"),
    (lambda a: a.update(image=np.zeros((128, 128), np.float32)), r"reference image must be \[H,W,3\] \(one RGB image\), got \(128, 128\)"),
    (lambda a: a.update(kw={"keypoint_set": "hands"}), "keypoint set must be one of .*'hands'"),
    (lambda a: a.update(kw={"sparsity": 0}), "sparsity must be a whole number >= 1.*got 0"),
    (lambda a: a.update(kw={"min_confidence": 1.5}), "min_confidence must be in 0..1, got 1.5"),
    (lambda a: a.update(kw={"scale_range": (3.0, 1.0)}), "0 < min_scale <= max_scale, got 3.0 and 1.0"),
    (lambda a: a.update(kw={"person_index": 2}), "person_index is 2 but the reference pose has only 1 person"),
])
def test_bad_inputs_get_their_own_message(change, message):
    args = {"image": gradient_image(), "ref": pose(SKELETON[None]), "mask": None, "kw": {}}
    change(args)
    with pytest.raises(ValueError, match=message):
        calibrate(args["image"], args["ref"], pose(SKELETON[None]), reference_mask=args["mask"], **args["kw"])


def test_several_reference_people_and_none_chosen():
    two = PoseSequence.empty(1, 2, 128, 128)
    two.body[0, :, :, :2] = SKELETON
    two.body[0, :, :, 2] = 0.9
    two.people[:] = 2
    with pytest.raises(ValueError, match="reference pose has 2 people and none is chosen: set person_index to 0..1"):
        calibrate(gradient_image(), two, pose(SKELETON[None]))


def test_preview_draws_the_skeleton_over_the_calibrated_reference():
    driving = pose(np.stack([SKELETON, SKELETON + [6, 0], SKELETON + [12, 0]]))
    cal = calibrate(gradient_image(), pose(SKELETON[None]), driving, sparsity=2)
    chunks = []
    preview = preview_frames(cal, callback=chunks.append)
    assert preview.shape == (3, 128, 128, 3) and sum(chunks) == 3
    assert preview.min() >= 0 and preview.max() <= 1
    changed = (preview - cal.frame_images()).abs().amax(-1) > 0.05
    # Every frame's own neck (not the reused calibrated frame's) carries the skeleton.
    for f in range(3):
        x, y = np.round(driving.body[f, 0, 1, :2]).astype(int)
        assert changed[f, y, x]
    far = changed[:, :, :15].sum()
    assert far == 0
