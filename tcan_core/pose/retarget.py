"""Fit a driving pose clip to the character's body proportions (TCAN, ECCV 2024, Algorithm 1).

TCAN keeps the neck fixed, scales the neck->nose bone to the character's proportion and moves the
nose's descendants with it, then walks the skeleton outward in stages, setting each bone to the
character's length times the driving video's foreshortening of that bone in this frame relative
to the first frame, and moving the child's descendants by the same offset. Done stage by stage,
the moves add up to a per-bone factor on the bone vector, which is what we compute, for all
frames at once: a child seen with its parent lands at ``new_p + f_j * (d_c - d_p)``. A point
whose parent is missing in a frame is only carried by its ancestors' offsets (the skipped bone
is not changed), as in the sequential algorithm. Missing points stay missing.

Two modes; they differ where the paper is silent.

``authors_code`` (default) follows the authors' released code, which produced TCAN's published
numbers (eccv2024tcan/TCAN, ``utils.py``: ``relative_balanced_pose_transform`` as called by
``get_retargeted`` with the first driving frame and ``use_neck_move=True``):
- the neck->nose bone is set to the character's neck->nose length in every frame (factor
  ``r_t = P / p_t``, character over current driving length; no foreshortening on this bone);
- lengths are normalised by the neck->nose length, and both bones of a left/right pair take the
  *larger* of the character's two (the one seen, if only one is);
- every other bone gets the character's length times its foreshortening ``l_t / l0``
  *clipped to [0, clip]* (clip 1.1), so a detector's sudden over-long bone cannot stretch the
  character; bones the character does not show, and bones shorter than a tenth of the
  character's neck->nose length (in the character, or in the driving frame, measured in driving
  pixels as the authors' code does), are left as they are, as the authors skip them;
- the result is placed at the character's neck plus the driving neck's motion since the first
  frame times ``r_t``. The authors add that motion in 0..1 coordinates; we add it in pixels,
  which is the same when both canvases have one size and does not skew it when they differ.
  Their code truncates each move to whole pixels; we do not (an artefact, not a choice).

``algorithm_1`` is the pack's earlier reading of the paper, kept as an option:
- character lengths are made left/right symmetric by the *average* of a pair (a measurement
  error on one side is halved rather than copied to both);
- foreshortening is not clipped, so a bone that truly grows (the dancer turns to face the
  camera) grows on the character too, at the cost of following detector glitches;
- every bone, the neck->nose one included, takes ``k_j = L_j / l0_j``; a bone the character does
  not show takes the driving length times the body scale ``s``, the ratio of summed character
  to summed driving first-frame lengths over the bones both show, and the neck's motion is
  scaled by ``s`` (one steady scale, where the authors' neck->nose ratio changes when the head
  nods).

Common to both:
- the frame that defines the driving proportions (``l0``, and the neck position the motion is
  measured from) is the first frame by default (Algorithm 1), or a chosen frame, or the frame
  :func:`auto_proportions_frame` scores as the most complete and least foreshortened; a bone the
  proportions frame does not show takes its length from the nearest frame that does;
- hands follow their wrists and the face follows the nose, scaled by ``s`` and ``k_nose``
  (``algorithm_1``) or by the proportions frame's neck->nose ratio (``authors_code``, whose code
  draws neither; one steady ratio keeps a nod from resizing the hands and face);
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
BONES = tuple(j for j in range(18) if PARENTS[j] >= 0)

# Algorithm 1's order: the nose first, then the three outward stages.
STAGES: tuple[tuple[int, ...], ...] = ((0,), (2, 5, 8, 11, 14, 15), (3, 6, 9, 12, 16, 17), (4, 7, 10, 13))

# (right, left) bones, named by their child joint, whose character lengths are made equal.
SYMMETRIC_PAIRS: tuple[tuple[int, int], ...] = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))

CANVAS_REFERENCE = "reference"
CANVAS_DRIVING = "driving"
CANVAS_MODES = (CANVAS_REFERENCE, CANVAS_DRIVING)

MODE_AUTHORS = "authors_code"
MODE_ALGORITHM_1 = "algorithm_1"
MODES = (MODE_AUTHORS, MODE_ALGORITHM_1)

PROPORTIONS_FIRST = "first frame"
PROPORTIONS_CHOSEN = "chosen frame"
PROPORTIONS_AUTO = "automatic"
PROPORTIONS_MODES = (PROPORTIONS_FIRST, PROPORTIONS_CHOSEN, PROPORTIONS_AUTO)

# The authors' clip on foreshortening (current / first-frame length).
DEFAULT_CLIP = 1.1
# The authors skip bones shorter than this fraction of the neck->nose length (their eps * 10).
_AUTHORS_SHORT_BONE = 0.1
# Bones shorter than this (pixels) have no usable direction or ratio.
_MIN_BONE = 1e-3
# The automatic proportions frame compares each bone with this percentile of its lengths in the
# clip, not the maximum, so a few glitched over-long detections do not set the yardstick.
_AUTO_PERCENTILE = 90.0


@dataclass
class RetargetResult:
    """Retargeted poses (one person per frame) and the numbers behind them.

    ``character_lengths`` [18] are the bone lengths the mode aims at, in reference pixels (NaN
    where the mode leaves the bone alone); ``output_scale`` turns them into output-canvas pixels
    (1 on the reference canvas); ``head_ratio`` is the character's neck->nose length over the
    driving one in the proportions frame.
    """

    poses: PoseSequence
    body_scale: float
    character_lengths: np.ndarray
    empty_frames: int
    mode: str = MODE_AUTHORS
    proportions_frame: int = 0
    head_ratio: float = 1.0
    output_scale: float = 1.0
    clipped_bones: int = 0


def bone_lengths(body: np.ndarray) -> np.ndarray:
    """``[...,18,3]`` keypoints -> ``[...,18]`` length of the bone ending at each joint (NaN where unseen; the neck has none)."""
    seen = body[..., 2] > 0
    parents = np.where(PARENTS < 0, NECK, PARENTS)
    vec = body[..., :2] - body[..., parents, :2]
    length = np.hypot(vec[..., 0], vec[..., 1])
    ok = seen & seen[..., parents] & (PARENTS >= 0)
    return np.where(ok, length, np.nan)


def symmetric_lengths(lengths: np.ndarray, how: str = "mean") -> np.ndarray:
    """``[18]`` bone lengths -> the same with each left/right pair set to its mean or max (or to the seen side)."""
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
    out = np.array(lengths, dtype=np.float64, copy=True)
    for r, l in SYMMETRIC_PAIRS:
        pair = out[[r, l]]
        if np.isfinite(pair).any():
            out[[r, l]] = np.nanmean(pair) if how == "mean" else np.nanmax(pair)
    return out


def _usable(lengths: np.ndarray) -> np.ndarray:
    return np.isfinite(lengths) & (lengths > _MIN_BONE)


def _at_frame(values: np.ndarray, usable: np.ndarray, frame: int) -> np.ndarray:
    """``[F,J]`` values -> ``[J]`` each column's value at ``frame``, or at the nearest usable frame (the earlier on a tie; NaN if none)."""
    distance = np.abs(np.arange(values.shape[0]) - frame)[:, None] + np.where(usable, 0, values.shape[0] + 1)
    pick = np.argmin(distance, axis=0)
    out = values[pick, np.arange(values.shape[1])]
    return np.where(usable.any(0), out, np.nan)


