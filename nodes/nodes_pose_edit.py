"""TCAN Pose Edit: hand fixes of a pose clip, kept as a JSON widget value (thin over ``tcan_core.pose.edit``)."""

from __future__ import annotations

import logging

from tcan_core.pose import edit as pose_edit
from tcan_core.pose_format import parse_pose_keypoint, to_pose_keypoint

from .common import CATEGORY
from .previews import pose_frames, pose_marks, pose_points, with_preview

log = logging.getLogger(__name__)


class TCANPoseEdit:
    DESCRIPTION = (
        "Fixes poses by hand before sampling. Drag a keypoint in this node's preview (after a run) to move "
        "it on that frame, or write edits in the 'edits' text: move a point, delete a point over a frame "
        "range, copy one frame's pose over a range, interpolate between two frames. Edits name frame "
        "numbers and point indices, so they stay valid when the nodes before this one run again; an edit "
        "whose frame or person is not in the clip is listed in the report."
    )
    CATEGORY = f"{CATEGORY}/pose"
    FUNCTION = "edit"
    RETURN_TYPES = ("POSE_KEYPOINT",)
    RETURN_NAMES = ("pose_keypoint",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pose_keypoint": ("POSE_KEYPOINT", {"tooltip": "Poses to fix, e.g. from TCAN Pose Smooth or Pose Retarget."}),
            "edits": ("STRING", {"default": "[]", "multiline": True, "tooltip":
                      "JSON list of edits, applied in order. Frames count from 0, points are OpenPose-18 "
                      "indices (part 'body'; also 'face', 'hand_left', 'hand_right'), x/y are pose-canvas pixels. "
                      '{"op": "move", "frame": 3, "person": 0, "point": 4, "x": 120, "y": 200}; '
                      '{"op": "delete", "frames": [10, 20], "point": 7}; '
                      '{"op": "copy", "source": 5, "frames": [6, 9]}; '
                      '{"op": "interpolate", "frames": [10, 20]}. Dragging a point in the preview adds a move.'}),
        }}

    def edit(self, pose_keypoint, edits: str):
        changes = pose_edit.parse_edits(edits)
        res = pose_edit.apply_edits(parse_pose_keypoint(pose_keypoint), changes)
        return with_preview(res.summary(), (to_pose_keypoint(res.poses),), pose_frames(res.poses), "pose_edit",
                            tcan_marks=pose_marks(res.poses), tcan_pose=pose_points(res.poses))


NODE_CLASS_MAPPINGS = {"TCANPoseEdit": TCANPoseEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"TCANPoseEdit": "TCAN Pose Edit"}
