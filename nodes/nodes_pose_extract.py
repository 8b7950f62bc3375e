"""Pose Extract: IMAGE -> POSE_KEYPOINT (+ a preview), with DWPose or OpenPose (issue 3, node 1)."""

from __future__ import annotations

import logging

import torch

from tcan_core.pose import extract
from tcan_core.pose.types import REGISTRY
from tcan_core.pose_format import to_pose_keypoint

from . import host
from .common import CATEGORY, require
from .previews import pose_marks, with_preview

log = logging.getLogger(__name__)

NODE_NAME = "TCAN Pose Extract"
BACKEND_PACKAGES = {spec.name: spec.package for spec in REGISTRY.values()}


class TCANPoseExtract:
    DESCRIPTION = (
        "Finds one person's pose in every frame: OpenPose-18 body, 21 + 21 hand and 70 face points, "
        "in pixels. DWPose needs yolox_l.onnx and dw-ll_ucoco_384.onnx; OpenPose needs "
        "body_pose_model.pth (+ hand_pose_model.pth, facenet.pth). Files are looked up in "
        "models/tcan/pose, models/annotator and comfyui_controlnet_aux's ckpts folder. Frames with no "
        "person stay empty and are counted in the report."
    )
    CATEGORY = f"{CATEGORY}/pose"
    FUNCTION = "extract"
    RETURN_TYPES = ("POSE_KEYPOINT", "IMAGE")
    RETURN_NAMES = ("pose_keypoint", "preview")
    OUTPUT_TOOLTIPS = ("one person's keypoints per frame, in pixels of the input frames",
                       "the skeletons drawn over the (dimmed) frames")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "One image or a video's frames (all of one size)."}),
                "backend": (list(extract.BACKENDS), {
                    "default": extract.BACKEND_DWPOSE,
                    "tooltip": "dwpose: whole-body DWPose on onnxruntime (best hands and face). "
                               "openpose: the CMU body/hand/face networks through controlnet_aux.",
                }),
                "detect_resolution": ("INT", {
                    "default": 512, "min": 0, "max": 4096, "step": 64,
                    "tooltip": "Short side of the frames the detector sees (0 keeps the frame size). "
                               "Keypoints are always given in the input frames' pixels.",
                }),
                "person": (list(extract.PERSON_CHOICES), {
                    "default": extract.PERSON_LARGEST,
                    "tooltip": "Which person to keep when several are found: the largest, the one "
                               "nearest the centre, or the one at person_index counting left to "
                               "right. The same person is then followed through the clip.",
                }),
                "person_index": ("INT", {
                    "default": 0, "min": 0, "max": 63,
                    "tooltip": "With person = index: which person, counting from 0, left to right.",
                }),
                "body": ("BOOLEAN", {"default": True, "tooltip": "Keep the 18 body points."}),
                "hands": ("BOOLEAN", {"default": True, "tooltip": "Keep the 21 + 21 hand points."}),
                "face": ("BOOLEAN", {"default": True, "tooltip": "Keep the 70 face points."}),
            }
        }

    def extract(self, image: torch.Tensor, backend: str, detect_resolution: int, person: str,
                person_index: int, body: bool, hands: bool, face: bool):
        frames = image.detach().cpu().float().numpy()
        extract.check_frames(frames)
        if backend in BACKEND_PACKAGES:
            require(BACKEND_PACKAGES[backend], NODE_NAME)
        estimator = extract.load_backend(backend, host.folder_paths_for("tcan_pose"),
                                         device=str(host.torch_device()), hands=hands, face=face)
        host.register_pack_caches()
        with host.Progress(len(frames), NODE_NAME) as bar:
            result = extract.extract_poses(
                frames, estimator, person=person, index=person_index, body=body, hands=hands,
                face=face, detect_resolution=detect_resolution, progress=bar.update,
                check_interrupt=host.check_interrupt,
            )
        preview = torch.from_numpy(extract.preview_frames(frames, result.poses, body, hands, face))
        report = f"{backend} on {estimator.provider}: {result.summary()}"
        log.info(report)
        return with_preview(report, (to_pose_keypoint(result.poses), preview), preview, "pose_extract",
                            tcan_marks=pose_marks(result.poses))


NODE_CLASS_MAPPINGS = {"TCANPoseExtract": TCANPoseExtract}
NODE_DISPLAY_NAME_MAPPINGS = {"TCANPoseExtract": NODE_NAME}
