"""The one check of ComfyUI's IMAGE type (float [B,H,W,3] in 0..1) that every entry point uses."""

from __future__ import annotations

import torch


def check_image_batch(images: object, what: str, hint: str, layout: str = "[B,H,W,3]") -> None:
    """Raise a ValueError naming ``what``, the shape received and ``hint`` unless ``images`` is a tensor [B,H,W,3]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be an IMAGE batch {layout}, got {shape}; {hint}")