def _first_seen(lengths: np.ndarray) -> np.ndarray:
    """``[F,18]`` per-frame lengths -> ``[18]`` the first usable length of each bone (NaN if never seen)."""
    return _at_frame(lengths, _usable(lengths), 0)


def auto_proportions_frame(driving: PoseSequence) -> int:
    """The driving frame whose skeleton is the most complete and least foreshortened.

    Score of frame ``t``: the sum over the 17 body bones of ``min(l_t,j / q_j, 1)``, where
    ``q_j`` is the 90th percentile of bone ``j``'s length over the clip and a bone not seen counts
    0. Every bone seen at (nearly) its full length adds 1, so the best frame shows the most bones,
    each as long as it gets; the percentile keeps a few glitched over-long detections from
    becoming the yardstick. Ties go to the earliest frame.
    """
    body = _person0_body(driving)
    lengths = bone_lengths(body)[:, list(BONES)]
    usable = _usable(lengths)
    if not usable.any():
        return 0
    masked = np.where(usable, lengths, np.nan)
    with np.errstate(all="ignore"):
        q = np.nanpercentile(masked, _AUTO_PERCENTILE, axis=0)
    ratio = np.where(usable & np.isfinite(q), np.minimum(lengths / np.where(np.isfinite(q), q, 1.0), 1.0), 0.0)
    return int(np.argmax(ratio.sum(1)))


