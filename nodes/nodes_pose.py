"""Pose nodes: smooth, retarget, render, save and load POSE_KEYPOINT (issue 3).

Each node converts POSE_KEYPOINT to a dense ``PoseSequence``, makes one ``tcan_core.pose`` call
and converts back. ComfyUI's input and output folders come from the host bridge.
"""

from __future__ import annotations

import logging
import os

import torch

from tcan_core.pose import pose_json
from tcan_core.pose import retarget as pose_retarget
from tcan_core.pose import smooth as pose_smooth
from tcan_core.paths import safe_join
from tcan_core.pose.render import render_poses
from tcan_core.pose_format import parse_pose_keypoint, to_pose_keypoint

from . import host
from .common import CATEGORY, with_report
from .previews import pose_frames, pose_marks, with_preview

log = logging.getLogger(__name__)

POSE_CATEGORY = f"{CATEGORY}/pose"
NO_FILE = ""


def _frames_without_person(seq) -> int:
    return int(((seq.body[..., 2] > 0).sum((1, 2)) == 0).sum()) if seq.body.shape[1] else seq.num_frames


class TCANPoseSmooth:
    DESCRIPTION = ("Cleans a pose clip: bridges short gaps where a keypoint (or the whole person) is "
                   "missing by interpolating between the frames where it is seen, then removes "
                   "jitter with a One-Euro filter. Points never seen stay missing.")
    CATEGORY = POSE_CATEGORY
    FUNCTION = "smooth"
    RETURN_TYPES = ("POSE_KEYPOINT",)
    RETURN_NAMES = ("pose_keypoint",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pose_keypoint": ("POSE_KEYPOINT", {"tooltip": "Poses of a clip, e.g. from TCAN Pose Extract."}),
            "max_gap": ("INT", {"default": pose_smooth.DEFAULT_MAX_GAP, "min": 0, "max": 1000, "tooltip":
                                "Longest run of missing frames to fill by interpolation; longer gaps stay "
                                "missing. 0 turns gap filling off."}),
            "one_euro": ("BOOLEAN", {"default": True, "tooltip": "Remove jitter with the One-Euro filter."}),
            "min_cutoff": ("FLOAT", {"default": pose_smooth.DEFAULT_MIN_CUTOFF, "min": 0.01, "max": 100.0, "step": 0.01,
                                     "tooltip": "One-Euro cutoff (Hz) for slow motion: lower smooths more "
                                                "but lags more."}),
            "beta": ("FLOAT", {"default": pose_smooth.DEFAULT_BETA, "min": 0.0, "max": 10.0, "step": 0.001,
                               "tooltip": "How fast the cutoff rises with speed (per pixel/second): higher "
                                          "keeps fast moves sharp."}),
            "fps": ("FLOAT", {"default": pose_smooth.DEFAULT_FPS, "min": 1.0, "max": 240.0, "step": 0.5,
                              "tooltip": "Frame rate of the driving video."}),
        }}

    def smooth(self, pose_keypoint, max_gap, one_euro, min_cutoff, beta, fps):
        seq = parse_pose_keypoint(pose_keypoint)
        res = pose_smooth.smooth_poses(seq, max_gap=max_gap, one_euro=one_euro, min_cutoff=min_cutoff,
                                  beta=beta, fps=fps)
        text = (f"{res.poses.num_frames} frames; {res.filled_points} points filled; "
                f"{res.frames_without_person} frames still without a person")
        return with_preview(text, (to_pose_keypoint(res.poses),), pose_frames(res.poses), "pose_smooth",
                            tcan_marks=pose_marks(res.poses))


class TCANPoseRetarget:
    DESCRIPTION = ("Fits the driving poses to the character's body proportions (TCAN's retargeting): "
                   "the neck stays fixed, each bone takes the character's length times the driving "
                   "bone's foreshortening against the first frame, and its children move with it. "
                   "Hands follow the wrists, the face follows the nose.")
    CATEGORY = POSE_CATEGORY
    FUNCTION = "retarget"
    RETURN_TYPES = ("POSE_KEYPOINT",)
    RETURN_NAMES = ("pose_keypoint",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference_pose": ("POSE_KEYPOINT", {"tooltip": "Pose of the character in the reference image "
                                                            "(one frame; needs the neck and nose)."}),
            "driving_pose": ("POSE_KEYPOINT", {"tooltip": "Poses of the driving video, one per frame."}),
            "canvas": (list(pose_retarget.CANVAS_MODES), {"default": pose_retarget.CANVAS_REFERENCE, "tooltip":
                       "reference: place the poses on the reference image at the character's neck (plus "
                       "the driving neck's motion); driving: keep the driving video's canvas."}),
        }}

    def retarget(self, reference_pose, driving_pose, canvas):
        res = pose_retarget.retarget_poses(parse_pose_keypoint(reference_pose), parse_pose_keypoint(driving_pose), canvas)
        frames = res.poses.num_frames
        text = (f"{frames} frames on the {canvas} canvas ({res.poses.width}x{res.poses.height}); "
                f"character/driving scale {res.body_scale:.3f}; "
                f"{res.empty_frames} of {frames} frames without a person (left empty)")
        return with_report(text, (to_pose_keypoint(res.poses),))


