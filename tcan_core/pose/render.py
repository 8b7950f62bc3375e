"""Draw poses the way the OpenPose ControlNet was trained to read them.

The convention is the one of lllyasviel's OpenPose annotator, kept by ``controlnet_aux``
(``draw_bodypose``, ``draw_handpose``, ``draw_facepose``): on black, the 17 limbs of OpenPose-18
as filled ellipses of half-width 4 in the limb colours dimmed to 60%, then the 18 joints as
filled circles of radius 4 in the joint colours; hands as 20 lines of width 2 coloured by HSV hue
around the hand with blue points of radius 4; face as white dots of radius 3. Each person is
drawn body, then hands, then face, like ``controlnet_aux.open_pose.draw_poses``.

Size: ``controlnet_aux`` draws at the detection resolution (short side 512) and resizes the
drawing to the output size, so its strokes grow with the canvas. We draw directly at the output
size and scale every stroke by ``min(width, height) / 512`` (rounded, at least 1 pixel), which
gives the exact convention at 512 and the same look as the resized drawing elsewhere.
"""

from __future__ import annotations

import colorsys
import logging
from typing import Callable

import cv2
import numpy as np

from tcan_core.pose_format import PoseSequence

log = logging.getLogger(__name__)

# (parent, child) keypoint pairs of OpenPose-18, in the annotator's drawing (and colour) order.
BODY_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)