def _person0_body(driving: PoseSequence) -> np.ndarray:
    """``[F,18,3]`` float64 body of person 0 (all-zero in frames without a person)."""
    if driving.body.shape[1] == 0:
        return np.zeros((driving.num_frames, 18, 3))
    present = driving.people.astype(np.int64) > 0
    return np.where(present[:, None, None], driving.body[:, 0].astype(np.float64), 0.0)


def resolve_proportions_frame(driving: PoseSequence, proportions: str = PROPORTIONS_FIRST, frame: int = 0) -> int:
    """The index of the driving frame that defines the driving proportions (first, chosen or automatic)."""
    if proportions not in PROPORTIONS_MODES:
        raise ValueError(f"proportions must be one of {', '.join(PROPORTIONS_MODES)}, got {proportions!r}")
    if proportions == PROPORTIONS_FIRST:
        return 0
    if proportions == PROPORTIONS_AUTO:
        return auto_proportions_frame(driving)
    frames = driving.num_frames
    if not 0 <= int(frame) < frames:
        raise ValueError(f"proportions frame must be a frame of the driving pose (0..{frames - 1}), got {frame}; "
                         "set proportions_frame on TCAN Pose Retarget to a frame that shows the whole body")
    return int(frame)


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
    if np.hypot(*(body[NOSE, :2] - body[NECK, :2])) <= _MIN_BONE:
        raise ValueError("the reference pose's nose and neck are at the same point, so the head's size is "
                         "unknown; fix the reference pose (e.g. a hand-edited pose JSON)")
    return body


