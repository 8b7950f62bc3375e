"""Fit a driving pose clip to the character's body proportions (TCAN, ECCV 2024, Algorithm 1).

TCAN keeps the neck fixed, scales the neck->nose bone to the character's proportion and moves the
nose's descendants with it, then walks the skeleton outward in stages, setting each bone to the
character's length times the driving video's foreshortening of that bone in this frame relative
to the first frame, and moving the child's descendants by the same offset.

Done stage by stage, the moves add up to a closed form, which is what we compute, for all frames
at once: with ``k_j = L_j / l0_j`` (character length over the driving bone's first-frame length),
a child seen with its parent lands at ``new_p + k_j * (d_c - d_p)``; its length is then
``L_j * l_t / l0_j`` and its direction the driving one. A point whose parent is missing in a frame
is only carried by its ancestors' offsets (the skipped bone is not changed), as in the sequential
algorithm. Missing points stay missing.

Choices the paper leaves open, made here:
- "first frame" of a bone is the first driving frame in which that bone is seen;
- the character's lengths are made left/right symmetric (the average of a pair, or the one side
  that is seen); a bone the character does not show at all (a half-body reference) takes the
  driving length times the body scale ``s``, the ratio of summed character to summed driving
  first-frame lengths over the bones both show;
- hands follow their wrists scaled by ``s``; the face follows the nose scaled by the neck->nose
  bone's ``k`` (the head's own proportion, which keeps the face dots on the retargeted head);
- frames whose neck is missing are anchored at the mean of their seen points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from tcan_core.pose_format import BODY_NAMES, PoseSequence

log = logging.getLogger(__name__)

NOSE, NECK = 0, 1
R_WRIST, L_WRIST = 4, 7

# PARENTS[j] is the joint bone j hangs from (DESIGN.md section 6); the neck is the root.
PARENTS = np.array([1, -1, 1, 2, 3, 1, 5, 6, 1, 8, 9, 1, 11, 12, 0, 0, 14, 15])

# Algorithm 1's order: the nose first, then the three outward stages.
STAGES: tuple[tuple[int, ...], ...] = ((0,), (2, 5, 8, 11, 14, 15), (3, 6, 9, 12, 16, 17), (4, 7, 10, 13))

# (right, left) bones, named by their child joint, whose character lengths are made equal.
SYMMETRIC_PAIRS: tuple[tuple[int, int], ...] = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))

CANVAS_REFERENCE = "reference"
CANVAS_DRIVING = "driving"
CANVAS_MODES = (CANVAS_REFERENCE, CANVAS_DRIVING)

# Bones shorter than this (pixels) have no usable direction or ratio.
_MIN_BONE = 1e-3


@dataclass
class RetargetResult:
    """Retargeted poses (one person per frame) and the numbers behind them."""

    poses: PoseSequence
    body_scale: float
    character_lengths: np.ndarray
    empty_frames: int


def bone_lengths(body: np.ndarray) -> np.ndarray:
    """``[...,18,3]`` keypoints -> ``[...,18]`` length of the bone ending at each joint (NaN where unseen; the neck has none)."""
    seen = body[..., 2] > 0
    parents = np.where(PARENTS < 0, NECK, PARENTS)
    vec = body[..., :2] - body[..., parents, :2]
    length = np.hypot(vec[..., 0], vec[..., 1])
    ok = seen & seen[..., parents] & (PARENTS >= 0)
    return np.where(ok, length, np.nan)


def symmetric_lengths(lengths: np.ndarray) -> np.ndarray:
    """``[18]`` bone lengths -> the same with each left/right pair set to its mean (or to the seen side)."""
    out = np.array(lengths, dtype=np.float64, copy=True)
    for r, l in SYMMETRIC_PAIRS:
        pair = out[[r, l]]
        if np.isfinite(pair).any():
            out[[r, l]] = np.nanmean(pair)
    return out


def _first_seen(lengths: np.ndarray) -> np.ndarray:
    """``[F,18]`` per-frame lengths -> ``[18]`` the first usable length of each bone (NaN if never seen)."""
    usable = np.isfinite(lengths) & (lengths > _MIN_BONE)
    first = np.argmax(usable, axis=0)
    out = lengths[first, np.arange(lengths.shape[1])]
    return np.where(usable.any(0), out, np.nan)


def _reference_body(reference: PoseSequence) -> np.ndarray:
    """The character's ``[18,3]`` body: person 0 of the first frame, checked for what retargeting needs."""
    if reference.num_frames == 0 or reference.body.shape[1] == 0 or reference.people[0] == 0:
        raise ValueError("the reference pose has no person in it; use a reference image where the "
                         "pose detector finds the character, or load a hand-edited pose JSON")
    if reference.num_frames > 1:
        log.info("reference pose has %d frames; using the first", reference.num_frames)
    body = reference.body[0, 0].astype(np.float64)
    missing = [BODY_NAMES[j] for j in (NECK, NOSE) if body[j, 2] <= 0]
    if missing:
        raise ValueError(
            f"the reference pose is missing the {' and '.join(missing)} keypoint{'s' if len(missing) > 1 else ''}, "
            "which retargeting needs (the neck is its fixed anchor and neck->nose its first bone); use a "
            "reference image that shows more of the body, or a hand-edited pose JSON with these points"
        )
    return body