class TCANPoseRender:
    DESCRIPTION = ("Draws poses as the OpenPose ControlNet expects them: coloured limbs and joints, hands "
                   "and face dots on black, one image per frame.")
    CATEGORY = POSE_CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("pose_images",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pose_keypoint": ("POSE_KEYPOINT", {"tooltip": "Poses to draw, one image per frame."}),
            "width": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 8,
                              "tooltip": "Image width in pixels; 0 keeps the pose canvas width."}),
            "height": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 8,
                               "tooltip": "Image height in pixels; 0 keeps the pose canvas height."}),
            "body": ("BOOLEAN", {"default": True, "tooltip": "Draw the body skeleton."}),
            "hands": ("BOOLEAN", {"default": True, "tooltip": "Draw the hand keypoints."}),
            "face": ("BOOLEAN", {"default": True, "tooltip": "Draw the face keypoints."}),
        }}

    def render(self, pose_keypoint, width, height, body, hands, face):
        seq = parse_pose_keypoint(pose_keypoint)
        with host.Progress(seq.num_frames, "TCAN Pose Render") as bar:
            frames = render_poses(seq, width or None, height or None, body=body, hands=hands,
                                  face=face, callback=bar.step)
        images = torch.from_numpy(frames).float().div_(255.0)
        empty = _frames_without_person(seq)
        text = f"{images.shape[0]} frames at {images.shape[2]}x{images.shape[1]}; {empty} without a person (black)"
        return with_preview(text, (images,), images, "pose_render", tcan_marks=pose_marks(seq))


class TCANPoseSave:
    DESCRIPTION = ("Saves poses as a JSON file in ComfyUI's output folder, in the schema "
                   "comfyui_controlnet_aux writes, so they can be edited and loaded again.")
    CATEGORY = POSE_CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pose_keypoint": ("POSE_KEYPOINT", {"tooltip": "Poses to save."}),
            "filename_prefix": ("STRING", {"default": "TCAN/pose", "tooltip":
                                "File name prefix inside the output folder (may include sub-folders); a "
                                "number is appended."}),
        }}

    def save(self, pose_keypoint, filename_prefix):
        out_dir = host.output_directory()
        path = pose_json.next_numbered_path(out_dir, filename_prefix.strip())
        pose_json.save_pose_json(pose_keypoint, path)
        name = os.path.relpath(path, out_dir)
        frames = len(pose_keypoint) if isinstance(pose_keypoint, list) else 1
        return with_report(f"saved {frames} frames to {name}", ())


class TCANPoseLoad:
    DESCRIPTION = ("Loads poses from a JSON file in ComfyUI's input folder (TCAN Pose Save or "
                   "comfyui_controlnet_aux format; pixel or 0..1 coordinates).")
    CATEGORY = POSE_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("POSE_KEYPOINT",)
    RETURN_NAMES = ("pose_keypoint",)

    @classmethod
    def INPUT_TYPES(cls):
        files = pose_json.list_pose_files(host.input_directory()) or [NO_FILE]
        return {"required": {
            "file": (files, {"tooltip": "A .json pose file in ComfyUI's input folder."}),
            "typed_name": ("STRING", {"default": "", "tooltip":
                           "Optional: a file name inside the input folder, used instead of the list "
                           "(for files added after the page loaded)."}),
        }}

    @staticmethod
    def _path(file, typed_name):
        name = (typed_name or "").strip() or file
        if not name:
            raise ValueError("no pose file chosen: put a .json pose file in ComfyUI's input folder "
                             f"({host.input_directory()}) and pick it, or type its name")
        return safe_join(host.input_directory(), name, "pose file")

    @classmethod
    def IS_CHANGED(cls, file, typed_name):
        try:
            return os.path.getmtime(cls._path(file, typed_name))
        except (OSError, ValueError):
            return float("nan")

    def load(self, file, typed_name):
        path = self._path(file, typed_name)
        poses = pose_json.load_pose_json(path)
        people = [len(frame["people"]) for frame in poses]
        empty = sum(1 for n in people if n == 0)
        text = f"loaded {len(poses)} frames from {path.name}; {empty} without a person"
        seq = parse_pose_keypoint(poses)
        return with_preview(text, (poses,), pose_frames(seq), "pose_load", tcan_marks=pose_marks(seq))


NODE_CLASS_MAPPINGS = {
    "TCANPoseSmooth": TCANPoseSmooth,
    "TCANPoseRetarget": TCANPoseRetarget,
    "TCANPoseRender": TCANPoseRender,
    "TCANPoseSave": TCANPoseSave,
    "TCANPoseLoad": TCANPoseLoad,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TCANPoseSmooth": "TCAN Pose Smooth",
    "TCANPoseRetarget": "TCAN Pose Retarget",
    "TCANPoseRender": "TCAN Pose Render",
    "TCANPoseSave": "TCAN Pose Save",
    "TCANPoseLoad": "TCAN Pose Load",
}
