"""A synthetic scene for the demo: a driving dance, a character's pose and a picture of it.

No footage ships with the pack, so the demo makes its own: a dancer whose arms swing and whose
body sways and comes closer to the camera, and a character with other proportions (long legs,
short arms) drawn as a simple figure on a backdrop.
"""

from __future__ import annotations

import cv2
import numpy as np

from .pose_format import PoseSequence

# OpenPose-18 standing skeleton in units of body height, neck at the origin (x right, y down).
_STAND = np.array([
    (0.0, -0.12), (0.0, 0.0), (-0.10, 0.0), (-0.13, 0.16), (-0.15, 0.30), (0.10, 0.0), (0.13, 0.16),
    (0.15, 0.30), (-0.06, 0.32), (-0.07, 0.55), (-0.07, 0.78), (0.06, 0.32), (0.07, 0.55), (0.07, 0.78),
    (-0.03, -0.15), (0.03, -0.15), (-0.06, -0.13), (0.06, -0.13),
], np.float32)
_LIMB_SCALE = {3: 1.0, 4: 1.0, 6: 1.0, 7: 1.0}


def driving_dance(frames: int = 24, width: int = 512, height: int = 512) -> PoseSequence:
    """A dancer swinging the arms, swaying, and walking a little towards the camera."""
    seq = PoseSequence.empty(frames, 1, width, height)
    t = np.linspace(0.0, 2.0 * np.pi, frames, endpoint=False)
    size = height * (0.62 + 0.08 * np.sin(t / 2.0))
    pts = np.repeat(_STAND[None], frames, axis=0) * size[:, None, None]
    swing = 0.7 * np.sin(t)
    for shoulder, elbow, wrist, sign in ((2, 3, 4, -1.0), (5, 6, 7, 1.0)):
        angle = sign * swing
        for joint in (elbow, wrist):
            rel = pts[:, joint] - pts[:, shoulder]
            c, s = np.cos(angle), np.sin(angle)
            pts[:, joint] = pts[:, shoulder] + np.stack([c * rel[:, 0] - s * rel[:, 1],
                                                         s * rel[:, 0] + c * rel[:, 1]], -1)
    neck = np.stack([width / 2 + 40 * np.sin(t), np.full(frames, height * 0.22)], -1)
    seq.body[:, 0, :, :2] = pts + neck[:, None, :]
    seq.body[:, 0, :, 2] = 1.0
    seq.people[:] = 1
    return seq


def character_pose(width: int = 384, height: int = 512) -> PoseSequence:
    """The character: longer legs, shorter arms and a bigger head than the dancer."""
    seq = PoseSequence.empty(1, 1, width, height)
    pts = _STAND.copy()
    pts[[3, 4, 6, 7]] *= np.array([1.0, 0.8], np.float32)
    pts[[9, 10, 12, 13], 1] = pts[[9, 10, 12, 13], 1] * 1.15
    pts[[0, 14, 15, 16, 17]] *= 1.3
    seq.body[0, 0, :, :2] = pts * (height * 0.75) + np.array([width / 2, height * 0.18], np.float32)
    seq.body[0, 0, :, 2] = 1.0
    seq.people[:] = 1
    return seq


def character_image(pose: PoseSequence) -> np.ndarray:
    """uint8 ``[H,W,3]`` picture of the character: a striped backdrop and a figure with a face."""
    h, w = pose.height, pose.width
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([40 + 30 * ((xx // 32) % 2), 60 + 0 * xx, 90 + 40 * (yy / h)], -1).astype(np.uint8)
    body = pose.body[0, 0, :, :2].astype(np.int32)
    thick = max(6, w // 24)
    for a, b, colour in ((1, 8, (200, 60, 60)), (1, 11, (200, 60, 60)), (8, 11, (200, 60, 60)),
                         (2, 3, (230, 200, 60)), (3, 4, (230, 200, 60)), (5, 6, (230, 200, 60)), (6, 7, (230, 200, 60)),
                         (8, 9, (60, 80, 200)), (9, 10, (60, 80, 200)), (11, 12, (60, 80, 200)), (12, 13, (60, 80, 200)),
                         (2, 5, (200, 60, 60))):
        cv2.line(image, tuple(map(int, body[a])), tuple(map(int, body[b])), colour, thick, cv2.LINE_AA)
    torso = body[[2, 5, 11, 8]]
    cv2.fillConvexPoly(image, torso, (200, 60, 60), cv2.LINE_AA)
    head = tuple(map(int, body[0]))
    radius = int(np.linalg.norm(body[0] - body[1]) * 0.8)
    cv2.circle(image, head, radius, (240, 200, 170), -1, cv2.LINE_AA)
    for eye in (14, 15):
        cv2.circle(image, tuple(map(int, body[eye])), max(2, radius // 8), (30, 30, 30), -1, cv2.LINE_AA)
    return image
