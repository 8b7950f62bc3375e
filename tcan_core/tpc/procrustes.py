"""Weighted least-squares similarity transforms between keypoint sets (TPC's Procrustes step).

All functions are batched over frames: points are ``[F,N,2]`` and weights ``[F,N]``, and a
transform is a ``[F,2,3]`` matrix ``[s*R | t]`` that maps a source point ``p`` to ``s*R@p + t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Points whose weighted RMS distance from their centroid is below this many pixels define no
# scale or rotation (all at one spot), so such a frame counts as having no usable points.
MIN_SPREAD_PX = 0.5


@dataclass
class SimilarityFit:
    """A batch of fitted similarity transforms and what happened while fitting them.

    ``matrix`` ``[F,2,3]`` (float64), ``scale`` ``[F]``, ``angle`` ``[F]`` (radians from +x
    towards +y; in image axes, with y pointing down, a positive angle turns clockwise on screen),
    ``valid`` ``[F]`` (enough usable points to fit), ``clamped`` ``[F]`` (scale was moved into
    the allowed range), ``points`` ``[F]`` (number of points with weight > 0).
    """

    matrix: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    valid: np.ndarray
    clamped: np.ndarray
    points: np.ndarray


def fit_similarity(
    src: np.ndarray,
    dst: np.ndarray,
    weights: np.ndarray,
    allow_rotation: bool = True,
    scale_range: tuple[float, float] | None = None,
) -> SimilarityFit:
    """Weighted similarity ``dst ~ s*R@src + t`` per frame, src/dst ``[F,N,2]``, weights ``[F,N]``.

    Umeyama (1991), eqs. 38-42, with per-point weights: the rotation comes from the SVD of the
    weighted cross-covariance, with the last singular direction's sign flipped when the
    determinant is negative so a mirrored point set never yields a reflection. Without rotation,
    ``R = I`` and ``s`` is the least-squares scale about the centroids. A scale outside
    ``scale_range`` is clamped (and flagged) and the translation recomputed so the weighted
    centroids still coincide. Frames with fewer than two weighted points, or whose points sit at
    one spot, get ``valid = False`` and the identity matrix.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    w = np.clip(np.asarray(weights, np.float64), 0.0, None)
    if src.ndim != 3 or src.shape[-1] != 2 or src.shape != dst.shape or w.shape != src.shape[:2]:
        raise ValueError(f"fit_similarity needs src and dst [F,N,2] and weights [F,N], got "
                         f"{src.shape}, {dst.shape} and {w.shape}")
    if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale range must satisfy 0 < min <= max, got {scale_range}")

    count = (w > 0).sum(axis=1)
    total = w.sum(axis=1)
    safe_total = np.where(total > 0, total, 1.0)
    wn = w / safe_total[:, None]
    mu_s = np.einsum("fn,fnc->fc", wn, src)
    mu_d = np.einsum("fn,fnc->fc", wn, dst)
    xs = src - mu_s[:, None]
    xd = dst - mu_d[:, None]
    var_s = np.einsum("fn,fnc->f", wn, xs * xs)
    var_d = np.einsum("fn,fnc->f", wn, xd * xd)
    valid = (count >= 2) & (var_s >= MIN_SPREAD_PX**2) & (var_d >= MIN_SPREAD_PX**2)
    safe_var = np.where(valid, var_s, 1.0)

    if allow_rotation:
        cov = np.einsum("fn,fni,fnj->fij", wn, xd, xs)
        u, sing, vt = np.linalg.svd(cov)
        flip = np.sign(np.linalg.det(u) * np.linalg.det(vt))
        d = np.stack([np.ones_like(flip), flip], axis=-1)
        rot = np.einsum("fij,fj,fjk->fik", u, d, vt)
        scale = (sing * d).sum(axis=-1) / safe_var
    else:
        rot = np.broadcast_to(np.eye(2), (src.shape[0], 2, 2)).copy()
        scale = np.einsum("fn,fnc->f", wn, xs * xd) / safe_var

    clamped = np.zeros_like(valid)
    if scale_range is not None:
        limited = np.clip(scale, scale_range[0], scale_range[1])
        clamped = valid & (limited != scale)
        scale = limited

    rot = np.where(valid[:, None, None], rot, np.eye(2))
    scale = np.where(valid, scale, 1.0)
    lin = scale[:, None, None] * rot
    trans = np.where(valid[:, None], mu_d - np.einsum("fij,fj->fi", lin, mu_s), 0.0)
    matrix = np.concatenate([lin, trans[:, :, None]], axis=-1)
    angle = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
    return SimilarityFit(matrix=matrix, scale=scale, angle=angle, valid=valid,
                         clamped=clamped, points=count)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points ``[...,N,2]`` through affine matrices ``[...,2,3]``."""
    matrix = np.asarray(matrix, np.float64)
    points = np.asarray(points, np.float64)
    return np.einsum("...ij,...nj->...ni", matrix[..., :2], points) + matrix[..., None, :, 2]
