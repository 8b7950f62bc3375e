"""Test-time Procrustes Calibration (TPC, NeurIPS 2024): the reference warped onto every driving pose.

For each calibrated driving frame a similarity transform is fitted from the reference person's
keypoints to the frame's keypoints (:func:`tcan_core.tpc.procrustes.fit_similarity`), and the
reference image and its person mask are warped with it onto the driving canvas. The animator
then attends to the calibrated image as extra reference keys/values, masked to the driving
person's region (DESIGN.md section 6, "TPC").

Sparsity ``k``: only frames ``0, k, 2k, ...`` are calibrated (warped); driving frame ``f`` uses
the calibration of frame ``(f // k) * k``, the last calibrated frame at or before it, as the
authors' code does. A calibrated frame whose keypoints cannot be fitted (fewer than two usable
common points) takes the transform fitted on the nearest driving frame that can be fitted (the
earlier one on a tie).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from ..pose_format import BODY_NAMES, PoseSequence
from .person_mask import person_mask_from_pose, person_masks_from_poses, seen_points
from .procrustes import SimilarityFit, fit_similarity

log = logging.getLogger(__name__)

KEYPOINT_SETS: dict[str, tuple[int, ...]] = {
    "face": (0, 14, 15, 16, 17),
    "body": tuple(range(1, 14)),
    "all": tuple(range(18)),
}
KEYPOINT_SET_HELP = {
    "face": "nose, eyes, ears",
    "body": "neck, shoulders, elbows, wrists, hips, knees, ankles",
    "all": "all 18 body keypoints",
}
DEFAULT_SCALE_RANGE = (0.1, 5.0)

IMAGE_FILTER = cv2.INTER_CUBIC
MASK_FILTER = cv2.INTER_LINEAR
# Warping alone samples the source at the output pixels, so a strong shrink aliases; below this
# scale the source is first reduced with area averaging to the target size.
PREFILTER_BELOW = 0.75


@dataclass
class Calibration:
    """``TCAN_CALIBRATION``: calibrated copies of the reference for a driving clip of ``F`` frames.

    Images and masks are stored once per *calibrated* frame (``N = ceil(F / k)``); use
    :meth:`frame_images` / :meth:`frame_masks` (or ``frame_to_calibrated``) to get one per
    driving frame. All pixel coordinates are in the driving canvas (``width`` x ``height``).

    - ``images``: torch float32 ``[N,H,W,3]`` in 0..1, the reference warped onto each calibrated
      frame; black outside the reference.
    - ``masks``: torch float32 ``[N,H,W]`` in 0..1, the reference person mask warped the same
      way: the keys a calibrated image may contribute.
    - ``calibrated_frames``: int64 ``[N]``, the driving frame each calibrated image was made for
      (``0, k, 2k, ...``).
    - ``frame_to_calibrated``: int64 ``[F]``, for each driving frame the index into ``images``
      and ``masks`` it uses (``f // k``).
    - ``transforms``: float64 ``[F,2,3]``, for each driving frame the matrix ``[s*R | t]`` that
      maps reference-image pixels ``(x, y)`` to driving-canvas pixels, as applied to the
      calibrated image it uses.
    - ``source_frames``: int64 ``[N]``, the driving frame whose keypoints gave each transform;
      it differs from ``calibrated_frames`` where the calibrated frame fell back.
    - ``scales``, ``angles``: float64 ``[N]``, scale and rotation (radians) of each transform.
    - ``clamped``: bool ``[N]``, the fitted scale was outside ``scale_range`` and was clamped.
    - ``keypoint_set`` / ``keypoint_indices``: the OpenPose-18 points used for the fit.
    - ``driving_pose``: the driving person's keypoints (a one-person :class:`PoseSequence`),
      from which :meth:`driving_person_masks` derives the region whose queries may attend to
      the calibrated image.
    - ``mask_from_pose``: the reference mask was drawn from the reference pose, not given.
    """

    images: torch.Tensor
    masks: torch.Tensor
    calibrated_frames: np.ndarray
    frame_to_calibrated: np.ndarray
    transforms: np.ndarray
    source_frames: np.ndarray
    scales: np.ndarray
    angles: np.ndarray
    clamped: np.ndarray
    keypoint_set: str
    keypoint_indices: tuple[int, ...]
    min_confidence: float
    sparsity: int
    allow_rotation: bool
    scale_range: tuple[float, float]
    driving_pose: PoseSequence
    mask_from_pose: bool
    reference_size: tuple[int, int]
    several_people_frames: np.ndarray
    no_person_frames: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.frame_to_calibrated.shape[0])

    @property
    def width(self) -> int:
        return int(self.driving_pose.width)

    @property
    def height(self) -> int:
        return int(self.driving_pose.height)

    @property
    def fell_back(self) -> np.ndarray:
        """bool ``[N]``: the calibrated frame had no fit of its own and reused another frame's."""
        return self.source_frames != self.calibrated_frames

    def _index(self, frames: Sequence[int] | None) -> torch.Tensor:
        idx = self.frame_to_calibrated if frames is None else self.frame_to_calibrated[np.asarray(frames)]
        return torch.from_numpy(np.asarray(idx, np.int64))

    def frame_images(self, frames: Sequence[int] | None = None) -> torch.Tensor:
        """Calibrated image of each driving frame (all, or ``frames``): ``[F,H,W,3]``."""
        return self.images.index_select(0, self._index(frames))

    def frame_masks(self, frames: Sequence[int] | None = None) -> torch.Tensor:
        """Warped reference person mask of each driving frame (all, or ``frames``): ``[F,H,W]``."""
        return self.masks.index_select(0, self._index(frames))

    def driving_person_masks(self, frames: Sequence[int] | None = None) -> torch.Tensor:
        """Driving person's region drawn from the driving keypoints (all, or ``frames``): ``[F,H,W]``."""
        body = self.driving_pose.body[:, 0]
        if frames is not None:
            body = body[np.asarray(frames)]
        masks = person_masks_from_poses(body, self.height, self.width, self.min_confidence)
        return torch.from_numpy(masks)

    def summary(self) -> str:
        """A few lines for the node's report: settings, fit ranges, fallbacks, clamps, mask origin."""
        k, n, f = self.sparsity, len(self.calibrated_frames), self.num_frames
        lines = [
            f"TPC: {f} driving frames at {self.width}x{self.height}, {n} calibrated "
            + ("(every frame)." if k == 1 else f"(one in {k}; frame f uses frame (f // {k}) * {k}).")
            + f" Keypoints: '{self.keypoint_set}' ({KEYPOINT_SET_HELP[self.keypoint_set]}),"
            f" confidence >= {self.min_confidence:g}.",
            f"Scale {self.scales.min():.3g}..{self.scales.max():.3g}, rotation "
            + (f"{np.degrees(self.angles.min()):+.1f}..{np.degrees(self.angles.max()):+.1f} degrees."
               if self.allow_rotation else "off."),
        ]
        back = np.flatnonzero(self.fell_back)
        if back.size:
            uses = np.isin(self.frame_to_calibrated, back).sum()
            pairs = [f"{self.calibrated_frames[i]} (from {self.source_frames[i]})" for i in back]
            lines.append(f"Fell back (fewer than two usable common points): {len(back)} of {n} calibrated "
                         f"frames, used by {uses} driving frames: {_short_list(pairs)}.")
        clamped = np.flatnonzero(self.clamped)
        if clamped.size:
            lo, hi = self.scale_range
            lines.append(f"Clamped to scale range {lo:g}..{hi:g}: {len(clamped)} of {n} calibrated frames: "
                         f"{_short_list([str(self.calibrated_frames[i]) for i in clamped])}.")
        if self.no_person_frames.size:
            lines.append(f"No driving person in {self.no_person_frames.size} frames: "
                         f"{_short_list([str(i) for i in self.no_person_frames])}.")
        if self.several_people_frames.size:
            lines.append(f"{self.several_people_frames.size} driving frames have more than one person; "
                         "person 0 was used (set person_index to choose).")
        if self.mask_from_pose:
            lines.append("Mask: derived from the reference pose (thick limbs, filled torso, dilated). "
                         "A segmentation mask of the reference person gives better results: connect one "
                         "to reference_mask.")
        return "\n".join(lines)


def _short_list(items: Sequence[str], limit: int = 12) -> str:
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


def _check_settings(keypoint_set: str, min_confidence: float, sparsity: int,
                    scale_range: tuple[float, float]) -> None:
    if keypoint_set not in KEYPOINT_SETS:
        raise ValueError(f"keypoint set must be one of {list(KEYPOINT_SETS)}, got {keypoint_set!r}")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in 0..1, got {min_confidence}; the authors use 0.3")
    if int(sparsity) != sparsity or sparsity < 1:
        raise ValueError(f"sparsity must be a whole number >= 1 (1 calibrates every frame), got {sparsity}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale range must satisfy 0 < min_scale <= max_scale, got {lo} and {hi}; "
                         "raise min_scale above 0 or swap the two")


def _reference_person(pose: PoseSequence, person_index: int, min_confidence: float) -> np.ndarray:
    """The chosen reference person's body keypoints ``[18,3]`` in the pose's canvas pixels."""
    if pose.num_frames != 1:
        raise ValueError(f"the reference pose must have 1 frame, got {pose.num_frames}; connect the pose "
                         "of the reference image, not of the driving video")
    people = int(pose.people[0])
    if people == 0:
        raise ValueError("the reference pose has no person: the pose detector found nobody in the "
                         "reference image. Use an image where the person is clearly visible (check the "
                         "preview of TCAN Pose Extract), or connect the reference image's own pose")
    if person_index < 0 and people > 1:
        raise ValueError(f"the reference pose has {people} people and none is chosen: set person_index "
                         f"to 0..{people - 1} to pick the person to animate")
    if person_index >= people:
        raise ValueError(f"person_index is {person_index} but the reference pose has only {people} "
                         f"{'person' if people == 1 else 'people'}; use 0..{people - 1} (or -1 for the only one)")
    body = pose.body[0, max(person_index, 0)]
    if not seen_points(body, min_confidence).any():
        raise ValueError(f"the reference pose has no person: person {max(person_index, 0)} has no keypoint "
                         f"with confidence >= {min_confidence:g}. Lower min_confidence or re-run Pose Extract "
                         "on a clearer reference image")
    return body


def _driving_person(pose: PoseSequence, person_index: int) -> tuple[PoseSequence, np.ndarray, np.ndarray]:
    """One-person copy of the driving poses, frames with several people, frames with the person absent."""
    index = max(person_index, 0)
    frames = pose.num_frames
    single = PoseSequence.empty(frames, 1, pose.width, pose.height)
    present = pose.people > index
    if pose.body.shape[1] > index:
        single.body[:, 0] = pose.body[:, index]
        single.face[:, 0] = pose.face[:, index]
        single.hands[:, 0] = pose.hands[:, index]
        single.body[~present] = 0.0
        single.face[~present] = 0.0
        single.hands[~present] = 0.0
    single.people[:] = present.astype(np.int64)
    several = np.flatnonzero(pose.people > 1) if person_index < 0 else np.zeros(0, np.int64)
    return single, several, np.flatnonzero(~present)


def _fit(ref_body: np.ndarray, drv_body: np.ndarray, indices: Sequence[int], min_confidence: float,
         allow_rotation: bool, scale_range: tuple[float, float] | None) -> SimilarityFit:
    """Fit every driving frame ``[F,18,3]`` to the reference ``[18,3]`` on the points seen in both."""
    idx = np.asarray(indices)
    ref = ref_body[idx]
    drv = drv_body[:, idx]
    both = seen_points(ref, min_confidence)[None] & seen_points(drv, min_confidence)
    weights = np.where(both, ref[None, :, 2] * drv[..., 2], 0.0)
    src = np.broadcast_to(ref[None, :, :2], drv[..., :2].shape)
    return fit_similarity(src, drv[..., :2], weights, allow_rotation, scale_range)


def _no_fit_error(ref_body: np.ndarray, drv_body: np.ndarray, keypoint_set: str, min_confidence: float,
                  allow_rotation: bool) -> ValueError:
    """The error for a clip where no frame can be fitted, naming the keypoint set that would work."""
    frames = drv_body.shape[0]
    ref_seen = int(seen_points(ref_body[list(KEYPOINT_SETS[keypoint_set])], min_confidence).sum())
    if ref_seen < 2:
        why = (f"the reference pose has only {ref_seen} of the '{keypoint_set}' keypoints "
               f"({KEYPOINT_SET_HELP[keypoint_set]}) with confidence >= {min_confidence:g}")
    else:
        why = (f"no driving frame shares two or more '{keypoint_set}' keypoints "
               f"({KEYPOINT_SET_HELP[keypoint_set]}) with the reference at confidence >= {min_confidence:g}")
    options = []
    for name, indices in KEYPOINT_SETS.items():
        if name != keypoint_set:
            usable = int(_fit(ref_body, drv_body, indices, min_confidence, allow_rotation, None).valid.sum())
            if usable:
                options.append((usable, name))
    if options:
        usable, name = max(options, key=lambda option: option[0])
        advice = f"choose keypoint set '{name}' instead (it fits {usable} of {frames} frames)"
    else:
        advice = ("no keypoint set fits any frame either: lower min_confidence, or check that the "
                  "reference and driving poses come from Pose Extract on the right images")
    return ValueError(f"TPC cannot calibrate any frame: {why}; {advice}")


def _nearest(targets: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each target index, the nearest of the sorted candidate indices (the earlier one on a tie)."""
    pos = np.searchsorted(candidates, targets)
    before = candidates[np.clip(pos - 1, 0, len(candidates) - 1)]
    after = candidates[np.clip(pos, 0, len(candidates) - 1)]
    return np.where(np.abs(targets - before) <= np.abs(after - targets), before, after)


def _warp(src: np.ndarray, matrix: np.ndarray, scale: float, size: tuple[int, int],
          interpolation: int, out: np.ndarray) -> None:
    """Warp ``src`` into ``out`` (``size`` = (width, height)), area-reducing it first on strong shrinks."""
    if scale < PREFILTER_BELOW:
        h, w = src.shape[:2]
        rw, rh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        fx, fy = rw / w, rh / h
        src = cv2.resize(src, (rw, rh), interpolation=cv2.INTER_AREA)
        # cv2.resize puts pixel centres at (x + 0.5) * f - 0.5; map reduced pixels back to originals.
        back = np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5]])
        matrix = np.concatenate([matrix[:, :2] @ back[:, :2], (matrix[:, :2] @ back[:, 2] + matrix[:, 2])[:, None]],
                                axis=1)
    cv2.warpAffine(src, matrix, size, dst=out, flags=interpolation,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# The reference pose's canvas and the reference image may differ in aspect by this fraction (the
# rounding of a resized copy: 683 vs 682.67 pixels is 0.05%; 2% also covers crops of a few pixels);
# the keypoints are then scaled per axis. More than that means the pose is from another image.
POSE_ASPECT_TOLERANCE = 0.02


def calibrate(
    reference: np.ndarray,
    reference_pose: PoseSequence,
    driving_pose: PoseSequence,
    reference_mask: np.ndarray | None = None,
    keypoint_set: str = "face",
    min_confidence: float = 0.3,
    sparsity: int = 4,
    allow_rotation: bool = True,
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE,
    person_index: int = -1,
    callback: Callable[[int], None] | None = None,
) -> Calibration:
    """TPC: warp the reference ``[H,W,3]`` (0..1) and its mask ``[H,W]`` onto every ``sparsity``-th driving pose.

    The reference pose (1 frame) is in its own canvas pixels and is scaled to the reference
    image (their aspects may differ by :data:`POSE_ASPECT_TOLERANCE`, else a ValueError); the output canvas is the driving poses' canvas. Without ``reference_mask`` a person
    mask is drawn from the reference pose. ``person_index`` picks the person in the reference and
    driving poses (-1: the only person of the reference, and person 0 of each driving frame).
    ``callback(n)`` is called after each warped frame with the number of driving frames it covers.
    """
    _check_settings(keypoint_set, min_confidence, sparsity, scale_range)
    sparsity = int(sparsity)
    reference = np.asarray(reference, np.float32)
    if reference.ndim != 3 or reference.shape[2] != 3:
        raise ValueError(f"the reference image must be [H,W,3] (one RGB image), got {reference.shape}")
    ref_h, ref_w = reference.shape[:2]
    if reference_mask is not None:
        reference_mask = np.asarray(reference_mask, np.float32)
        if reference_mask.ndim != 2:
            raise ValueError(f"the reference mask must be one [H,W] mask, got shape {reference_mask.shape}")
        if reference_mask.shape != (ref_h, ref_w):
            raise ValueError(f"the reference mask is {reference_mask.shape[1]}x{reference_mask.shape[0]} "
                             f"but the reference image is {ref_w}x{ref_h}; make the mask from the same "
                             "image, or resize it to the image's size")
        if not (reference_mask > 0).any():
            raise ValueError("the reference mask is empty (all zero), so nothing of the person would be "
                             "kept; connect a mask that covers the person, or leave reference_mask "
                             "unconnected to derive one from the pose")
    if driving_pose.num_frames == 0:
        raise ValueError("the driving pose has no frames; connect the poses of the driving video")

    ref_body = _reference_person(reference_pose, person_index, min_confidence).copy()
    sx, sy = ref_w / reference_pose.width, ref_h / reference_pose.height
    if abs(sx - sy) > POSE_ASPECT_TOLERANCE * max(sx, sy):
        raise ValueError(
            f"the reference pose was found on a {reference_pose.width}x{reference_pose.height} canvas (aspect "
            f"{reference_pose.width / reference_pose.height:.3f}) but the reference image is {ref_w}x{ref_h} "
            f"(aspect {ref_w / ref_h:.3f}), so the pose is not from this image. Connect the same image to TCAN "
            "TPC Calibrate's reference and to the TCAN Pose Extract that makes its reference_pose (a resized copy is "
            f"fine: aspects may differ by up to {POSE_ASPECT_TOLERANCE:.0%})")
    ref_body[:, :2] *= np.array([sx, sy], np.float32)

    driving, several, absent = _driving_person(driving_pose, person_index)
    drv_body = driving.body[:, 0]
    indices = KEYPOINT_SETS[keypoint_set]
    fit = _fit(ref_body, drv_body, indices, min_confidence, allow_rotation, scale_range)
    if not fit.valid.any():
        raise _no_fit_error(ref_body, drv_body, keypoint_set, min_confidence, allow_rotation)

    frames = driving.num_frames
    calibrated = np.arange(0, frames, sparsity, dtype=np.int64)
    source = _nearest(calibrated, np.flatnonzero(fit.valid))
    frame_to_calibrated = np.arange(frames, dtype=np.int64) // sparsity

    mask_from_pose = reference_mask is None
    if mask_from_pose:
        reference_mask = person_mask_from_pose(ref_body, ref_h, ref_w, min_confidence)
    reference = np.ascontiguousarray(reference)
    reference_mask = np.ascontiguousarray(np.clip(reference_mask, 0.0, 1.0))

    size = (driving.width, driving.height)
    images = np.empty((len(calibrated), driving.height, driving.width, 3), np.float32)
    masks = np.empty((len(calibrated), driving.height, driving.width), np.float32)
    for i, src_frame in enumerate(source):
        matrix, scale = fit.matrix[src_frame], float(fit.scale[src_frame])
        _warp(reference, matrix, scale, size, IMAGE_FILTER, images[i])
        _warp(reference_mask, matrix, scale, size, MASK_FILTER, masks[i])
        if callback is not None:
            callback(int(min(sparsity, frames - calibrated[i])))
    # Cubic interpolation overshoots at sharp edges.
    np.clip(images, 0.0, 1.0, out=images)
    np.clip(masks, 0.0, 1.0, out=masks)

    result = Calibration(
        images=torch.from_numpy(images),
        masks=torch.from_numpy(masks),
        calibrated_frames=calibrated,
        frame_to_calibrated=frame_to_calibrated,
        transforms=fit.matrix[source][frame_to_calibrated],
        source_frames=source,
        scales=fit.scale[source],
        angles=fit.angle[source],
        clamped=fit.clamped[source],
        keypoint_set=keypoint_set,
        keypoint_indices=tuple(indices),
        min_confidence=float(min_confidence),
        sparsity=sparsity,
        allow_rotation=bool(allow_rotation),
        scale_range=(float(scale_range[0]), float(scale_range[1])),
        driving_pose=driving,
        mask_from_pose=mask_from_pose,
        reference_size=(ref_h, ref_w),
        several_people_frames=several,
        no_person_frames=absent,
    )
    log.info("TPC calibrated %d of %d frames with '%s' keypoints (%s)", len(calibrated), frames,
             keypoint_set, ", ".join(BODY_NAMES[i] for i in indices))
    return result
