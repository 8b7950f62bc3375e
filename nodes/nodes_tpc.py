"""TPC Calibrate: the reference warped onto every driving pose (thin over ``tcan_core.tpc``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from tcan_core.pose_format import parse_pose_keypoint
from tcan_core.tpc import DEFAULT_SCALE_RANGE, KEYPOINT_SET_HELP, KEYPOINT_SETS, calibrate
from tcan_core.tpc.preview import preview_frames

from .common import CATEGORY
from .host import Progress
from .previews import with_preview

log = logging.getLogger(__name__)


def _single(batch: torch.Tensor, dims: int, what: str, fix: str) -> np.ndarray:
    """The one item of a batch of one (``dims`` + 1 dimensions) or an unbatched tensor, as float32 numpy."""
    if batch.ndim == dims + 1:
        if batch.shape[0] != 1:
            raise ValueError(f"{what} must be a single image, got a batch of {batch.shape[0]}; {fix}")
        batch = batch[0]
    if batch.ndim != dims:
        raise ValueError(f"{what} has shape {tuple(batch.shape)}, expected {dims} or {dims + 1} dimensions")
    return batch.detach().to("cpu", torch.float32).numpy()


class TCANTPCCalibrate:
    """Warp the reference onto each driving pose with a Procrustes similarity transform (TPC)."""

    @classmethod
    def INPUT_TYPES(cls):
        sets = ", ".join(f"'{name}' = {KEYPOINT_SET_HELP[name]}" for name in KEYPOINT_SETS)
        return {
            "required": {
                "reference": ("IMAGE", {"tooltip": "The reference image of the person to animate (one image)."}),
                "reference_pose": ("POSE_KEYPOINT", {
                    "tooltip": "Pose of the reference image (1 frame), e.g. from TCAN Pose Extract."}),
                "driving_pose": ("POSE_KEYPOINT", {
                    "tooltip": "Poses of the driving video, one per frame (usually the retargeted ones). "
                               "Their canvas size is the output size."}),
                "keypoint_set": (list(KEYPOINT_SETS), {
                    "default": "face",
                    "tooltip": "Keypoints the alignment is fitted to, when seen in both poses: " + sets
                               + ". 'face' is what the TPC authors use; 'body' suits full-body references "
                                 "whose face is small or hidden."}),
                "min_confidence": ("FLOAT", {
                    "default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Keypoints below this detector confidence are ignored (authors: 0.3)."}),
                "sparsity": ("INT", {
                    "default": 4, "min": 1, "max": 64, "step": 1,
                    "tooltip": "Calibrate every k-th frame and reuse it for the frames after it: frame f uses "
                               "the calibration of frame (f // k) * k. 1 calibrates every frame (authors: 4)."}),
                "allow_rotation": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Let the alignment rotate the reference; off keeps it upright (scale and "
                               "shift only)."}),
                "min_scale": ("FLOAT", {
                    "default": DEFAULT_SCALE_RANGE[0], "min": 0.01, "max": 100.0, "step": 0.01,
                    "tooltip": "Smallest allowed scale of the reference; smaller fitted scales are clamped "
                               "to it and counted in the report."}),
                "max_scale": ("FLOAT", {
                    "default": DEFAULT_SCALE_RANGE[1], "min": 0.01, "max": 100.0, "step": 0.01,
                    "tooltip": "Largest allowed scale of the reference; larger fitted scales are clamped "
                               "to it and counted in the report."}),
                "person_index": ("INT", {
                    "default": -1, "min": -1, "max": 63, "step": 1,
                    "tooltip": "Which person (in the order of the pose's people list) to align, in the "
                               "reference and in every driving frame. -1: the reference's only person and "
                               "person 0 of each driving frame."}),
            },
            "optional": {
                "reference_mask": ("MASK", {
                    "tooltip": "Mask of the reference person (1 = person), same size as the reference, from "
                               "any segmentation node. Without it a coarse mask is drawn from the pose."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "MASK", "TCAN_CALIBRATION", "IMAGE")
    RETURN_NAMES = ("calibrated", "calibrated_mask", "calibration", "preview")
    OUTPUT_TOOLTIPS = (
        "The reference aligned to each driving frame's pose, one image per driving frame.",
        "The reference person mask aligned the same way, one per driving frame.",
        "Everything the TCAN sampler needs to use the calibration (transforms, images, masks, poses).",
        "Each calibrated reference with its frame's skeleton drawn on top, to check the alignment.",
    )
    FUNCTION = "calibrate"
    CATEGORY = f"{CATEGORY}/tpc"
    DESCRIPTION = (
        "Test-time Procrustes Calibration (TPC): for every driving frame, a copy of the reference "
        "scaled, rotated and shifted so the person lines up with that frame's pose. The sampler "
        "attends to it as extra reference, which keeps face and clothes when the reference is a "
        "close-up and the dance is full-body."
    )

    def calibrate(self, reference, reference_pose, driving_pose, keypoint_set, min_confidence, sparsity,
                  allow_rotation, min_scale, max_scale, person_index, reference_mask=None):
        image = _single(reference, 3, "reference", "pick one image of the batch for the reference")
        mask = None
        if reference_mask is not None:
            mask = _single(reference_mask, 2, "reference_mask", "connect the mask of the reference image only")
        ref_seq = parse_pose_keypoint(reference_pose)
        drv_seq = parse_pose_keypoint(driving_pose)

        frames = drv_seq.num_frames
        with Progress(2 * frames, "TPC calibrate") as bar:
            cal = calibrate(image, ref_seq, drv_seq, reference_mask=mask, keypoint_set=keypoint_set,
                            min_confidence=min_confidence, sparsity=sparsity, allow_rotation=allow_rotation,
                            scale_range=(min_scale, max_scale), person_index=person_index, callback=bar.step)
            preview = preview_frames(cal, callback=bar.step)
        report = cal.summary()
        log.info(report)
        return with_preview(report, (cal.frame_images(), cal.frame_masks(), cal, preview), preview, "tpc_calibrate")


NODE_CLASS_MAPPINGS = {"TCANTPCCalibrate": TCANTPCCalibrate}
NODE_DISPLAY_NAME_MAPPINGS = {"TCANTPCCalibrate": "TCAN TPC Calibrate"}
