"""Clean a pose track: bridge short gaps and remove jitter.

Every keypoint of every person (body, face and both hands) is one track over the frames. A point
is missing where its confidence is 0. Gap filling interpolates across short runs of missing
frames; the One-Euro filter (Casiez, Roussel and Vogel, CHI 2012) then smooths each track with a
cutoff that rises with speed, so slow jitter is removed while fast moves keep little lag.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from tcan_core.pose_format import N_BODY, N_FACE, N_HAND, PoseSequence

log = logging.getLogger(__name__)

DEFAULT_MAX_GAP = 5
DEFAULT_MIN_CUTOFF = 1.0
DEFAULT_BETA = 0.05
DEFAULT_D_CUTOFF = 1.0
DEFAULT_FPS = 30.0

_PER_PERSON = N_BODY + N_FACE + 2 * N_HAND


@dataclass
class SmoothResult:
    """A smoothed clip and what was done to it."""

    poses: PoseSequence
    filled_points: int
    frames_without_person: int


def _pack(seq: PoseSequence) -> np.ndarray:
    """``seq`` -> ``[F, P*130, 3]`` tracks (body, face, left hand, right hand per person)."""
    f, p = seq.body.shape[:2]
    parts = (seq.body, seq.face, seq.hands.reshape(f, p, 2 * N_HAND, 3))
    return np.concatenate(parts, axis=2).reshape(f, p * _PER_PERSON, 3).astype(np.float64)


def _unpack(tracks: np.ndarray, like: PoseSequence) -> PoseSequence:
    """Inverse of :func:`_pack`; ``people[f]`` grows to cover persons that gained points."""
    f, p = like.body.shape[:2]
    per = tracks.reshape(f, p, _PER_PERSON, 3).astype(np.float32)
    body = per[:, :, :N_BODY]
    face = per[:, :, N_BODY:N_BODY + N_FACE]
    hands = per[:, :, N_BODY + N_FACE:].reshape(f, p, 2, N_HAND, 3)
    has_points = (per[..., 2] > 0).any(-1)
    if p == 0:
        return like
    last = np.where(has_points.any(1), p - np.argmax(has_points[:, ::-1], axis=1), 0)
    people = np.maximum(like.people.astype(np.int64), last)
    return PoseSequence(np.ascontiguousarray(body), np.ascontiguousarray(face), np.ascontiguousarray(hands),
                        people, like.width, like.height)


def fill_gaps_array(tracks: np.ndarray, max_gap: int) -> tuple[np.ndarray, int]:
    """Linearly interpolate runs of at most ``max_gap`` missing frames: ``[F,N,3]`` -> (``[F,N,3]``, points filled).

    A run is filled only when the point is seen on both sides of it; leading and trailing runs,
    longer runs and never-seen points stay missing. x, y and confidence are all interpolated.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be 0 or more frames, got {max_gap}")
    out = np.array(tracks, dtype=np.float64, copy=True)
    frames = out.shape[0]
    if frames < 3 or max_gap == 0:
        return out, 0
    seen = out[..., 2] > 0
    idx = np.arange(frames)[:, None]
    prev = np.maximum.accumulate(np.where(seen, idx, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(seen, idx, frames)[::-1], axis=0)[::-1]
    gap = nxt - prev - 1
    fill = ~seen & (prev >= 0) & (nxt < frames) & (gap <= max_gap)
    if not fill.any():
        return out, 0
    f_idx, n_idx = np.nonzero(fill)
    p, q = prev[fill], nxt[fill]
    w = ((f_idx - p) / (q - p))[:, None]
    out[f_idx, n_idx] = out[p, n_idx] * (1 - w) + out[q, n_idx] * w
    return out, int(fill.sum())


def _alpha(cutoff: np.ndarray | float, fps: float) -> np.ndarray | float:
    """Smoothing factor of a first-order low-pass at ``cutoff`` Hz (Casiez et al. 2012, Eq. 4)."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau * fps)


def one_euro_array(tracks: np.ndarray, fps: float = DEFAULT_FPS, min_cutoff: float = DEFAULT_MIN_CUTOFF,
                   beta: float = DEFAULT_BETA, d_cutoff: float = DEFAULT_D_CUTOFF) -> np.ndarray:
    """One-Euro filter over frames of ``[F,N,3]`` (x, y, conf) tracks -> ``[F,N,3]`` (Casiez et al. 2012).

    The cutoff is ``min_cutoff + beta * |dx|`` with ``|dx|`` the filtered 2-D speed in pixels per
    second, one cutoff for both coordinates so a point's direction of motion is not distorted.
    A track restarts where the point reappears after missing frames; confidence is unchanged.
    """
    _check_filter(fps, min_cutoff, beta, d_cutoff)
    out = np.array(tracks, dtype=np.float64, copy=True)
    frames = out.shape[0]
    if frames < 2:
        return out
    seen = out[..., 2] > 0
    a_d = _alpha(d_cutoff, fps)
    x_hat = out[0, :, :2].copy()
    dx_hat = np.zeros_like(x_hat)
    for t in range(1, frames):
        x = out[t, :, :2]
        live = (seen[t] & seen[t - 1])[:, None]
        dx = (x - x_hat) * fps
        dx_new = a_d * dx + (1.0 - a_d) * dx_hat
        cutoff = min_cutoff + beta * np.hypot(dx_new[:, 0], dx_new[:, 1])
        a = _alpha(cutoff, fps)[:, None]
        x_new = a * x + (1.0 - a) * x_hat
        x_hat = np.where(live, x_new, x)
        dx_hat = np.where(live, dx_new, 0.0)
        out[t, :, :2] = np.where(seen[t][:, None], x_hat, x)
    return out


def _check_filter(fps: float, min_cutoff: float, beta: float, d_cutoff: float) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be above 0, got {fps}; use the frame rate of the driving video")
    if not min_cutoff > 0 or not d_cutoff > 0:
        raise ValueError(f"min_cutoff and d_cutoff must be above 0 Hz, got {min_cutoff} and {d_cutoff}; "
                         "lower min_cutoff smooths more")
    if beta < 0:
        raise ValueError(f"beta must be 0 or more, got {beta}; higher beta means less lag on fast moves")


def smooth_poses(seq: PoseSequence, max_gap: int = DEFAULT_MAX_GAP, one_euro: bool = True,
                 min_cutoff: float = DEFAULT_MIN_CUTOFF, beta: float = DEFAULT_BETA,
                 d_cutoff: float = DEFAULT_D_CUTOFF, fps: float = DEFAULT_FPS) -> SmoothResult:
    """Fill gaps of up to ``max_gap`` frames, then (optionally) One-Euro filter every track of ``seq``."""
    if one_euro:
        _check_filter(fps, min_cutoff, beta, d_cutoff)
    if seq.body.shape[1] == 0 or not (_pack(seq)[..., 2] > 0).any():
        raise ValueError(f"the pose has no person in any of its {seq.num_frames} frame(s), so there is nothing "
                         "to smooth; check the driving video and the Pose Extract settings, or connect "
                         "poses that show a person")
    tracks = _pack(seq)
    tracks, filled = fill_gaps_array(tracks, int(max_gap))
    if one_euro:
        tracks = one_euro_array(tracks, fps, min_cutoff, beta, d_cutoff)
    out = _unpack(tracks, seq)
    empty = int(((out.body[..., 2] > 0).sum((1, 2)) == 0).sum()) if out.body.shape[1] else out.num_frames
    log.debug("smoothed %d frames: %d points filled, %d frames without a body", out.num_frames, filled, empty)
    return SmoothResult(out, filled, empty)