# RGB; joint k is drawn in BODY_COLORS[k], limb i in BODY_COLORS[i] * LIMB_BRIGHTNESS.
BODY_COLORS = np.array([
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
    [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
    [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
], dtype=np.uint8)
LIMB_BRIGHTNESS = 0.6
# The annotator truncates (int(c * 0.6)), so 255 -> 153, 170 -> 102, 85 -> 51.
LIMB_COLORS = (BODY_COLORS[: len(BODY_LIMBS)].astype(np.float64) * LIMB_BRIGHTNESS).astype(np.uint8)

HAND_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
# Edge i has hue i / 20 at full saturation and value; cv2 rounds the float colour half to even.
HAND_EDGE_COLORS = np.rint(
    np.array([colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0) for i in range(len(HAND_EDGES))]) * 255
).astype(np.uint8)
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_COLOR = (255, 255, 255)

BASE_RESOLUTION = 512
STICK_WIDTH = 4
JOINT_RADIUS = 4
HAND_LINE_WIDTH = 2
HAND_POINT_RADIUS = 4
FACE_POINT_RADIUS = 3

# Frames drawn between two progress callbacks.
CALLBACK_EVERY = 16

# Coordinates are clamped this many canvas sizes away from the canvas so cv2's int32 math
# cannot overflow on absurd inputs; anything that far off is not visible anyway.
_FAR = 8


def stroke_scale(width: int, height: int) -> float:
    """Stroke size factor for a ``width`` x ``height`` canvas: 1 at a short side of 512."""
    return min(width, height) / BASE_RESOLUTION


def _px(size: int, scale: float) -> int:
    return max(1, int(round(size * scale)))


def _to_canvas(points: np.ndarray, sx: float, sy: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``[..., 3]`` pose points -> (``[..., 2]`` float pixel coordinates on the output canvas, ``[...]`` seen)."""
    xy = points[..., :2].astype(np.float64) * np.array([sx, sy])
    seen = (points[..., 2] > 0) & np.isfinite(xy).all(-1)
    far = _FAR * max(width, height)
    xy = np.clip(np.nan_to_num(xy), -far, far)
    return xy, seen


def _check_size(width: int, height: int) -> None:
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"render size must be at least 1 x 1 pixels, got {width} x {height}; "
                         "set width and height to the size of the images you will generate")


def render_poses(seq: PoseSequence, width: int | None = None, height: int | None = None,
                 body: bool = True, hands: bool = True, face: bool = True,
                 callback: Callable[[int], None] | None = None) -> np.ndarray:
    """Draw every person of every frame on black: ``seq`` -> uint8 RGB ``[F,H,W,3]``.

    Coordinates are scaled from ``seq``'s canvas to ``width`` x ``height`` (default: ``seq``'s
    canvas); missing points (confidence 0) and the limbs that touch them are not drawn.
    ``callback(n)`` is called after every few frames with the number of frames drawn since.
    """
    width = int(seq.width if width is None else width)
    height = int(seq.height if height is None else height)
    _check_size(width, height)
    if seq.width < 1 or seq.height < 1:
        raise ValueError(f"pose canvas must be at least 1 x 1 pixels, got {seq.width} x {seq.height}")
    frames = seq.num_frames
    out = np.zeros((frames, height, width, 3), np.uint8)
    if frames == 0 or seq.body.shape[1] == 0:
        if callback is not None and frames:
            callback(frames)
        return out
    sx, sy = width / seq.width, height / seq.height
    scale = stroke_scale(width, height)
    people = np.minimum(seq.people.astype(np.int64), seq.body.shape[1])

    body_draw = _body_geometry(seq.body, sx, sy, width, height) if body else None
    hand_draw = _hand_geometry(seq.hands, sx, sy, width, height) if hands else None
    face_draw = _points_geometry(seq.face, sx, sy, width, height) if face else None

    stick = _px(STICK_WIDTH, scale)
    joint_r = _px(JOINT_RADIUS, scale)
    hand_w = _px(HAND_LINE_WIDTH, scale)
    hand_r = _px(HAND_POINT_RADIUS, scale)
    face_r = _px(FACE_POINT_RADIUS, scale)
    limb_colors = [tuple(int(c) for c in col) for col in LIMB_COLORS]
    joint_colors = [tuple(int(c) for c in col) for col in BODY_COLORS]
    edge_colors = [tuple(int(c) for c in col) for col in HAND_EDGE_COLORS]

    for f in range(frames):
        canvas = out[f]
        for p in range(int(people[f])):
            if body_draw is not None:
                _draw_body(canvas, body_draw, f, p, stick, joint_r, limb_colors, joint_colors)
            if hand_draw is not None:
                _draw_hands(canvas, hand_draw, f, p, hand_w, hand_r, edge_colors)
            if face_draw is not None:
                pts, seen = face_draw
                for x, y in pts[f][p][seen[f, p]].tolist():
                    cv2.circle(canvas, (x, y), face_r, FACE_POINT_COLOR, thickness=-1)
        if callback is not None and ((f + 1) % CALLBACK_EVERY == 0 or f + 1 == frames):
            callback((f % CALLBACK_EVERY) + 1)
    return out


def _body_geometry(body: np.ndarray, sx: float, sy: float, width: int, height: int):
    """Limb ellipses and joint centres for all frames at once, as the annotator computes them."""
    xy, seen = _to_canvas(body, sx, sy, width, height)
    a = np.array([l[0] for l in BODY_LIMBS])
    b = np.array([l[1] for l in BODY_LIMBS])
    pa, pb = xy[:, :, a], xy[:, :, b]
    mid = ((pa + pb) / 2).astype(np.int64)
    d = pa - pb
    half_len = (np.hypot(d[..., 0], d[..., 1]) / 2).astype(np.int64)
    angle = np.degrees(np.arctan2(d[..., 1], d[..., 0])).astype(np.int64)
    limb_seen = seen[:, :, a] & seen[:, :, b]
    limbs = np.concatenate([mid, half_len[..., None], angle[..., None]], axis=-1).tolist()
    joints = xy.astype(np.int64).tolist()
    return limbs, limb_seen.tolist(), joints, seen.tolist()


def _draw_body(canvas, geom, f, p, stick, joint_r, limb_colors, joint_colors) -> None:
    limbs, limb_seen, joints, seen = geom
    for i, (mx, my, half, ang) in enumerate(limbs[f][p]):
        if limb_seen[f][p][i]:
            poly = cv2.ellipse2Poly((mx, my), (half, stick), ang, 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, limb_colors[i])
    for k, (x, y) in enumerate(joints[f][p]):
        if seen[f][p][k]:
            cv2.circle(canvas, (x, y), joint_r, joint_colors[k], thickness=-1)


def _hand_geometry(hands: np.ndarray, sx: float, sy: float, width: int, height: int):
    xy, seen = _to_canvas(hands, sx, sy, width, height)
    a = np.array([e[0] for e in HAND_EDGES])
    b = np.array([e[1] for e in HAND_EDGES])
    edge_seen = seen[..., a] & seen[..., b]
    return xy.astype(np.int64).tolist(), seen.tolist(), edge_seen.tolist()


def _draw_hands(canvas, geom, f, p, line_w, point_r, edge_colors) -> None:
    pts, seen, edge_seen = geom
    for h in range(2):
        hand, hand_seen = pts[f][p][h], seen[f][p][h]
        for i, (a, b) in enumerate(HAND_EDGES):
            if edge_seen[f][p][h][i]:
                cv2.line(canvas, tuple(hand[a]), tuple(hand[b]), edge_colors[i], thickness=line_w)
        for k, (x, y) in enumerate(hand):
            if hand_seen[k]:
                cv2.circle(canvas, (x, y), point_r, HAND_POINT_COLOR, thickness=-1)


def _points_geometry(points: np.ndarray, sx: float, sy: float, width: int, height: int):
    xy, seen = _to_canvas(points, sx, sy, width, height)
    return xy.astype(np.int64), seen
