"""A coarse person mask drawn from OpenPose-18 keypoints, for when no segmentation mask is given.

Limbs are drawn as thick lines, the torso is filled, the head is a disc, and the result is
dilated so that clothes and hair a skeleton does not reach are mostly covered. A segmentation
mask (SAM, as the TPC authors use, or any person segmenter) follows the real outline and is
better; this is the fallback.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

log = logging.getLogger(__name__)

# OpenPose-18 bones: limbs and torso first, then the head.
BODY_BONES = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
              (1, 11), (11, 12), (12, 13))
HEAD_BONES = ((1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
HEAD_POINTS = (0, 14, 15, 16, 17)
# Clockwise around the torso: r-shoulder, l-shoulder, l-hip, r-hip.
TORSO_POINTS = (2, 5, 11, 8)

# Proportions relative to the median body-bone length (upper arm, thigh, torso side ...):
# a limb is about 0.4 bones wide, a head about 0.45 bones in radius, the head bones are about
# 0.4 of a body bone, and a torso whose hips are not seen is about 1.6 shoulder widths long.
LIMB_WIDTH = 0.4
HEAD_RADIUS = 0.45
HEAD_BONE_TO_BODY = 0.4
TORSO_PER_SHOULDER = 1.6
DILATE = 0.15


def seen_points(body: np.ndarray, min_confidence: float) -> np.ndarray:
    """Which of the ``[...,18,3]`` keypoints are seen: confidence > 0 and >= ``min_confidence``."""
    conf = body[..., 2]
    return (conf > 0) & (conf >= min_confidence)


def _bone_unit(xy: np.ndarray, seen: np.ndarray, fallback: float) -> float:
    """Median seen body-bone length in pixels (estimated from head bones if no body bone is seen)."""
    for bones, factor in ((BODY_BONES, 1.0), (HEAD_BONES, 1.0 / HEAD_BONE_TO_BODY)):
        pairs = np.asarray(bones)
        both = seen[pairs[:, 0]] & seen[pairs[:, 1]]
        if both.any():
            lengths = np.linalg.norm(xy[pairs[both, 0]] - xy[pairs[both, 1]], axis=-1)
            if lengths.max() > 0:
                return float(np.median(lengths[lengths > 0])) * factor
    return fallback


def person_mask_from_pose(body: np.ndarray, height: int, width: int,
                          min_confidence: float = 0.3) -> np.ndarray:
    """Person mask ``[H,W]`` float32 in {0,1} from one person's OpenPose-18 keypoints ``[18,3]`` in pixels.

    Returns all zeros when no keypoint is seen.
    """
    body = np.asarray(body, np.float32)
    if body.shape != (18, 3):
        raise ValueError(f"person_mask_from_pose needs one person's 18 keypoints [18,3], got {body.shape}")
    mask = np.zeros((int(height), int(width)), np.uint8)
    seen = seen_points(body, min_confidence)
    if not seen.any():
        return mask.astype(np.float32)
    xy = body[:, :2].astype(np.float64)
    unit = _bone_unit(xy, seen, fallback=0.05 * min(height, width))
    thickness = max(2, int(round(LIMB_WIDTH * unit)))

    torso = [xy[i] for i in TORSO_POINTS if seen[i]]
    if seen[2] and seen[5] and not (seen[8] or seen[11]):
        shoulder_width = float(np.linalg.norm(xy[2] - xy[5]))
        down = np.array([0.0, TORSO_PER_SHOULDER * max(shoulder_width, unit)])
        torso += [xy[5] + down, xy[2] + down]
    if seen[1]:
        torso.append(xy[1])
    if len(torso) >= 3:
        hull = cv2.convexHull(np.round(np.asarray(torso)).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1)

    for a, b in BODY_BONES + HEAD_BONES:
        if seen[a] and seen[b]:
            pa, pb = np.round(xy[[a, b]]).astype(np.int32)
            cv2.line(mask, tuple(int(v) for v in pa), tuple(int(v) for v in pb), 1, thickness)

    head = np.asarray([i for i in HEAD_POINTS if seen[i]])
    if head.size:
        centre = xy[head].mean(axis=0)
        spread = float(np.linalg.norm(xy[head] - centre, axis=-1).max())
        radius = max(1.6 * spread, HEAD_RADIUS * unit)
        cv2.circle(mask, tuple(int(v) for v in np.round(centre)), int(round(radius)), 1, -1)

    for i in np.flatnonzero(seen):
        cv2.circle(mask, tuple(int(v) for v in np.round(xy[i])), thickness // 2, 1, -1)

    grow = int(round(DILATE * unit))
    if grow > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
        mask = cv2.dilate(mask, kernel)
    return mask.astype(np.float32)


def person_masks_from_poses(bodies: np.ndarray, height: int, width: int,
                            min_confidence: float = 0.3) -> np.ndarray:
    """Person masks ``[F,H,W]`` float32 for keypoints ``[F,18,3]`` (one person per frame)."""
    bodies = np.asarray(bodies, np.float32)
    out = np.zeros((bodies.shape[0], int(height), int(width)), np.float32)
    for f in range(bodies.shape[0]):
        out[f] = person_mask_from_pose(bodies[f], height, width, min_confidence)
    return out
