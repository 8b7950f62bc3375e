"""Preview of a TPC calibration: each driving frame's skeleton drawn over its calibrated reference."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..pose.render import render_poses
from ..pose_format import PoseSequence
from .calibration import Calibration

# Frames rendered and blended at a time, so the temporaries stay small for long clips.
CHUNK = 16


def _frames(seq: PoseSequence, start: int, stop: int) -> PoseSequence:
    return PoseSequence(body=seq.body[start:stop], face=seq.face[start:stop], hands=seq.hands[start:stop],
                        people=seq.people[start:stop], width=seq.width, height=seq.height)


def preview_frames(cal: Calibration, opacity: float = 0.8,
                   callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Calibrated reference of every driving frame with that frame's skeleton blended on top: ``[F,H,W,3]``.

    The skeleton covers the image with ``opacity`` where it is drawn at full brightness (and
    proportionally less where it is dimmer), so misalignment between the warped person and the
    pose is easy to see. ``callback(n)`` is called after each chunk of ``n`` frames.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"preview opacity must be in 0..1, got {opacity}")
    frames, height, width = cal.num_frames, cal.height, cal.width
    out = torch.empty((frames, height, width, 3), dtype=torch.float32)
    for start in range(0, frames, CHUNK):
        stop = min(start + CHUNK, frames)
        chunk = out[start:stop]
        torch.index_select(cal.images, 0, torch.from_numpy(cal.frame_to_calibrated[start:stop]), out=chunk)
        skeleton = render_poses(_frames(cal.driving_pose, start, stop), width, height)
        # The skeleton covers a few percent of the canvas: blend only the pixels it touches.
        drawn = np.nonzero(skeleton.any(axis=-1))
        colour = skeleton[drawn].astype(np.float32) / 255.0
        alpha = opacity * colour.max(axis=-1, keepdims=True)
        pixels = chunk.numpy()
        pixels[drawn] = pixels[drawn] * (1.0 - alpha) + colour * alpha
        if callback is not None:
            callback(stop - start)
    return out
