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
from tcan_core.pose import retarget_check
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
                   "bone's foreshortening against the proportions frame, and its children move with it. "
                   "Hands follow the wrists, the face follows the nose. Marks the frames to check (bones "
                   "off the character's proportions, joints the driving pose misses, limbs that flip) and "
                   "draws the result over the reference image.")
    CATEGORY = POSE_CATEGORY
    FUNCTION = "retarget"
    RETURN_TYPES = ("POSE_KEYPOINT", "IMAGE")
    RETURN_NAMES = ("pose_keypoint", "preview")
    OUTPUT_TOOLTIPS = ("The retargeted poses, one person per frame.",
                       "The retargeted skeleton over the (dimmed) reference image, one image per frame.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference_pose": ("POSE_KEYPOINT", {"tooltip": "Pose of the character in the reference image "
                                                            "(one frame; needs the neck and nose)."}),
            "driving_pose": ("POSE_KEYPOINT", {"tooltip": "Poses of the driving video, one per frame."}),
            "canvas": (list(pose_retarget.CANVAS_MODES), {"default": pose_retarget.CANVAS_REFERENCE, "tooltip":
                       "reference: place the poses on the reference image at the character's neck (plus "
                       "the driving neck's motion); driving: keep the driving video's canvas."}),
            "mode": (list(pose_retarget.MODES), {"default": pose_retarget.MODE_AUTHORS, "tooltip":
                     "authors_code: as TCAN's released code, which made the published results: each left/right "
                     "pair takes the character's longer side, foreshortening is clipped at 'clip', lengths are "
                     "measured in neck-nose units and the neck's motion is scaled by the neck-nose ratio. "
                     "algorithm_1: the pack's earlier reading of the paper: pairs take their average (one "
                     "side's measuring error is halved, not copied), foreshortening is not clipped (a bone "
                     "that truly grows, as when the dancer turns to the camera, grows on the character too, "
                     "but so does a detector glitch), and one body scale sizes the motion (steady when the "
                     "head nods)."}),
            "clip": ("FLOAT", {"default": pose_retarget.DEFAULT_CLIP, "min": 0.1, "max": 10.0, "step": 0.01,
                               "tooltip": "authors_code only: a bone may grow to at most this times its length "
                                          "in the proportions frame (TCAN: 1.1), so a sudden over-long "
                                          "detection cannot stretch the character."}),
            "proportions": (list(pose_retarget.PROPORTIONS_MODES), {"default": pose_retarget.PROPORTIONS_FIRST,
                            "tooltip": "Which driving frame defines the dancer's proportions: the first (TCAN's "
                                       "Algorithm 1), the one in proportions_frame, or automatic (the frame "
                                       "showing the most bones at their fullest length). Pick a frame where "
                                       "the whole body faces the camera."}),
            "proportions_frame": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                                  "The frame used when proportions is 'chosen frame' (0 = the first)."}),
            "length_tolerance": ("FLOAT", {"default": retarget_check.DEFAULT_TOLERANCE, "min": 0.01, "max": 10.0,
                                           "step": 0.01, "tooltip": "Mark a frame when a bone's length departs "
                                           "from the character's by more than this fraction (0.25 = 25%)."}),
            "angle_threshold": ("FLOAT", {"default": retarget_check.DEFAULT_ANGLE, "min": 1.0, "max": 180.0,
                                          "step": 1.0, "tooltip": "Mark a frame when an arm or leg bone turns by "
                                          "more than this many degrees since the previous frame."}),
            "preview_size": ("INT", {"default": retarget_check.DEFAULT_PREVIEW_SIZE, "min": 64, "max": 4096,
                                     "step": 8, "tooltip": "Longest side of the preview images; every frame is "
                                     "kept in memory (frames x height x width x 12 bytes)."}),
        }, "optional": {
            "reference_image": ("IMAGE", {"tooltip": "The character's picture, drawn under the preview "
                                                     "skeleton (without it the preview is on black)."}),
        }}

    def retarget(self, reference_pose, driving_pose, canvas, mode=pose_retarget.MODE_AUTHORS,
                 clip=pose_retarget.DEFAULT_CLIP, proportions=pose_retarget.PROPORTIONS_FIRST, proportions_frame=0,
                 length_tolerance=retarget_check.DEFAULT_TOLERANCE, angle_threshold=retarget_check.DEFAULT_ANGLE,
                 preview_size=retarget_check.DEFAULT_PREVIEW_SIZE, reference_image=None):
        image = None
        if reference_image is not None:
            image = (reference_image[0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        check = retarget_check.retarget_and_check(
            parse_pose_keypoint(reference_pose), parse_pose_keypoint(driving_pose), canvas, mode=mode, clip=clip,
            proportions=proportions, proportions_frame=proportions_frame, tolerance=length_tolerance,
            angle_threshold=angle_threshold, image=image, preview_size=preview_size)
        preview = torch.from_numpy(check.preview).float().div_(255.0)
        # The scrubber (web/) shows the preview frames and marks the flagged frames on its timeline.
        return with_preview(check.report, (to_pose_keypoint(check.result.poses), preview), preview,
                            "pose_retarget", tcan_marks=check.marks)


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
