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

Which h x w a layer has: diffusers' SD1.5 UNet halves the latent with a stride-2 convolution
(kernel 3, padding 1) after every down block but the last, so level k works at
``h_k = ceil(h_{k-1} / 2)``, ``w_k = ceil(w_{k-1} / 2)`` (``h_0 x w_0`` is the latent), and the up
blocks upsample back to the skip sizes. ``down_blocks.i`` runs at level i, ``mid_block`` at level
``len(down_blocks) - 1`` and ``up_blocks.i`` at level ``len(up_blocks) - 1 - i``;
:func:`install_ptm` reads the level from each attention's module path. A processor made without a
level takes the largest size of that chain whose ``h * w`` divides the rows it receives; that
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

from . import attention
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
    if not isinstance(pose_images, torch.Tensor) or pose_images.ndim != 4 or pose_images.shape[-1] != 3:
        shape = tuple(pose_images.shape) if isinstance(pose_images, torch.Tensor) else type(pose_images).__name__
        raise ValueError(f"pose_images must be an IMAGE batch [F,H,W,3], got {shape}; "
                         "connect the rendered pose images (Pose Render output)")
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


def level_size(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size of UNet level ``level`` for a latent of ``latent_size``: halve with ceil per level."""
    height, width = latent_size
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


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
        size = self._latent_size
        while True:
            if rows % (size[0] * size[1]) == 0:
                return size
            if size == (1, 1):
                raise ValueError(f"{rows} rows cannot be split into locations of a {self._latent_size[0]} x "
                                 f"{self._latent_size[1]} latent")
            size = level_size(size, 1)

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


class PTMAttnProcessor:
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
        self.state = state
        self.level = level
        self.chunk_bytes = chunk_bytes

    def chunk_rows(self, rows: int, frames: int, channels: int, element_size: int) -> int:
        """Rows per chunk for [rows, frames, channels] slabs of ``element_size`` bytes (at least 1)."""
        if self.chunk_bytes is None:
            return rows
        return max(1, min(rows, self.chunk_bytes // max(1, frames * channels * element_size)))

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        """[B*h*w, F, C] -> [B*h*w, F, C]: temporal attention with softmax(q k^T * scale / T) v."""
        if hidden_states.ndim != 3:
            raise ValueError(f"PTM applies to temporal attention with hidden states [B*h*w, frames, C], got "
                             f"{tuple(hidden_states.shape)}; install it only on motion-module attentions")
        prepared = attention.begin(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        hidden_states, residual, attention_mask = prepared.hidden_states, prepared.residual, prepared.attention_mask
        rows, frames, channels = hidden_states.shape
        inverse = None
        if self.state.active:
            inverse = inverse_temperature_per_row(self.state, rows, self.level, hidden_states.device,
                                                  hidden_states.dtype)

        width = max(channels, int(getattr(attn, "inner_dim", channels)))
        chunk = self.chunk_rows(rows, frames, width, hidden_states.element_size())
        if chunk >= rows:
            return self._attend(attn, hidden_states, residual, encoder_hidden_states, attention_mask, inverse)
        out = None
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            result = self._attend(
                attn, hidden_states[part], residual[part],
                None if encoder_hidden_states is None else encoder_hidden_states[part],
                None if attention_mask is None else attention_mask[part],
                None if inverse is None else inverse[part])
            if out is None:
                out = result.new_empty((rows, *result.shape[1:]))
            out[part] = result
            del result
        return out

    @staticmethod
    def _attend(attn: Any, hidden_states: torch.Tensor, residual: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                inverse: torch.Tensor | None) -> torch.Tensor:
        """``AttnProcessor2_0`` on rows [R, F, C] with the query of row r scaled by ``inverse[r]`` -> [R, F, C]."""
        query, key, value = attention.project(attn, hidden_states, encoder_hidden_states)
        hidden_states = attention.multi_head_attention(attn, query, key, value, attention_mask, row_scale=inverse)
        # Free q, k, v before the output projection: they are most of the peak.
        del query, key, value
        return attention.finish(attn, hidden_states, residual)


def inverse_temperature_per_row(state: PTMState, rows: int, level: int | None, device: torch.device,
                                dtype: torch.dtype) -> torch.Tensor:
    """1 / T for each of ``rows`` = batch * h * w query rows (batch, y, x order) of one layer; [rows]."""
    height, width = state.layer_size(rows, level)
    return state.inverse_rows(height, width, device, dtype).repeat(rows // (height * width))


def scale_query_by_temperature_(query: torch.Tensor, state: PTMState, level: int | None = None) -> torch.Tensor:
    """Multiply query row (b, y, x) by 1 / T[y, x] in place, TCAN PTM; [B*h*w, heads, F, d] -> same tensor."""
    inverse = inverse_temperature_per_row(state, query.shape[0], level, query.device, query.dtype)
    return query.mul_(inverse.view(-1, 1, 1, 1))


def temporal_attention_levels(module: torch.nn.Module) -> dict[str, int | None]:
    """Every temporal attention (``...motion_modules...`` Attention) of ``module`` and its UNet level."""
    from diffusers.models.attention_processor import Attention

    found: dict[str, int | None] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, Attention) or "motion_modules" not in name.split("."):
            continue
        found[name] = _level_from_path(module, name)
        if found[name] is None:
            log.debug("temporal attention %s is outside down/mid/up blocks; its size is inferred from rows", name)
    return found


def _level_from_path(module: torch.nn.Module, name: str) -> int | None:
    parts = name.split(".")
    at = parts.index("motion_modules")
    if at >= 1 and parts[at - 1] == "mid_block":
        owner = module.get_submodule(".".join(parts[: at - 1]))
        return len(owner.down_blocks) - 1 if hasattr(owner, "down_blocks") else None
    if at >= 2 and parts[at - 1].isdigit() and parts[at - 2] in ("down_blocks", "up_blocks"):
        index = int(parts[at - 1])
        if parts[at - 2] == "down_blocks":
            return index
        owner = module.get_submodule(".".join(parts[: at - 2]))
        return len(owner.up_blocks) - 1 - index
    return None


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
    processors: dict[int | None, PTMAttnProcessor] = {}
    originals: dict[str, Any] = {}
    for name, level in levels.items():
        attn = module.get_submodule(name)
        originals[name] = attn.processor
        processor = processors.setdefault(level, PTMAttnProcessor(state, level))
        attn.set_processor(processor)
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
        attn.set_processor(processor)


@contextlib.contextmanager
def ptm_installed(module: torch.nn.Module, state: PTMState) -> Iterator[PTMState]:
    """PTM on ``module``'s temporal attention for the ``with`` block, removed after it, also on error."""
    originals = install_ptm(module, state)
    try:
        yield state
    finally:
        restore_processors(module, originals)