def retarget_poses(reference: PoseSequence, driving: PoseSequence, canvas: str = CANVAS_REFERENCE,
                   mode: str = MODE_AUTHORS, clip: float = DEFAULT_CLIP, proportions: str = PROPORTIONS_FIRST,
                   proportions_frame: int = 0) -> RetargetResult:
    """Retarget person 0 of ``driving`` (``[F,P,18,3]`` body, face, hands) to ``reference``'s proportions (TCAN Alg. 1).

    ``canvas="reference"`` places the result on the reference canvas at the character's neck plus
    the driving neck's motion since the proportions frame (scaled to the character);
    ``"driving"`` keeps the driving canvas, anchored at the driving neck, at the driving person's
    size. ``mode`` picks the authors' code or the pack's reading of Algorithm 1 (module
    docstring); ``clip`` bounds the foreshortening in ``authors_code`` mode.
    """
    if canvas not in CANVAS_MODES:
        raise ValueError(f"canvas must be one of {', '.join(CANVAS_MODES)}, got {canvas!r}")
    if mode not in MODES:
        raise ValueError(f"retarget mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not (np.isfinite(clip) and clip > 0):
        raise ValueError(f"the foreshortening clip must be a positive number (the authors use {DEFAULT_CLIP}), got {clip}")
    ref = _reference_body(reference)
    frames = driving.num_frames
    if frames == 0 or driving.body.shape[1] == 0:
        raise ValueError("the driving pose has no person in any frame; check the driving video and "
                         "the Pose Extract settings")
    present = driving.people.astype(np.int64) > 0
    d = _person0_body(driving)
    seen = d[..., 2] > 0
    if not seen.any():
        raise ValueError(f"the driving pose has no person in any of its {frames} frames (no body "
                         "keypoint is seen); check the driving video and the Pose Extract settings")
    k0 = resolve_proportions_frame(driving, proportions, proportions_frame)

    # 1. Driving lengths now and in the proportions frame; the body scale s (both modes report it).
    drive_len = bone_lengths(d)
    l0 = _at_frame(drive_len, _usable(drive_len), k0)
    ref_len = bone_lengths(ref)
    ref_len = np.where(ref_len > _MIN_BONE, ref_len, np.nan)
    mean_char = symmetric_lengths(ref_len, "mean")
    common = np.isfinite(mean_char) & np.isfinite(l0)
    if common.any():
        s = float(mean_char[common].sum() / l0[common].sum())
    else:
        s = 1.0
        log.warning("reference and driving poses share no bone; using body scale 1")
    head = ref_len[NOSE]
    head_now = drive_len[:, NOSE]
    head_ok = _usable(head_now)
    head0 = _at_frame(head_now[:, None], head_ok[:, None], k0)[0]
    head_ratio = float(head / head0) if np.isfinite(head0) else s
    xy = d[..., :2]

    # 2. Per-frame factor f[t,j] on each bone vector.
    clipped = 0
    if mode == MODE_AUTHORS:
        char = symmetric_lengths(ref_len, "max")
        with np.errstate(divide="ignore", invalid="ignore"):
            fore = np.clip(drive_len / l0, 0.0, clip)
            clipped = int((np.isfinite(drive_len / l0) & (drive_len / l0 > clip)).sum())
            factor = char * fore / drive_len
        # The neck->nose bone takes the character's length outright; a frame without it uses the proportions frame's ratio.
        ratio_t = np.where(head_ok, head / np.where(head_ok, head_now, 1.0), head_ratio)
        # As in the authors' code, the driving bone (driving pixels) is compared with the character's
        # neck->nose length: their driving skeleton already has the character's head at that point.
        keep = (~np.isfinite(char) | (char < _AUTHORS_SHORT_BONE * head)
                | ~(drive_len >= _AUTHORS_SHORT_BONE * head) | ~np.isfinite(factor))
        factor = np.where(keep, 1.0, factor)
        factor[:, NOSE] = np.where(head_ok, ratio_t, 1.0)
        motion_scale = ratio_t
        hand_scale = face_scale = head_ratio
        out_scale = 1.0 / head_ratio
    else:
        char = np.where(np.isfinite(mean_char), mean_char, s * l0)
        k = np.where(np.isfinite(l0), char / np.where(np.isfinite(l0), l0, 1.0), s)
        factor = np.broadcast_to(k, drive_len.shape)
        motion_scale = np.full(frames, s)
        hand_scale, face_scale = s, k[NOSE]
        out_scale = 1.0 / s

    # 3. Offsets of Algorithm 1 in driving pixels, stage by stage; missing joints pass theirs on.
    off = np.zeros_like(xy)
    for stage in STAGES:
        for j in stage:
            p = PARENTS[j]
            both = (seen[:, j] & seen[:, p])[:, None]
            off[:, j] = off[:, p] + np.where(both, (xy[:, j] - xy[:, p]) * (factor[:, j, None] - 1.0), 0.0)
    new = xy + off

    hands = np.where(present[:, None, None, None], driving.hands[:, 0].astype(np.float64), 0.0)
    new_hands = hands[..., :2].copy()
    for h, wrist in enumerate((L_WRIST, R_WRIST)):
        stretch = np.where(seen[:, wrist, None, None], (hands[:, h, :, :2] - xy[:, wrist, None]) * (hand_scale - 1.0), 0.0)
        new_hands[:, h] += off[:, wrist, None] + stretch
    face = np.where(present[:, None, None], driving.face[:, 0].astype(np.float64), 0.0)
    stretch = np.where(seen[:, NOSE, None, None], (face[..., :2] - xy[:, NOSE, None]) * (face_scale - 1.0), 0.0)
    new_face = face[..., :2] + off[:, NOSE, None] + stretch

    # 4. Place on the output canvas: out = placed + c * (new - anchor). Frames without a neck are
    # anchored at the mean of everything they show.
    pts = np.concatenate([d, hands.reshape(frames, -1, 3), face], axis=1)
    pts_seen = pts[..., 2:] > 0
    centroid = (pts[..., :2] * pts_seen).sum(1) / np.maximum(pts_seen.sum(1), 1)
    anchor = np.where(seen[:, NECK, None], xy[:, NECK], centroid)
    if canvas == CANVAS_REFERENCE:
        neck_frames = np.nonzero(seen[:, NECK])[0]
        if neck_frames.size:
            start = anchor[neck_frames[np.argmin(np.abs(neck_frames - k0))]]
        else:
            start = anchor[np.nonzero(pts_seen.any((1, 2)))[0][0]]
        placed = ref[NECK, :2] + motion_scale[:, None] * (anchor - start)
        c = 1.0
        width, height = reference.width, reference.height
    else:
        placed = anchor
        c = out_scale
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
    targets = char.copy()
    if mode == MODE_AUTHORS:
        targets[NOSE] = head
    log.debug("retargeted %d frames (%s, proportions frame %d, body scale %.3f, %d empty)", frames, mode, k0, s, empty)
    return RetargetResult(out, s, targets, empty, mode=mode, proportions_frame=k0, head_ratio=head_ratio,
                          output_scale=c, clipped_bones=clipped)


def _with_conf(xy: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Join coordinates and confidences; missing points become all-zero, as POSE_KEYPOINT writes them."""
    seen = (conf > 0)[..., None]
    return np.where(seen, np.concatenate([xy, conf[..., None]], axis=-1), 0.0).astype(np.float32)
