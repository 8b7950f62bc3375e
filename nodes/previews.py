"""Scrubbable previews: a node's frames as small temp images in ``ui.images`` (web/tcan_scrubber.js).

Frames are downscaled (longest side ``PREVIEW_SIDE``) and written as JPEG into ComfyUI's temp
folder, which ComfyUI serves through its normal ``/view`` route and empties at start. The web
extension loads them one at a time as the slider moves, so a 2,000-frame clip does not load
2,000 images at once. Extra ``ui`` keys the scrubber reads: ``tcan_marks`` (frames to flag on the
timeline, ``[{"frame": int, "reasons": [str]}]``) and ``tcan_pose`` (body keypoints of every frame,
for dragging points in TCAN Pose Edit; a list of one dict, as ComfyUI wants every ``ui`` value a list).

Wiring a node: ``return with_preview(report, result, frames)`` in place of ``with_report(report, result)``.
"""

from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from tcan_core.pose.render import render_poses
from tcan_core.pose_format import PoseSequence

from . import host

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256
JPEG_QUALITY = 85
SUBFOLDER = "tcan_preview"


def _size(height: int, width: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode(frame: torch.Tensor | np.ndarray, size: tuple[int, int], index: int) -> bytes:
    """One frame ``[H,W,3]`` -> JPEG bytes at ``size`` (w, h)."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().to("cpu", torch.float32).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    elif frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if size != frame.shape[1::-1] else frame
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(small[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"could not encode preview frame {index} ({size[0]}x{size[1]}) as JPEG")
    return data.tobytes()


def save_preview_frames(frames: torch.Tensor | np.ndarray, prefix: str, side: int = PREVIEW_SIDE) -> list[dict]:
    """Frames ``[F,H,W,3]`` (float 0..1 or uint8) -> ``ui.images`` entries of downscaled JPEGs in the temp folder."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"preview frames must be [frames, height, width, 3], got shape {tuple(frames.shape)}")
    folder = os.path.join(host.temp_directory(), SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    run = f"{prefix}_{uuid.uuid4().hex[:10]}"
    size = _size(int(frames.shape[1]), int(frames.shape[2]), side)
    names = [f"{run}_{f:05d}.jpg" for f in range(int(frames.shape[0]))]

    def write(f: int) -> None:
        with open(os.path.join(folder, names[f]), "wb") as fh:
            fh.write(_encode(frames[f], size, f))

    # OpenCV and torch release the GIL while they resize and encode: threads use every core.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(len(names))))
    return [{"filename": name, "subfolder": SUBFOLDER, "type": "temp"} for name in names]


def pose_frames(seq: PoseSequence, side: int = PREVIEW_SIDE) -> np.ndarray:
    """The skeletons of ``seq`` drawn on black at preview size: uint8 ``[F,h,w,3]``."""
    width, height = _size(seq.height, seq.width, side)
    return render_poses(seq, width, height)


def pose_marks(seq: PoseSequence) -> list[dict]:
    """Timeline marks for frames without a person (``[{"frame", "reasons"}]``)."""
    seen = (seq.body[..., 2] > 0).any(-1).any(-1) if seq.body.shape[1] else np.zeros(seq.num_frames, bool)
    return [{"frame": int(f), "reasons": ["no person"]} for f in np.flatnonzero(~seen)]


def pose_points(seq: PoseSequence) -> dict:
    """Body keypoints for dragging in the scrubber: canvas size and, per frame and person, 18 ``[x, y, c]``."""
    frames = [[np.round(seq.body[f, p].astype(np.float64), 2).tolist() for p in range(int(seq.people[f]))]
              for f in range(seq.num_frames)]
    return {"width": int(seq.width), "height": int(seq.height), "frames": frames}


def with_preview(text: str, result: tuple, frames: torch.Tensor | np.ndarray, prefix: str = "tcan",
                 **extra) -> dict:
    """A node return value with the report text, the frames as ``ui.images`` and ``extra`` ui keys.

    ComfyUI joins each ``ui`` value over the runs of a list node, so every value must be a list:
    a value that is not one (``tcan_pose``'s dict) is sent as a list of one.
    """
    ui = {"text": [text], "images": save_preview_frames(frames, prefix)}
    ui.update({key: value if isinstance(value, list) else [value] for key, value in extra.items() if value is not None})
    return {"ui": ui, "result": result}
