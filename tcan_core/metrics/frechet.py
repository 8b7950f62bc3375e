"""The Frechet distance between two sets of features (FID, Heusel et al. 2017, eq. 6; FID-VID and FVD alike)."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def frechet_distance(a: np.ndarray, b: np.ndarray, what: str = "the set metric") -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between feature sets ``[Na,D]`` and ``[Nb,D]``.

    Covariances are the unbiased sample covariances (``np.cov``). With fewer samples than dimensions
    (the usual case: tens of videos, 400-2048 features) ``Tr((S_a S_b)^(1/2))`` is the nuclear norm of
    ``Xa Xb^T / sqrt((Na-1)(Nb-1))`` (centred features): exact, and small; otherwise scipy's ``sqrtm``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N,D] with the same D, got {list(a.shape)} and {list(b.shape)}")
    for label, x in (("generated", a), ("target", b)):
        if x.shape[0] < 2:
            raise ValueError(
                f"{what} needs at least 2 samples on each side, the {label} side has {x.shape[0]}: a Frechet distance "
                "compares the mean and covariance of two sets, and one sample has no covariance, so the number would "
                "only measure the distance of two points. Give more videos or frames (or more clips: a shorter clip "
                "length or stride), or leave this metric out")
    mu = a.mean(0) - b.mean(0)
    xa, xb = a - a.mean(0), b - b.mean(0)
    na, nb = a.shape[0], b.shape[0]
    tr_a = float((xa * xa).sum() / (na - 1))
    tr_b = float((xb * xb).sum() / (nb - 1))
    if min(na, nb) < a.shape[1]:
        cross = np.linalg.svd(xa @ xb.T / np.sqrt((na - 1) * (nb - 1)), compute_uv=False).sum()
    else:
        from scipy import linalg

        covmean = linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False))
        cross = float(np.trace(covmean.real))
    return float(mu @ mu + tr_a + tr_b - 2.0 * cross)
