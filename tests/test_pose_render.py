"""Pose rendering in the OpenPose ControlNet's convention."""

from __future__ import annotations

import numpy as np
import pytest

from tcan_core.pose import render
from tcan_core.pose.render import render_poses
from tcan_core.pose_format import PoseSequence

# A standing figure on a 512 x 512 canvas with every limb far from the others at its midpoint.
FIGURE = {0: (256, 110), 1: (256, 170), 2: (196, 170), 3: (170, 250), 4: (160, 330), 5: (316, 170),
          6: (342, 250), 7: (352, 330), 8: (226, 320), 9: (220, 400), 10: (215, 480), 11: (286, 320),
          12: (292, 400), 13: (297, 480), 14: (226, 80), 15: (286, 80), 16: (196, 100), 17: (316, 100)}
WRIST = np.array([40.0, 300.0])


def figure(frames: int = 1) -> PoseSequence:
    seq = PoseSequence.empty(frames, 1, 512, 512)
    for k, (x, y) in FIGURE.items():
        seq.body[:, 0, k] = (x, y, 1.0)
    # Left hand: five fingers fanned 30 degrees apart, joints 25 px apart, away from the body.
    for finger in range(5):
        angle = np.radians(-60 + 30 * finger)
        direction = np.array([np.cos(angle), -np.sin(angle)])
        for j in range(4):
            seq.hands[:, 0, 0, 1 + 4 * finger + j, :2] = WRIST + direction * 25 * (j + 1)
    seq.hands[:, 0, 0, 0, :2] = WRIST
    seq.hands[:, 0, 0, :, 2] = 1.0
    seq.face[:, 0, :5] = [[240, 40, 1], [250, 40, 1], [260, 40, 1], [270, 40, 1], [280, 40, 1]]
    seq.people[:] = 1
    return seq


def colour_at(img: np.ndarray, xy) -> tuple:
    x, y = (int(v) for v in xy)
    return tuple(int(c) for c in img[y, x])


def test_colour_tables_follow_the_openpose_convention():
    assert render.BODY_COLORS.shape == (18, 3) and len(render.BODY_LIMBS) == 17
    assert tuple(render.BODY_COLORS[0]) == (255, 0, 0)
    assert tuple(render.BODY_COLORS[12]) == (0, 0, 255)
    assert tuple(render.BODY_COLORS[17]) == (255, 0, 85)
    assert tuple(render.LIMB_COLORS[0]) == (153, 0, 0)
    assert tuple(render.LIMB_COLORS[1]) == (153, 51, 0)
    assert tuple(render.LIMB_COLORS[10]) == (0, 102, 153)
    assert render.BODY_LIMBS[0] == (1, 2) and render.BODY_LIMBS[12] == (1, 0)
    assert len(render.HAND_EDGES) == 20
    assert tuple(render.HAND_EDGE_COLORS[0]) == (255, 0, 0)
    assert tuple(render.HAND_EDGE_COLORS[10]) == (0, 255, 255)
    assert render.HAND_POINT_COLOR == (0, 0, 255) and render.FACE_POINT_COLOR == (255, 255, 255)


@pytest.mark.parametrize("size", [(512, 512), (1024, 768), (384, 640)])
def test_limb_midpoints_and_joints_have_their_colours(size):
    width, height = size
    img = render_poses(figure(), width, height)[0]
    sx, sy = width / 512, height / 512
    for i, (a, b) in enumerate(render.BODY_LIMBS):
        mid = ((FIGURE[a][0] + FIGURE[b][0]) / 2 * sx, (FIGURE[a][1] + FIGURE[b][1]) / 2 * sy)
        assert colour_at(img, mid) == tuple(render.LIMB_COLORS[i]), f"limb {i} {a}->{b}"
    for k, (x, y) in FIGURE.items():
        assert colour_at(img, (x * sx, y * sy)) == tuple(render.BODY_COLORS[k]), f"joint {k}"


