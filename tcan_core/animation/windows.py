"""Frame windows for long videos: where the windows go and how their predictions are fused.

TCAN denoises a clip of any length with a model that sees a fixed number of frames at a time
(16), in the manner of MultiDiffusion (Bar-Tal et al., ICML 2023): at every sampling step each
window of frames gets its own noise prediction, and the step's prediction for a frame is fused
by eq. 5, the closed-form least-squares solution ``sum_i W_i * pred_i / sum_i W_i`` over the
windows ``i`` that contain the frame. The weights are uniform (``W_i = 1``), which makes it the
plain average of the windows' predictions, as TCAN does. Neighbouring windows share ``overlap`` frames
so that motion stays continuous across window borders.

Placement (``context_windows``), with ``stride = length - overlap``:

- ``num_frames <= length``: one window of all frames in order, ``[0, 1, ..., num_frames - 1]``,
  open or closed loop (a window holding the whole clip needs no wrap to loop).
- open clip, ``num_frames > length``: windows of ``length`` consecutive frames start at
  ``0, stride, 2 * stride, ...`` while they end before the last frame; one final window is then
  placed at ``num_frames - length`` so that it ends exactly at the last frame. No window is
  short; the final window overlaps its neighbour by at least ``overlap`` frames (by more when the
  clip length is not ``length`` plus a multiple of ``stride``).
- closed loop, ``num_frames > length``: ``ceil(num_frames / stride)`` windows start at
  ``k * stride`` and hold frames ``(start + i) mod num_frames`` for ``i < length``; the last
  windows run past the end and continue at frame 0, so the last frame and the first frame are
  denoised together and the clip loops seamlessly. Cyclically consecutive windows (the last one
  and the first one included) overlap by at least ``overlap`` frames, and no window holds a
  frame twice because ``length < num_frames``.

Fusion (``WindowAccumulator``) keeps one running weighted sum shaped like the full prediction,
``[B, C, F, *spatial]``, one ``[F]`` sum of weights beside it and ``[F]`` coverage flags on the
CPU (so checking coverage needs no device sync), so its memory is flat in the number of windows.
The frame axis is axis 2, as in diffusers' video latents ``[B, C, F, H, W]``; sums are kept in
float32 (float64 for float64 predictions) on the first prediction's device, and the result is
returned in the first prediction's dtype.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 16
DEFAULT_CONTEXT_OVERLAP = 4

FRAME_DIM = 2

WEIGHTING_UNIFORM = "uniform"
WINDOW_WEIGHTINGS = (WEIGHTING_UNIFORM,)


def _as_int(name: str, value: object) -> int:
    """``value`` as a Python int, or a ValueError that names the argument."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None


def _check_window_args(num_frames: object, length: object, overlap: object) -> tuple[int, int, int]:
    """Validate the window arguments and return them as ints."""
    num_frames = _as_int("num_frames", num_frames)
    length = _as_int("context length", length)
    overlap = _as_int("context overlap", overlap)
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}; connect a pose batch with frames in it")
    if length < 1:
        raise ValueError(f"context length must be at least 1 frame, got {length}; TCAN uses {DEFAULT_CONTEXT_LENGTH}")
    if overlap < 0:
        raise ValueError(f"context overlap must be 0 or more frames, got {overlap}; "
                         f"TCAN uses {DEFAULT_CONTEXT_OVERLAP}")
    if overlap >= length:
        raise ValueError(f"context overlap must be smaller than the context length, got overlap {overlap} with "
                         f"length {length}; use an overlap of at most {length - 1}")
    return num_frames, length, overlap


