"""TCAN's Pose-driven Temperature Map (PTM) and the temporal-attention processor that applies it.

TCAN (Kim et al., ECCV 2024) holds the background still by flattening temporal attention away
from the person: B is the union over a window's frames of the non-black pixels of the rendered
poses, D the Euclidean distance to B divided by the half-diagonal, and T = tau * D + 1. At each
spatial location of every temporal-attention layer the attention logits are divided by T resized
(nearest) to that layer's h x w. Dividing the logits ``q k^T * scale`` by T is the same as
multiplying the query by 1 / T, so the processor scales the query and keeps the fused
``scaled_dot_product_attention`` kernel: no [rows, heads, frames, frames] logits are materialised.
It also runs the rows (locations) in chunks, so q, k, v and the attention output exist for one
chunk at a time and the layer's peak memory is little more than its input and output.

Wiring: one :class:`PTMState` per model holds the map of the window being sampled;
:func:`install_ptm` puts a :class:`PTMAttnProcessor` reading that state on every temporal
attention (``...motion_modules...attn1/attn2``) of a diffusers ``UNetMotionModel`` or
``MotionAdapter`` and returns the processors it replaced; :func:`restore_processors` puts them
back. :func:`ptm_installed` does both around a ``with`` block.

Which h x w a layer has: the level and size rule of :mod:`tcan_core.attention.unet_map`, from which
:func:`install_ptm` takes each temporal attention's level. A processor made without a level takes
the largest size of that chain whose ``h * w`` divides the rows it receives
(:func:`~tcan_core.attention.unet_map.chain_size`); that
guess is wrong when the batch is a multiple of the area ratio between two levels (a batch of 4 at
level 1 has as many rows as a batch of 1 at level 0), which is why :func:`install_ptm` always
passes the level.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..attention.processor import ComposedAttnProcessor, Contribution
from ..attention.unet_map import ROLE_TEMPORAL, chain_size, level_size, unet_map
from ..images import check_image_batch
from .windows import DEFAULT_CONTEXT_LENGTH, DEFAULT_CONTEXT_OVERLAP, context_windows

log = logging.getLogger(__name__)

DEFAULT_TAU = 3.0
# A pose pixel counts as drawn when any channel exceeds this; rendered poses are drawn on pure
# black, and the margin keeps resampling and compression noise out of B.
BLACK_THRESHOLD = 8.0 / 255.0
# Temporal attention runs its rows in chunks of about this many bytes per [rows, frames, channels]
# slab. At SD1.5's 64 x 64 latent with guidance a whole slab is 168 MiB in float32, and q, k, v,
# the attention output and its projection would hold five of them at once; 32 MiB slabs keep the
# intermediates well under the size of the layer's input and output, with matrix products still
# thousands of rows tall.
DEFAULT_CHUNK_BYTES = 32 * 2**20


def temperature_map(pose_images: torch.Tensor, tau: float = DEFAULT_TAU,
                    threshold: float = BLACK_THRESHOLD) -> torch.Tensor:
    """PTM of one window, TCAN: T = tau * dist(x, B) / sqrt((H/2)^2 + (W/2)^2) + 1; [F,H,W,3] -> [H,W].

    B is the union over frames of pixels with any channel above ``threshold``; the distance is the
    exact Euclidean distance between pixel centres (zero on B, so T = 1 there). When no frame has a
    drawn pixel (B empty) there is no person to measure from and T = 1 everywhere, as it is for
    tau = 0. The result has the device and dtype of ``pose_images``.
    """
    check_image_batch(pose_images, "pose_images", "connect the rendered pose images (Pose Render output)",
                      "[F,H,W,3]")
    if not pose_images.is_floating_point():
        raise ValueError(f"pose_images must be float in 0..1, got dtype {pose_images.dtype}; "
                         "convert with images.float() / 255")
    frames, height, width, _ = pose_images.shape
    if frames == 0 or height == 0 or width == 0:
        raise ValueError(f"pose_images is empty ({frames} frames of {height} x {width}); "
                         "give at least one pose frame")
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau}; TCAN uses 3, and 0 turns PTM off")
    ones = pose_images.new_ones((height, width))
    if tau == 0:
        return ones
    drawn = (pose_images > threshold).any(dim=-1).any(dim=0)
    if not bool(drawn.any()):
        log.info("no pose pixel above %.3f in %d frame(s); temperature map is 1 everywhere", threshold, frames)
        return ones
    # distanceTransform measures, for every non-zero pixel, the distance to the nearest zero one.
    outside = (~drawn).to(device="cpu", dtype=torch.uint8).numpy()
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Distances between pixel centres are square roots of whole numbers; OpenCV's parallel pass
    # leaves run-to-run float noise in them, so snap to the exact value: same input, same map.
    distance = np.sqrt(np.rint(distance.astype(np.float64) ** 2))
    half_diagonal = math.sqrt((height / 2.0) ** 2 + (width / 2.0) ** 2)
    normalised = torch.from_numpy(distance.astype(np.float64) / half_diagonal)
    return (tau * normalised + 1.0).to(device=pose_images.device, dtype=pose_images.dtype)


def window_previews(pose_images: torch.Tensor, tau: float = DEFAULT_TAU, length: int = DEFAULT_CONTEXT_LENGTH,
                    overlap: int = DEFAULT_CONTEXT_OVERLAP) -> torch.Tensor:
    """1 / T of each sampler window of the poses as an IMAGE [windows,H,W,3]: white on the pose, darker where held still."""
    windows = context_windows(pose_images.shape[0], length, overlap)
    maps = torch.stack([temperature_map(pose_images[w].float(), tau).reciprocal() for w in windows])
    return maps[..., None].expand(-1, -1, -1, 3).contiguous()


def resize_temperature(temperature: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of a temperature map to one attention layer, TCAN PTM; [H,W] -> [h,w]."""
    if not isinstance(temperature, torch.Tensor) or temperature.ndim != 2:
        shape = tuple(temperature.shape) if isinstance(temperature, torch.Tensor) else type(temperature).__name__
        raise ValueError(f"temperature must be a map [H,W], got {shape}; pass the output of temperature_map")
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"height and width must be positive integers, got {height} x {width}")
    resized = F.interpolate(temperature[None, None], size=(int(height), int(width)), mode="nearest")
    return resized[0, 0]


