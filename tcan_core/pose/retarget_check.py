"""Checks on a retargeted clip, and a preview of it over the reference image (issue 15, part 3).

Before minutes of sampling, the artist should see where the retargeted skeleton does not fit the
character. Per frame we mark:
- bones whose length departs from the character's by more than ``tolerance`` (a fraction):
  the output bone against the length the mode aims at (:attr:`RetargetResult.character_lengths`
  in output pixels). Foreshortening legitimately shortens bones, so a short mark is a hint (the
  limb points at the camera, or the proportions frame was foreshortened); a long one is an error
  (a detector glitch, or a proportions frame that shows the bone shorter than it is);
- body joints the character shows but the driving pose misses in that frame (or no person);
- limbs (upper arms, forearms, thighs, shins) whose direction turns by more than
  ``angle_threshold`` degrees from the previous frame, as when the detector swaps left and right.
  Bones shorter than a fifth of their target length in either frame are not compared: their
  direction is mostly detector noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from tcan_core.pose_format import BODY_NAMES, PoseSequence

from .render import render_poses
from .retarget import (CANVAS_REFERENCE, CANVAS_MODES, DEFAULT_CLIP, MODE_AUTHORS, PARENTS, PROPORTIONS_FIRST,
                       RetargetResult, bone_lengths, retarget_poses)

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.25
DEFAULT_ANGLE = 45.0
DEFAULT_PREVIEW_SIZE = 384
# Bones named by their child joint: upper arms, forearms, thighs, shins.
LIMBS = (3, 4, 6, 7, 9, 10, 12, 13)
# A bone shorter than this fraction of its target has no reliable direction.
_MIN_DIRECTION_LENGTH = 0.2
# Brightness of the reference image under the preview skeleton, so the skeleton stands out.
_BACKDROP = 0.6
# The report lists at most this many marked frames; the marks themselves hold all of them.
REPORT_LINES = 40


def bone_name(j: int) -> str:
    """The bone ending at joint ``j``, e.g. ``r-elbow>r-wrist``."""
    return f"{BODY_NAMES[PARENTS[j]]}>{BODY_NAMES[j]}"


@dataclass
class RetargetCheck:
    """The retargeting, its per-frame marks (``[{"frame": int, "reasons": [str]}]``), preview and report."""

    result: RetargetResult
    marks: list[dict] = field(default_factory=list)
    preview: np.ndarray | None = None
    report: str = ""


def check_retarget(reference: PoseSequence, driving: PoseSequence, result: RetargetResult,
                   tolerance: float = DEFAULT_TOLERANCE, angle_threshold: float = DEFAULT_ANGLE) -> list[dict]:
    """Marks for the frames of ``result`` that need a look: ``[{"frame": t, "reasons": [...]}]``, in frame order."""
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"length tolerance must be a positive fraction (e.g. 0.25 for 25%), got {tolerance}")
    if not (np.isfinite(angle_threshold) and 0 < angle_threshold <= 180):
        raise ValueError(f"angle threshold must be between 0 and 180 degrees, got {angle_threshold}")
    frames = result.poses.num_frames
    reasons: list[list[str]] = [[] for _ in range(frames)]
    out = result.poses.body[:, 0].astype(np.float64)
    out_len = bone_lengths(out)
    target = result.character_lengths * result.output_scale

    # Bones off the character's proportions.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = out_len / target[None]
    off = np.isfinite(ratio) & (np.abs(ratio - 1.0) > tolerance)
    for t, j in zip(*np.nonzero(off)):
        reasons[t].append(f"{bone_name(j)} is {ratio[t, j]:.0%} of the character's length")

    # Joints the character has and the driving frame lacks.
    ref_seen = reference.body[0, 0, :, 2] > 0
    present = driving.people.astype(np.int64) > 0
    drive_seen = np.zeros((frames, 18), bool)
    if driving.body.shape[1]:
        drive_seen = (driving.body[:, 0, :, 2] > 0) & present[:, None]
    for t in range(frames):
        if not drive_seen[t].any():
            reasons[t].append("no person in the driving pose")
            continue
        lost = np.nonzero(ref_seen & ~drive_seen[t])[0]
        if lost.size:
            reasons[t].append("missing in the driving pose: " + ", ".join(BODY_NAMES[j] for j in lost))

    # Limb directions that jump between consecutive frames.
    limbs = list(LIMBS)
    vec = (out[:, limbs, :2] - out[:, PARENTS[limbs], :2])
    length = out_len[:, limbs]
    usable = np.isfinite(length) & (length > 1e-3) & \
        (length >= _MIN_DIRECTION_LENGTH * np.nan_to_num(target[limbs], nan=0.0)[None])
    both = usable[1:] & usable[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = (vec[1:] * vec[:-1]).sum(-1) / (length[1:] * length[:-1])
    turn = np.degrees(np.arccos(np.clip(np.nan_to_num(cos, nan=1.0), -1.0, 1.0)))
    for t, i in zip(*np.nonzero(both & (turn > angle_threshold))):
        reasons[t + 1].append(f"{bone_name(limbs[i])} turned {turn[t, i]:.0f} deg since frame {t}")
    return [{"frame": int(t), "reasons": r} for t, r in enumerate(reasons) if r]


def preview_on_reference(poses: PoseSequence, image: np.ndarray | None = None,
                         max_size: int = DEFAULT_PREVIEW_SIZE) -> np.ndarray:
    """Draw ``poses`` (on the reference canvas) over the reference ``image`` uint8 ``[H,W,3]`` -> uint8 ``[F,h,w,3]``.

    The image is dimmed so the skeleton stands out; without an image the skeleton is drawn on
    black at the pose canvas's size. The long side is scaled down to ``max_size`` pixels, since
    every frame of the preview is held in memory.
    """
    if max_size < 16:
        raise ValueError(f"preview size must be at least 16 pixels, got {max_size}")
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"the reference image must be uint8 [H,W,3], got {image.dtype} {list(image.shape)}")
        height, width = image.shape[:2]
    else:
        width, height = poses.width, poses.height
    scale = min(1.0, max_size / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    skeleton = render_poses(poses, w, h)
    if image is None:
        return skeleton
    import cv2

    backdrop = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) if (w, h) != (width, height) else image
    backdrop = (backdrop.astype(np.float32) * _BACKDROP).astype(np.uint8)
    for frame in skeleton:  # in place, a frame at a time: no second clip-sized array
        blank = cv2.inRange(frame, (0, 0, 0), (0, 0, 0))
        cv2.copyTo(backdrop, blank, frame)
    return skeleton


def format_report(check: RetargetCheck, canvas: str) -> str:
    """The node's report: what was done, then one line per marked frame (the first few)."""
    res = check.result
    frames = res.poses.num_frames
    summary = (f"{frames} frames on the {canvas} canvas ({res.poses.width}x{res.poses.height}), mode {res.mode}, "
               f"proportions from frame {res.proportions_frame}; character/driving scale {res.body_scale:.3f}, "
               f"neck-nose ratio {res.head_ratio:.3f}; {res.empty_frames} of {frames} frames without a person "
               f"(left empty)")
    lines = [summary]
    if res.clipped_bones:
        lines.append(f"{res.clipped_bones} bone-frames grew past the clip and were held at it")
    if not check.marks:
        lines.append("checks: no frame marked")
        return "\n".join(lines)
    lines.append(f"checks: {len(check.marks)} of {frames} frames marked")
    for mark in check.marks[:REPORT_LINES]:
        lines.append(f"frame {mark['frame']}: " + "; ".join(mark["reasons"]))
    if len(check.marks) > REPORT_LINES:
        lines.append(f"... and {len(check.marks) - REPORT_LINES} more marked frames (all are on the timeline)")
    return "\n".join(lines)