def context_windows(num_frames: int, length: int = DEFAULT_CONTEXT_LENGTH, overlap: int = DEFAULT_CONTEXT_OVERLAP,
                    closed_loop: bool = False) -> list[list[int]]:
    """Frame indices of each MultiDiffusion window over ``num_frames`` frames (placement in the module docstring)."""
    num_frames, length, overlap = _check_window_args(num_frames, length, overlap)
    if num_frames <= length:
        return [list(range(num_frames))]
    stride = length - overlap
    if closed_loop:
        count = math.ceil(num_frames / stride)
        return [[(k * stride + i) % num_frames for i in range(length)] for k in range(count)]
    starts = list(range(0, num_frames - length, stride)) + [num_frames - length]
    return [list(range(start, start + length)) for start in starts]


def window_weights(length: int, weighting: str = WEIGHTING_UNIFORM, *, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-frame fusion weights of one window, ``[length]``: all ones (MultiDiffusion eq. 5 with uniform W)."""
    length = _as_int("window length", length)
    if length < 1:
        raise ValueError(f"window length must be at least 1 frame, got {length}")
    if weighting == WEIGHTING_UNIFORM:
        return torch.ones(length, device=device, dtype=dtype)
    raise ValueError(f"unknown window weighting {weighting!r}; choose one of {', '.join(WINDOW_WEIGHTINGS)}")


class WindowAccumulator:
    """Average window predictions ``[B, C, len, *spatial]`` into ``[B, C, F, *spatial]`` (MultiDiffusion eq. 5)."""

    def __init__(self, num_frames: int, weighting: str = WEIGHTING_UNIFORM) -> None:
        """An empty accumulator for a clip of ``num_frames`` frames; ``weighting`` is one of ``WINDOW_WEIGHTINGS``."""
        num_frames = _as_int("num_frames", num_frames)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        if weighting not in WINDOW_WEIGHTINGS:
            raise ValueError(f"unknown window weighting {weighting!r}; choose one of {', '.join(WINDOW_WEIGHTINGS)}")
        self.num_frames = num_frames
        self.weighting = weighting
        self._sum: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        self._out_dtype: torch.dtype | None = None
        self._covered = torch.zeros(num_frames, dtype=torch.bool)

    def reset(self) -> None:
        """Zero the sums in place for the next sampling step; shape, device and dtype are kept."""
        self._covered.zero_()
        if self._sum is not None:
            self._sum.zero_()
            self._weight.zero_()

    def _frame_list(self, window_indices: Sequence[int] | torch.Tensor, frames: int) -> list[int]:
        """Check ``window_indices`` against a prediction with ``frames`` frames; -> the indices as ints."""
        if isinstance(window_indices, torch.Tensor):
            if window_indices.is_floating_point() or window_indices.is_complex():
                raise ValueError(f"window frame indices must be integers, got a {window_indices.dtype} tensor")
            values = [int(v) for v in window_indices.reshape(-1).tolist()]
        else:
            values = [_as_int("window frame index", v) for v in window_indices]
        if len(values) != frames:
            raise ValueError(f"the window lists {len(values)} frames but its prediction has {frames} on axis "
                             f"{FRAME_DIM}; pass predictions shaped [B, C, frames, ...] with one frame per index")
        bad = [v for v in values if not 0 <= v < self.num_frames]
        if bad:
            raise ValueError(f"window frame indices {bad[:8]} are outside the clip of {self.num_frames} frames; "
                             f"use indices from context_windows({self.num_frames}, ...)")
        if len(set(values)) != len(values):
            raise ValueError(f"a window lists a frame more than once: {values}; each frame may appear once per window")
        return values

    def add(self, window_indices: Sequence[int] | torch.Tensor, prediction: torch.Tensor) -> None:
        """Add one window's prediction ``[B, C, len, *spatial]`` for the ``len`` clip frames ``window_indices``."""
        if not isinstance(prediction, torch.Tensor) or prediction.ndim < 3:
            shape = tuple(prediction.shape) if isinstance(prediction, torch.Tensor) else type(prediction).__name__
            raise ValueError(f"a window prediction must be a tensor [B, C, frames, ...] with the frames on axis "
                             f"{FRAME_DIM}, got {shape}")
        frames = prediction.shape[FRAME_DIM]
        values = self._frame_list(window_indices, frames)
        if self._sum is None:
            acc_dtype = torch.promote_types(prediction.dtype, torch.float32)
            shape = list(prediction.shape)
            shape[FRAME_DIM] = self.num_frames
            self._sum = prediction.new_zeros(shape, dtype=acc_dtype)
            self._weight = prediction.new_zeros(self.num_frames, dtype=acc_dtype)
            self._out_dtype = prediction.dtype
        else:
            expected = list(self._sum.shape)
            expected[FRAME_DIM] = frames
            if list(prediction.shape) != expected:
                raise ValueError(f"window prediction shape {tuple(prediction.shape)} does not match the earlier "
                                 f"windows' {tuple(expected)} (frame axis {FRAME_DIM} may differ); keep batch, "
                                 f"channels and latent size the same for every window")
            if prediction.device != self._sum.device:
                raise ValueError(f"window prediction is on {prediction.device} but the earlier windows were on "
                                 f"{self._sum.device}; run every window on the same device")
        index = torch.tensor(values, dtype=torch.long, device=self._sum.device)
        update = prediction.to(self._sum.dtype)
        self._weight.index_add_(0, index, self._weight.new_ones(frames))
        self._sum.index_add_(FRAME_DIM, index, update)
        self._covered[values] = True

    def result(self) -> torch.Tensor:
        """The fused prediction ``[B, C, F, *spatial]`` in the first prediction's dtype and device."""
        if self._sum is None:
            raise ValueError("no window prediction was added; call add() for every window before result()")
        missing = torch.nonzero(~self._covered).reshape(-1).tolist()
        if missing:
            raise ValueError(f"frames {missing[:8]} (of {len(missing)} uncovered) got no window prediction; add a "
                             f"prediction for every window from context_windows({self.num_frames}, ...)")
        shape = [1] * self._sum.ndim
        shape[FRAME_DIM] = self.num_frames
        return (self._sum / self._weight.view(shape)).to(self._out_dtype)


@dataclass(frozen=True)
class WindowTask:
    """One unit of sampling work: window ``window`` (of ``num_windows``) at step ``step``, over clip ``frames``."""

    step: int
    window: int
    num_windows: int
    frames: tuple[int, ...]

    @property
    def first_in_step(self) -> bool:
        """True for the step's first window: reset the accumulator here."""
        return self.window == 0

    @property
    def last_in_step(self) -> bool:
        """True for the step's last window: take the fused prediction and advance the scheduler here."""
        return self.window == self.num_windows - 1


@dataclass(frozen=True)
class WindowPlan:
    """The windows of a clip over ``num_steps`` sampling steps; ``len(plan)`` = steps x windows for a progress bar."""

    windows: tuple[tuple[int, ...], ...]
    num_steps: int

    def __len__(self) -> int:
        """Total number of window evaluations, steps x windows."""
        return self.num_steps * len(self.windows)

    def __iter__(self) -> Iterator[WindowTask]:
        """Every (step, window) pair, step-major, as ``WindowTask``s."""
        count = len(self.windows)
        for step in range(self.num_steps):
            for number, frames in enumerate(self.windows):
                yield WindowTask(step, number, count, frames)


def iterate_windows(num_frames: int, num_steps: int, length: int = DEFAULT_CONTEXT_LENGTH,
                    overlap: int = DEFAULT_CONTEXT_OVERLAP, closed_loop: bool = False) -> WindowPlan:
    """The ``context_windows`` of a clip repeated for ``num_steps`` steps, with ``len()`` = steps x windows."""
    num_steps = _as_int("num_steps", num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}; TCAN samples 25 DDIM steps")
    windows = context_windows(num_frames, length, overlap, closed_loop)
    log.debug("%d frames -> %d windows of up to %d frames (overlap %d, closed loop %s), %d steps",
              num_frames, len(windows), length, overlap, closed_loop, num_steps)
    return WindowPlan(tuple(tuple(w) for w in windows), num_steps)
