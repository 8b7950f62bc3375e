"""Checking and preparing the frames the metrics compare.

Every metric reads 8-bit RGB frames ``[F,H,W,3]`` uint8, as DisCo's code reads the PNG files it
scores: IMAGE tensors (0..1 float) are rounded to 8 bits first, exactly what saving them as PNG would do.
Generated and target frames must have the same count and size; a size difference is an error unless
a resize rule says how to settle it (``target``: generated frames are resized to the target's size,
bilinear, as DisCo does; ``WxH``: both are resized to that size, bicubic on 8-bit images).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

log = logging.getLogger(__name__)

RESIZE_NONE = "none"
RESIZE_TARGET = "target"
RESIZE_HELP = ("'none' (sizes must match), 'target' (resize the generated frames to the target's size, as DisCo "
               "does) or WxH such as 256x256 (resize both; DisCo's TikTok test set is 256x256)")


def parse_resize(rule: str) -> str | tuple[int, int]:
    """'none', 'target' or 'WxH' -> the rule (``(width, height)`` for a fixed size)."""
    rule = str(rule).strip().lower()
    if rule in (RESIZE_NONE, RESIZE_TARGET):
        return rule
    m = re.fullmatch(r"(\d+)\s*x\s*(\d+)", rule)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return int(m.group(1)), int(m.group(2))
    raise ValueError(f"resize rule {rule!r} is not understood; use {RESIZE_HELP}")


def image_to_uint8(images: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """IMAGE ``[F,H,W,3]`` float 0..1 (or uint8) -> uint8 ``[F,H,W,3]``; a clear error for anything else."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"the {what} frames must be a batch [F,H,W,3], got shape {list(arr.shape)}")
    if arr.shape[-1] != 3:
        raise ValueError(f"the {what} frames have {arr.shape[-1]} channels (shape {list(arr.shape)}); the metrics "
                         "compare RGB frames with 3 channels: drop the alpha channel or convert grey images to RGB "
                         "first")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"the {what} frames have dtype {arr.dtype}; give floats in 0..1 (a ComfyUI IMAGE) or uint8")
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
        raise ValueError(f"the {what} frames must hold values in 0..1, got {lo:.4g}..{hi:.4g}"
                         f"{' with NaN/inf' if not np.isfinite(arr).all() else ''}; a 0..255 image must be divided "
                         "by 255 (or passed as uint8) and a -1..1 image mapped with (x + 1) / 2")
    return np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)


def resize_uint8(frames: np.ndarray, width: int, height: int, interpolation: str = "bilinear") -> np.ndarray:
    """uint8 ``[F,H,W,3]`` -> uint8 ``[F,height,width,3]`` with OpenCV (DisCo's ``cv2.resize``)."""
    import cv2

    if frames.shape[1:3] == (height, width):
        return frames
    flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}[interpolation]
    return np.stack([cv2.resize(f, (width, height), interpolation=flag) for f in frames])


def match_frames(generated: np.ndarray, target: np.ndarray, resize: str | tuple[int, int] = RESIZE_NONE,
                 name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Check counts and apply the resize rule: (generated, target) uint8 ``[F,H,W,3]`` of one size."""
    label = f" of {name!r}" if name else ""
    if generated.shape[0] != target.shape[0]:
        raise ValueError(f"the generated video{label} has {generated.shape[0]} frames but the target has "
                         f"{target.shape[0]}; the metrics compare frame i with frame i, so give both the same frames "
                         "(for example cut the longer one to the shorter one's length)")
    if resize == RESIZE_NONE:
        if generated.shape[1:3] != target.shape[1:3]:
            raise ValueError(
                f"the generated frames{label} are {generated.shape[2]}x{generated.shape[1]} but the target frames are "
                f"{target.shape[2]}x{target.shape[1]}; choose a resize rule: {RESIZE_HELP}")
        return generated, target
    if resize == RESIZE_TARGET:
        return resize_uint8(generated, target.shape[2], target.shape[1]), target
    width, height = resize
    return resize_uint8(generated, width, height, "bicubic"), resize_uint8(target, width, height, "bicubic")


def resize_clean(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[F,H,W,3]`` -> float ``[F,3,size,size]`` in 0..255: PIL bicubic on each channel as float, the
    "clean" resize of clean-fid that DisCo's FID, FID-VID and FVD code uses."""
    from PIL import Image

    out = np.empty((frames.shape[0], 3, size, size), np.float32)
    for i, frame in enumerate(frames):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(frame[..., c], dtype=np.float32))
            resized = np.asarray(channel.resize((size, size), resample=Image.BICUBIC), dtype=np.float32)
            out[i, c] = np.clip(resized, 0.0, 255.0)
    return torch.from_numpy(out)