class PTMState:
    """The temperature map of the window being sampled, shared by the PTM processors of one model.

    The sampler calls :meth:`set` once per window (and :meth:`clear` after); processors read
    :meth:`inverse_rows`, which resizes the map to each layer's h x w once and caches it.
    """

    def __init__(self) -> None:
        self._temperature: torch.Tensor | None = None
        self._latent_size: tuple[int, int] | None = None
        self._active = False
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def set(self, temperature: torch.Tensor, latent_size: tuple[int, int] | None = None) -> None:
        """Use ``temperature`` [H,W] for the next UNet calls; ``latent_size`` (h0, w0) defaults to its shape."""
        if not isinstance(temperature, torch.Tensor) or temperature.ndim != 2:
            shape = tuple(temperature.shape) if isinstance(temperature, torch.Tensor) else type(temperature).__name__
            raise ValueError(f"temperature must be a map [H,W], got {shape}; pass the output of temperature_map")
        if latent_size is None:
            latent_size = (int(temperature.shape[0]), int(temperature.shape[1]))
        if len(latent_size) != 2 or min(latent_size) < 1:
            raise ValueError(f"latent_size must be (height, width) of the latent, got {latent_size}")
        if not bool(torch.isfinite(temperature).all()) or bool((temperature <= 0).any()):
            raise ValueError(f"temperature must be finite and > 0 everywhere, got values from "
                             f"{temperature.min().item()} to {temperature.max().item()}; build it with temperature_map")
        self._temperature = temperature
        self._latent_size = (int(latent_size[0]), int(latent_size[1]))
        # A map of ones is plain attention: skip the multiply so the output is bit-identical.
        self._active = not bool((temperature == 1).all())
        self._cache.clear()

    def clear(self) -> None:
        """Forget the map: processors reading this state behave as plain attention."""
        self._temperature = None
        self._latent_size = None
        self._active = False
        self._cache.clear()

    @property
    def active(self) -> bool:
        """True when a map other than all ones is set."""
        return self._active

    @property
    def latent_size(self) -> tuple[int, int] | None:
        """(h0, w0) of the latent the map was set for, or None."""
        return self._latent_size

    def layer_size(self, rows: int, level: int | None = None) -> tuple[int, int]:
        """(h, w) of the temporal-attention layer that gets ``rows`` = batch * h * w query rows.

        With ``level`` the size is that level's (see the module docstring); without, the largest
        size of the halving chain whose area divides ``rows``.
        """
        if self._latent_size is None:
            raise ValueError("no temperature map is set; call PTMState.set(temperature, latent_size) first")
        if level is not None:
            height, width = level_size(self._latent_size, level)
            if rows % (height * width) != 0:
                raise ValueError(f"temporal attention at level {level} got {rows} rows, not a multiple of its "
                                 f"{height} x {width} locations for a {self._latent_size[0]} x "
                                 f"{self._latent_size[1]} latent; set the state with the latent size of the "
                                 "window being sampled")
            return height, width
        return chain_size(self._latent_size, rows)

    def inverse_rows(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """1 / T resized to ``height`` x ``width``, flattened row-major (y * w + x); [h*w]."""
        if self._temperature is None:
            raise ValueError("no temperature map is set; call PTMState.set(temperature, latent_size) first")
        key = (height, width, torch.device(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            resized = resize_temperature(self._temperature.float(), height, width)
            cached = resized.reciprocal().reshape(-1).to(device=device, dtype=dtype)
            self._cache[key] = cached
        return cached


class PTMAttnProcessor(ComposedAttnProcessor, Contribution):
    """diffusers ``AttnProcessor2_0`` for temporal attention with logits divided by the PTM, TCAN.

    Receives ``hidden_states`` [B*h*w, F, C] (rows ordered batch, y, x as
    ``AnimateDiffTransformer3D`` lays them out); multiplies the query row of location (y, x) by
    1 / T[y, x] and calls ``scaled_dot_product_attention``. An attention mask, if given, is added
    after the temperature.

    Rows are independent (each is one location's sequence of frames), so they are processed in
    chunks of about ``chunk_bytes`` per [rows, F, C] slab: projections, attention and output
    projection of one chunk are written into the output before the next starts, and the
    intermediates never hold more than a few slabs instead of five copies of the whole input.
    ``chunk_bytes=None`` processes all rows at once. When every row fits one chunk and no map is
    set (or a map of ones), it runs exactly the operations of ``AttnProcessor2_0``; with several
    chunks the projections see fewer rows, which matrix-multiply kernels may round differently
    (float tolerance).

    It is the composed processor of :mod:`tcan_core.attention.processor` with the PTM as its first
    contribution (a query scale and row chunks); other contributions may follow it.
    """

    def __init__(self, state: PTMState, level: int | None = None,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> None:
        if not isinstance(state, PTMState):
            raise ValueError(f"state must be a PTMState, got {type(state).__name__}")
        if level is not None and (int(level) != level or level < 0):
            raise ValueError(f"level must be a UNet level >= 0 or None, got {level}")
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 1):
            raise ValueError(f"chunk_bytes must be a whole number of bytes >= 1, or None for no chunking; "
                             f"got {chunk_bytes!r}")
        super().__init__([self])
        self.state = state
        self.level = level
        self.chunk_bytes = chunk_bytes

    def chunk_rows(self, rows: int, frames: int, channels: int, element_size: int) -> int:
        """Rows per chunk for [rows, frames, channels] slabs of ``element_size`` bytes (at least 1)."""
        if self.chunk_bytes is None:
            return rows
        return max(1, min(rows, self.chunk_bytes // max(1, frames * channels * element_size)))

    def check(self, hidden_states: torch.Tensor) -> None:
        """PTM needs temporal attention's [B*h*w, frames, C]."""
        if hidden_states.ndim != 3:
            raise ValueError(f"PTM applies to temporal attention with hidden states [B*h*w, frames, C], got "
                             f"{tuple(hidden_states.shape)}; install it only on motion-module attentions")

    def query_scale(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """1 / T per row [B*h*w] while a map other than all ones is set, else None (plain attention)."""
        if not self.state.active:
            return None
        return inverse_temperature_per_row(self.state, hidden_states.shape[0], self.level, hidden_states.device,
                                           hidden_states.dtype)


def inverse_temperature_per_row(state: PTMState, rows: int, level: int | None, device: torch.device,
                                dtype: torch.dtype) -> torch.Tensor:
    """1 / T for each of ``rows`` = batch * h * w query rows (batch, y, x order) of one layer; [rows]."""
    height, width = state.layer_size(rows, level)
    return state.inverse_rows(height, width, device, dtype).repeat(rows // (height * width))


def temporal_attention_levels(module: torch.nn.Module) -> dict[str, int | None]:
    """Every temporal attention (``...motion_modules...`` Attention) of ``module`` and its UNet level (the UNet map)."""
    found = {site.path: site.level for site in unet_map(module).with_role(ROLE_TEMPORAL)}
    for name, level in found.items():
        if level is None:
            log.debug("temporal attention %s is outside down/mid/up blocks; its size is inferred from rows", name)
    return found


def install_ptm(module: torch.nn.Module, state: PTMState) -> dict[str, Any]:
    """Put a PTM processor reading ``state`` on every temporal attention of ``module``; return the originals.

    ``module`` is a diffusers ``UNetMotionModel`` or ``MotionAdapter`` (or anything holding their
    ``down_blocks/mid_block/up_blocks.*.motion_modules``). The returned dict maps each attention's
    module path to the processor it had; hand it to :func:`restore_processors`.
    """
    if not isinstance(state, PTMState):
        raise ValueError(f"state must be a PTMState, got {type(state).__name__}")
    levels = temporal_attention_levels(module)
    if not levels:
        raise ValueError(f"{type(module).__name__} has no temporal attention (no 'motion_modules'); PTM needs "
                         "the AnimateDiff motion module: connect TCAN Motion Module before TCAN PTM")
    originals: dict[str, Any] = {}
    for name, level in levels.items():
        attn = module.get_submodule(name)
        originals[name] = attn.processor
        if isinstance(attn.processor, ComposedAttnProcessor):
            attn.processor.contributions.append(PTMAttnProcessor(state, level))
        else:
            attn.set_processor(PTMAttnProcessor(state, level))
    log.debug("PTM installed on %d temporal attentions of %s", len(originals), type(module).__name__)
    return originals


def restore_processors(module: torch.nn.Module, originals: dict[str, Any]) -> None:
    """Put back the processors :func:`install_ptm` returned (the very same objects)."""
    for name, processor in originals.items():
        try:
            attn = module.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{type(module).__name__} has no attention {name!r} to restore; pass the module "
                             "install_ptm was called on") from error
        current = attn.processor
        if current is processor and isinstance(current, ComposedAttnProcessor):
            # PTM was appended to a composed processor already there: take it out again.
            current.contributions = [c for c in current.contributions
                                     if c is current or not isinstance(c, PTMAttnProcessor)]
        else:
            attn.set_processor(processor)


@contextlib.contextmanager
def ptm_installed(module: torch.nn.Module, state: PTMState) -> Iterator[PTMState]:
    """PTM on ``module``'s temporal attention for the ``with`` block, removed after it, also on error."""
    originals = install_ptm(module, state)
    try:
        yield state
    finally:
        restore_processors(module, originals)