def retarget_poses(reference: PoseSequence, driving: PoseSequence, canvas: str = CANVAS_REFERENCE) -> RetargetResult:
    """Retarget person 0 of ``driving`` (``[F,P,18,3]`` body, face, hands) to ``reference``'s proportions (TCAN Alg. 1).

    ``canvas="reference"`` places the result on the reference canvas at the character's neck plus
    the driving neck's motion since its first frame, times the body scale; ``"driving"`` keeps
    the driving canvas, anchored at the driving neck, at the driving person's overall size.
    """
    if canvas not in CANVAS_MODES:
        raise ValueError(f"canvas must be one of {', '.join(CANVAS_MODES)}, got {canvas!r}")
    ref = _reference_body(reference)
    frames = driving.num_frames
    if frames == 0 or driving.body.shape[1] == 0:
        raise ValueError("the driving pose has no person in any frame; check the driving video and "
                         "the Pose Extract settings")
    present = driving.people.astype(np.int64) > 0
    d = np.where(present[:, None, None], driving.body[:, 0].astype(np.float64), 0.0)
    seen = d[..., 2] > 0
    has_body = seen.any(1)
    if not has_body.any():
        raise ValueError(f"the driving pose has no person in any of its {frames} frames (no body "
                         "keypoint is seen); check the driving video and the Pose Extract settings")

    # 1. Character lengths, driving first-frame lengths and per-bone scales k = L / l0.
    drive_len = bone_lengths(d)
    l0 = _first_seen(drive_len)
    ref_len = bone_lengths(ref)
    char = symmetric_lengths(np.where(ref_len > _MIN_BONE, ref_len, np.nan))
    common = np.isfinite(char) & np.isfinite(l0)
    if common.any():
        s = float(char[common].sum() / l0[common].sum())
    else:
        s = 1.0
        log.warning("reference and driving poses share no bone; using body scale 1")
    char = np.where(np.isfinite(char), char, s * l0)
    k = np.where(np.isfinite(l0), char / np.where(np.isfinite(l0), l0, 1.0), s)

    # 2. Offsets of Algorithm 1 in driving pixels, stage by stage; missing joints pass theirs on.
    xy = d[..., :2]
    off = np.zeros_like(xy)
    for stage in STAGES:
        for j in stage:
            p = PARENTS[j]
            both = (seen[:, j] & seen[:, p])[:, None]
            off[:, j] = off[:, p] + np.where(both, (xy[:, j] - xy[:, p]) * (k[j] - 1.0), 0.0)
    new = xy + off

    hands = np.where(present[:, None, None, None], driving.hands[:, 0].astype(np.float64), 0.0)
    new_hands = hands[..., :2].copy()
    for h, wrist in enumerate((L_WRIST, R_WRIST)):
        stretch = np.where(seen[:, wrist, None, None], (hands[:, h, :, :2] - xy[:, wrist, None]) * (s - 1.0), 0.0)
        new_hands[:, h] += off[:, wrist, None] + stretch
    face = np.where(present[:, None, None], driving.face[:, 0].astype(np.float64), 0.0)
    k_head = k[NOSE]
    stretch = np.where(seen[:, NOSE, None, None], (face[..., :2] - xy[:, NOSE, None]) * (k_head - 1.0), 0.0)
    new_face = face[..., :2] + off[:, NOSE, None] + stretch

    # 3. Place on the output canvas: out = M(anchor) + c * (new - anchor), one similarity M for
    # the clip. Frames without a neck are anchored at the mean of everything they show.
    pts = np.concatenate([d, hands.reshape(frames, -1, 3), face], axis=1)
    pts_seen = pts[..., 2:] > 0
    centroid = (pts[..., :2] * pts_seen).sum(1) / np.maximum(pts_seen.sum(1), 1)
    anchor = np.where(seen[:, NECK, None], xy[:, NECK], centroid)
    if canvas == CANVAS_REFERENCE:
        neck_frames = np.nonzero(seen[:, NECK])[0]
        first = neck_frames[0] if neck_frames.size else np.nonzero(pts_seen.any((1, 2)))[0][0]
        placed = ref[NECK, :2] + s * (anchor - anchor[first])
        c = 1.0
        width, height = reference.width, reference.height
    else:
        placed = anchor
        c = 1.0 / s
        width, height = driving.width, driving.height

    def place(points: np.ndarray) -> np.ndarray:
        extra = (1,) * (points.ndim - 2)
        a = anchor.reshape(frames, *extra, 2)
        return placed.reshape(frames, *extra, 2) + c * (points - a)

    out = PoseSequence.empty(frames, 1, width, height)
    out.body[:, 0] = _with_conf(place(new), d[..., 2])
    out.hands[:, 0] = _with_conf(place(new_hands), hands[..., 2])
    out.face[:, 0] = _with_conf(place(new_face), face[..., 2])
    keep = present & ((out.body[:, 0, :, 2] > 0).any(1) | (out.hands[:, 0, ..., 2] > 0).any((1, 2))
                      | (out.face[:, 0, :, 2] > 0).any(1))
    out.body[~keep] = 0.0
    out.hands[~keep] = 0.0
    out.face[~keep] = 0.0
    out.people[:] = keep.astype(np.int64)
    empty = int(frames - keep.sum())
    log.debug("retargeted %d frames (body scale %.3f, %d empty)", frames, s, empty)
    return RetargetResult(out, s, char, empty)


def _with_conf(xy: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Join coordinates and confidences; missing points become all-zero, as POSE_KEYPOINT writes them."""
    seen = (conf > 0)[..., None]
    return np.where(seen, np.concatenate([xy, conf[..., None]], axis=-1), 0.0).astype(np.float32)