def retarget_and_check(reference: PoseSequence, driving: PoseSequence, canvas: str = CANVAS_REFERENCE,
                       mode: str = MODE_AUTHORS, clip: float = DEFAULT_CLIP, proportions: str = PROPORTIONS_FIRST,
                       proportions_frame: int = 0, tolerance: float = DEFAULT_TOLERANCE,
                       angle_threshold: float = DEFAULT_ANGLE, image: np.ndarray | None = None,
                       preview_size: int = DEFAULT_PREVIEW_SIZE) -> RetargetCheck:
    """Retarget (:func:`retarget_poses`), mark the frames to look at and draw the preview over the reference image.

    The preview is always on the reference canvas, so with ``canvas="driving"`` it is drawn from
    a second, reference-canvas retargeting of the same clip.
    """
    if canvas not in CANVAS_MODES:
        raise ValueError(f"canvas must be one of {', '.join(CANVAS_MODES)}, got {canvas!r}")
    settings = {"mode": mode, "clip": clip, "proportions": proportions, "proportions_frame": proportions_frame}
    result = retarget_poses(reference, driving, canvas, **settings)
    check = RetargetCheck(result, check_retarget(reference, driving, result, tolerance, angle_threshold))
    on_reference = result if canvas == CANVAS_REFERENCE else retarget_poses(reference, driving, CANVAS_REFERENCE,
                                                                            **settings)
    check.preview = preview_on_reference(on_reference.poses, image, preview_size)
    check.report = format_report(check, canvas)
    log.debug("retarget check: %d marked frames", len(check.marks))
    return check