def test_hand_edges_points_and_face_dots():
    seq = figure()
    img = render_poses(seq)[0]
    hand = seq.hands[0, 0, 0, :, :2]
    for i, (a, b) in enumerate(render.HAND_EDGES):
        assert colour_at(img, (hand[a] + hand[b]) / 2) == tuple(render.HAND_EDGE_COLORS[i]), f"edge {i}"
    for point in hand:
        assert colour_at(img, point) == render.HAND_POINT_COLOR
    for point in seq.face[0, 0, :5, :2]:
        assert colour_at(img, point) == render.FACE_POINT_COLOR


def test_toggles_remove_what_they_should():
    seq = figure()
    full = render_poses(seq)[0]
    hand_point = seq.hands[0, 0, 0, 5, :2]
    face_point = seq.face[0, 0, 0, :2]

    no_body = render_poses(seq, body=False)[0]
    for k, (x, y) in FIGURE.items():
        assert colour_at(no_body, (x, y)) == (0, 0, 0)
    assert colour_at(no_body, hand_point) == render.HAND_POINT_COLOR

    no_hands = render_poses(seq, hands=False)[0]
    assert colour_at(no_hands, hand_point) == (0, 0, 0)
    assert full[:, :150].any() and not no_hands[:, :150].any(), "only the hand is drawn left of x=150"
    assert colour_at(no_hands, face_point) == render.FACE_POINT_COLOR

    no_face = render_poses(seq, face=False)[0]
    assert not (no_face == 255).all(-1).any()
    assert (full == 255).all(-1).any()

    nothing = render_poses(seq, body=False, hands=False, face=False)
    assert not nothing.any()


def test_missing_points_and_empty_frames_are_not_drawn():
    seq = figure(3)
    seq.body[0, 0, 3, 2] = 0.0  # right elbow missing: its joint and both its limbs disappear
    seq.body[1] = seq.face[1] = seq.hands[1] = 0.0
    seq.people[1] = 0
    seq.people[2] = 0  # a frame that says it has no person is black even if its arrays are not
    img = render_poses(seq)
    for i in (2, 3):
        a, b = render.BODY_LIMBS[i]
        mid = ((FIGURE[a][0] + FIGURE[b][0]) / 2, (FIGURE[a][1] + FIGURE[b][1]) / 2)
        assert colour_at(img[0], mid) == (0, 0, 0)
    assert colour_at(img[0], FIGURE[3]) == (0, 0, 0)
    assert colour_at(img[0], FIGURE[6]) == tuple(render.BODY_COLORS[6])
    assert not img[1].any() and not img[2].any()


def test_size_dtype_and_default_canvas():
    seq = figure(2)
    seq.width, seq.height = 300, 200
    out = render_poses(seq, 96, 64)
    assert out.shape == (2, 64, 96, 3) and out.dtype == np.uint8
    assert render_poses(seq).shape == (2, 200, 300, 3)
    assert render_poses(PoseSequence.empty(0, 0, 64, 64)).shape == (0, 64, 64, 3)


def test_strokes_scale_with_the_canvas():
    seq = PoseSequence.empty(1, 1, 512, 512)
    seq.body[0, 0, 1] = (256, 256, 1.0)
    seq.people[:] = 1
    small = render_poses(seq, 256, 256)[0]
    big = render_poses(seq, 1024, 1024)[0]
    assert (big.any(-1).sum() / small.any(-1).sum()) == pytest.approx(16.0, rel=0.35)


def test_progress_callback_counts_every_frame():
    counts = []
    render_poses(figure(40), 64, 64, callback=counts.append)
    assert sum(counts) == 40 and len(counts) == 3


def test_absurd_coordinates_do_not_crash():
    seq = figure()
    seq.body[0, 0, 4, :2] = (1e12, -1e12)
    seq.body[0, 0, 7, 0] = np.nan
    img = render_poses(seq)[0]
    assert colour_at(img, FIGURE[1]) == tuple(render.BODY_COLORS[1])


@pytest.mark.parametrize("size", [(0, 64), (64, -1)])
def test_bad_size_is_refused(size):
    with pytest.raises(ValueError, match="at least 1 x 1"):
        render_poses(figure(), *size)
