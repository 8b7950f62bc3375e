"""Per-frame pixel metrics between generated and target frames (uint8 ``[F,H,W,3]``).

Two families: the correct values (L1 as the mean absolute error in 0..1, PSNR on the true squared
error) and the values DisCo's ``ssim_l1_lpips_psnr.py`` computes, which most pose-animation papers
(DisCo, MagicAnimate, TCAN, ...) report and which are only comparable to each other:

- "L1 (DisCo)": the mean absolute error in 0..255 divided by the number of pixels H*W;
- "PSNR (DisCo uint8)": the squared error taken on uint8 arrays, so both the difference and its
  square wrap around modulo 256 (a difference of 16 squares to 0), then ``20 log10(255 / sqrt(mse))``
  and 100 for a zero error;
- SSIM as DisCo computes it: on the grey image (OpenCV's BGR2GRAY of the 8-bit frame) with scikit-image's
  default 7x7 uniform window. It is the one SSIM reported.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def l1(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean absolute error per frame, in 0..1 units: ``[F]``."""
    diff = np.abs(generated.astype(np.float64) - target.astype(np.float64)) / 255.0
    return diff.reshape(diff.shape[0], -1).mean(axis=1)


def l1_disco(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """DisCo's "L1" per frame: mean absolute error in 0..255 divided by H*W: ``[F]``."""
    f, h, w = target.shape[:3]
    diff = np.abs(generated.astype(np.float64) - target.astype(np.float64)) / float(h * w)
    return diff.reshape(f, -1).mean(axis=1)


def psnr(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """PSNR per frame in dB on 8-bit values, ``10 log10(255^2 / mse)``; ``inf`` for identical frames: ``[F]``."""
    diff = generated.astype(np.float64) - target.astype(np.float64)
    mse = (diff * diff).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-300)))


def psnr_disco(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """DisCo's PSNR per frame: the squared error wraps around modulo 256 (uint8 arithmetic); 100 when it is 0."""
    if generated.dtype != np.uint8 or target.dtype != np.uint8:
        raise ValueError("the DisCo PSNR is defined on uint8 frames")
    # DisCo reads both frames with cv2.imread (BGR); the channel order does not change the mean.
    wrapped = (generated - target) ** 2  # uint8 arithmetic on purpose: this is the wrap-around being reproduced
    mse = wrapped.reshape(wrapped.shape[0], -1).mean(axis=1, dtype=np.float64)
    return np.array([100.0 if m == 0 else 20.0 * math.log10(255.0 / math.sqrt(m)) for m in mse])


def gray_disco(frames: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[F,H,W,3]`` -> grey uint8 ``[F,H,W]`` exactly as ``cv2.cvtColor(bgr, COLOR_BGR2GRAY)``."""
    import cv2

    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


def ssim(generated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """SSIM per frame (Wang et al. 2004) on grey 8-bit frames, scikit-image's 7x7 uniform window: ``[F]``."""
    from skimage.metrics import structural_similarity

    g, t = gray_disco(generated), gray_disco(target)
    if min(t.shape[1:]) < 7:
        raise ValueError(f"SSIM needs frames of at least 7x7 pixels (its window), got {t.shape[2]}x{t.shape[1]}")
    return np.array([structural_similarity(a, b, data_range=255) for a, b in zip(g, t)])
