"""TCAN's reference attention with TPC's calibrated extra keys and values, as diffusers attention processors.

TCAN (Kim et al., "TCAN: Animating Human Images with Temporally Consistent Pose Guidance using
Diffusion Models", ECCV 2024) carries the reference image's appearance into every frame: an
appearance UNet runs on the clean reference latent at the denoising timestep and the inputs of
its self-attentions (``attn1`` of each transformer block, i.e. the ``norm1`` output) in the mid
and up blocks are stored; the denoising UNet's ``attn1`` at the same module path then attends over
``[frame tokens ; reference tokens]``: queries from the frame only, keys and values from the
denoising UNet's own ``to_k`` / ``to_v`` applied to the concatenation. Batch rows that leave the
reference out (TCAN: the unconditional half of classifier-free guidance) keep plain
self-attention; which rows those are is an explicit per-row flag, never a batch layout.

TPC (Yoon et al., "TPC: Test-time Procrustes Calibration for Diffusion-based Human Image
Animation", NeurIPS 2024) adds, per driving frame, a calibrated reference (the reference warped by
a similarity transform onto the frame's pose) as extra keys and values. Only queries inside the
driving person's region attend to them, and only at keys inside the warped person mask. That mask
is separable (query_in AND key_in), so no [rows, heads, N, K] mask is built: the processor
computes ``out_base = attn(q, [frame; ref])`` and ``out_cal = attn(q, [frame; ref; cal])`` with a
key-only mask broadcast as [rows, 1, 1, K], and keeps ``out_cal`` at queries inside the person.
A row whose calibrated image has no key inside its mask, or whose query mask is empty at a layer,
gets ``out_base`` there (no empty softmax, no NaN); a row whose query mask covers the whole layer
skips ``out_base``.

Masks at a layer: a mask [H,W] (latent, pixel or any resolution) is area-averaged to the layer's
h x w (``F.interpolate(mode="area")``) and a cell counts as inside when at least half of it is
inside (value >= 0.5), so thin limbs neither vanish nor swell at the 1/8-resolution levels.

Wiring: one :class:`ReferenceBank` per sampling call holds the stored tokens (groups
``"reference"`` and ``"calibrated"``, per layer name) and the read settings. Its mode selects what
every :class:`ReferenceAttnProcessor` does: ``"write"`` inside :meth:`ReferenceBank.writing`
(store the tokens, then plain self-attention), ``"read"`` after :meth:`ReferenceBank.set_read`,
``"off"`` otherwise (exactly diffusers' ``AttnProcessor2_0``). Because the mode lives in the
bank, one processor per ``attn1`` serves both passes when the appearance UNet is the denoising
UNet itself (training-free mode). :func:`reference_attention` installs the processors on the
mid/up ``attn1`` of each UNet for a ``with`` block and restores the original processor objects
after it. A layer's h x w comes from its UNet level (from the UNet map,
:mod:`tcan_core.attention.unet_map`) and the latent size given to :meth:`ReferenceBank.set_read`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..attention import steps as attention
from ..attention.processor import ComposedAttnProcessor, Contribution, contributing
from ..attention.unet_map import BLOCK_MID, BLOCK_UP, ROLE_SPATIAL_SELF, chain_size, level_size, unet_map

log = logging.getLogger(__name__)

GROUP_REFERENCE = "reference"
GROUP_CALIBRATED = "calibrated"
GROUPS = (GROUP_REFERENCE, GROUP_CALIBRATED)

MODE_OFF = "off"
MODE_WRITE = "write"
MODE_READ = "read"

# A layer cell is inside a mask when at least this share of the area it covers is inside.
MASK_THRESHOLD = 0.5


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area-average masks to one layer and threshold at 0.5, TPC masks; [M,H,W] float -> [M,h*w] bool."""
    if not isinstance(masks, torch.Tensor) or masks.ndim != 3:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be [M,H,W], got {shape}")
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"height and width must be positive integers, got {height} x {width}")
    resized = F.interpolate(masks[:, None].float(), size=(int(height), int(width)), mode="area")
    return (resized[:, 0] >= MASK_THRESHOLD).flatten(1)


@dataclass(frozen=True)
class _RowPlan:
    """Which rows get which attention at one layer size; index tensors on the layer's device."""

    plain_rows: torch.Tensor  # long [P]: plain self-attention
    base_rows: torch.Tensor  # long [Rb]: attention over [frame; ref]
    calibrated_rows: torch.Tensor  # long [S]: attention over [frame; ref; cal]
    images: torch.Tensor  # long [U]: the calibrated images those rows use, each once
    image_of_row: torch.Tensor  # long [S]: index into ``images`` per calibrated row
    key_in: torch.Tensor | None  # bool [S, h*w]: calibrated keys inside the warped person mask
    partial: torch.Tensor  # long [Sp]: positions in ``calibrated_rows`` whose query mask is partial
    query_in: torch.Tensor | None  # bool [Sp, h*w]: their queries inside the driving person


class ReferenceBank:
    """Shared state of the reference processors of one sampling call."""

    def __init__(self) -> None:
        self._tokens: dict[str, dict[str, torch.Tensor]] = {group: {} for group in GROUPS}
        self._write_group: str | None = None
        self._latent_size: tuple[int, int] | None = None
        self._use_reference: torch.Tensor | None = None
        self._calibrated_index: torch.Tensor | None = None
        self._query_masks: torch.Tensor | None = None
        self._key_masks: torch.Tensor | None = None
        self._reference_index: torch.Tensor | None = None
        self._any_reference = False
        self._plans: dict[tuple[Any, ...], _RowPlan] = {}

    @property
    def mode(self) -> str:
        """``"write"`` inside :meth:`writing`, else ``"read"`` once :meth:`set_read` was called, else ``"off"``."""
        if self._write_group is not None:
            return MODE_WRITE
        return MODE_READ if self._use_reference is not None else MODE_OFF

    @property
    def write_group(self) -> str | None:
        """The group being written, or None outside :meth:`writing`."""
        return self._write_group

    @property
    def latent_size(self) -> tuple[int, int] | None:
        """(h0, w0) of the denoised latent given to :meth:`set_read`, or None."""
        return self._latent_size

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the layers with stored reference tokens, in the order they were stored."""
        return tuple(self._tokens[GROUP_REFERENCE])

    def stored(self, name: str, group: str = GROUP_REFERENCE) -> torch.Tensor | None:
        """Tokens of layer ``name`` in ``group``, [B,N,C], or None when none are stored."""
        _check_group(group)
        return self._tokens[group].get(name)

    @contextlib.contextmanager
    def writing(self, group: str = GROUP_REFERENCE) -> Iterator[None]:
        """Processors store their inputs [B,N,C] in ``group`` (cleared first) for the ``with`` block."""
        _check_group(group)
        self._tokens[group].clear()
        before = self._write_group
        self._write_group = group
        try:
            yield
        finally:
            self._write_group = before
            stored = self._tokens[group]
            log.debug("stored %s tokens of %d layer(s)", group, len(stored))

    def store(self, name: str, tokens: torch.Tensor) -> None:
        """Keep ``tokens`` [B,N,C] of layer ``name`` in the group being written."""
        if self._write_group is None:
            raise ValueError(f"layer {name!r} tried to store tokens outside ReferenceBank.writing(); run the "
                             "appearance UNet inside `with bank.writing(group):`")
        if tokens.ndim != 3:
            raise ValueError(f"reference tokens of layer {name!r} must be [B,N,C], got {tuple(tokens.shape)}")
        self._tokens[self._write_group][name] = tokens

    def set_read(self, latent_size: tuple[int, int], use_reference: torch.Tensor,
                 calibrated_index: torch.Tensor | None = None, query_masks: torch.Tensor | None = None,
                 key_masks: torch.Tensor | None = None, reference_index: torch.Tensor | None = None) -> None:
        """Read the stored tokens in the next UNet calls: per row of the batch [rows], reference and calibration.

        ``use_reference`` bool [rows] says which rows attend to the reference. ``calibrated_index``
        long [rows] picks each row's calibrated image (-1: none; only rows that use the reference
        may have one). ``query_masks`` [rows,H,W] in 0..1 is the driving person's region of each
        row (None: every query), ``key_masks`` [Nc,H,W] in 0..1 the warped person mask of each
        calibrated image (None: every key); both at any resolution, see the module docstring.
        ``reference_index`` long [rows] picks each row's stored reference when several are stored
        (training: one reference per video of a batch); None: one reference shared by every row, or
        one stored per row.
        """
        if (not isinstance(latent_size, (tuple, list)) or len(latent_size) != 2
                or any(isinstance(v, bool) or int(v) != v or v < 1 for v in latent_size)):
            raise ValueError(f"latent_size must be (height, width) of the denoised latent, got {latent_size}")
        if (not isinstance(use_reference, torch.Tensor) or use_reference.dtype != torch.bool
                or use_reference.ndim != 1 or use_reference.shape[0] == 0):
            raise ValueError(f"use_reference must be a bool tensor [rows] with one flag per row of the UNet batch, "
                             f"got {_describe(use_reference)}")
        rows = use_reference.shape[0]
        use_cpu = use_reference.detach().cpu()
        index_cpu = None
        if calibrated_index is None:
            if query_masks is not None or key_masks is not None:
                raise ValueError("query_masks and key_masks need calibrated_index (which calibrated image each "
                                 "row uses); pass it, or leave the masks out")
        else:
            if (not isinstance(calibrated_index, torch.Tensor) or calibrated_index.dtype.is_floating_point
                    or calibrated_index.dtype.is_complex or calibrated_index.dtype == torch.bool
                    or tuple(calibrated_index.shape) != (rows,)):
                raise ValueError(f"calibrated_index must be an integer tensor [{rows}] (one entry per row, -1 for "
                                 f"none), got {_describe(calibrated_index)}")
            index_cpu = calibrated_index.detach().cpu().long()
            if bool((index_cpu < -1).any()):
                raise ValueError(f"calibrated_index must be -1 (no calibration) or the index of a calibrated image, "
                                 f"got {index_cpu.tolist()}")
            stray = ((index_cpu >= 0) & ~use_cpu).nonzero().flatten().tolist()
            if stray:
                raise ValueError(f"rows {stray} have a calibrated image but do not use the reference "
                                 f"(calibrated_index {index_cpu.tolist()}, use_reference {use_cpu.tolist()}); "
                                 "calibration extends reference attention: set those entries to -1")
            if query_masks is not None:
                query_masks = _check_masks(query_masks, "query_masks", rows, "one driving person mask per row")
            if key_masks is not None:
                key_masks = _check_masks(key_masks, "key_masks", None, "one warped person mask per calibrated image")
            count = key_masks.shape[0] if key_masks is not None else None
            stored = next(iter(self._tokens[GROUP_CALIBRATED].values()), None)
            if count is None and stored is not None:
                count = stored.shape[0]
            if count is not None and int(index_cpu.max()) >= count:
                raise ValueError(f"calibrated_index {index_cpu.tolist()} points past the {count} calibrated images; "
                                 f"use indices 0..{count - 1} or -1")
        if reference_index is not None:
            if (not isinstance(reference_index, torch.Tensor) or reference_index.dtype.is_floating_point
                    or reference_index.dtype == torch.bool or tuple(reference_index.shape) != (rows,)
                    or bool((reference_index < 0).any())):
                raise ValueError(f"reference_index must be an integer tensor [{rows}] of stored reference indices "
                                 f"(>= 0), one per row, got {_describe(reference_index)}")
            reference_index = reference_index.detach().long()
        self._latent_size = (int(latent_size[0]), int(latent_size[1]))
        self._reference_index = reference_index
        self._use_reference = use_cpu
        self._calibrated_index = index_cpu
        self._query_masks = query_masks
        self._key_masks = key_masks
        self._any_reference = bool(use_cpu.any())
        self._plans.clear()

    def clear(self, group: str | None = None) -> None:
        """Forget the stored tokens of ``group`` (all groups when None) and the read settings."""
        if group is None:
            for tokens in self._tokens.values():
                tokens.clear()
        else:
            _check_group(group)
            self._tokens[group].clear()
        self._latent_size = None
        self._use_reference = None
        self._calibrated_index = None
        self._query_masks = None
        self._key_masks = None
        self._reference_index = None
        self._any_reference = False
        self._plans.clear()

    @property
    def reference_index(self) -> torch.Tensor | None:
        """Each row's stored reference (long [rows]) as given to :meth:`set_read`, or None."""
        return self._reference_index

    @property
    def reads_reference(self) -> bool:
        """True in read mode when at least one row uses the reference."""
        return self.mode == MODE_READ and self._any_reference

    @property
    def masked(self) -> bool:
        """True when query or key masks are set (processors then need their layer's h x w)."""
        return self._query_masks is not None or self._key_masks is not None

    def check_rows(self, name: str, rows: int) -> None:
        """Raise unless layer ``name``'s batch of ``rows`` matches the read settings."""
        if self._use_reference is None:
            raise ValueError(f"layer {name!r} reads the reference but no read settings are set; call "
                             "ReferenceBank.set_read first")
        if rows != self._use_reference.shape[0]:
            raise ValueError(f"use_reference has {self._use_reference.shape[0]} entries but layer {name!r} got a "
                             f"batch of {rows} rows; pass one flag per row of the batch given to the UNet")
        if self._query_masks is not None and self._query_masks.shape[0] != rows:
            raise ValueError(f"query_masks has {self._query_masks.shape[0]} masks but layer {name!r} got {rows} rows")

    def check_calibrated(self, name: str, images: int) -> None:
        """Raise unless ``images`` stored calibrated images fit the calibrated index and key masks."""
        if self._calibrated_index is not None and int(self._calibrated_index.max()) >= images:
            raise ValueError(f"calibrated_index {self._calibrated_index.tolist()} points past the {images} "
                             f"calibrated images stored for layer {name!r}; use indices 0..{images - 1} or -1")
        if self._key_masks is not None and self._key_masks.shape[0] != images:
            raise ValueError(f"key_masks has {self._key_masks.shape[0]} masks but {images} calibrated images are "
                             f"stored for layer {name!r}; give one mask per calibrated image")

    def plan(self, size: tuple[int, int] | None, device: torch.device) -> _RowPlan:
        """Row assignment for a layer of ``size`` (h, w) (None when no masks are set), cached per size."""
        key = (size, torch.device(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._make_plan(size, torch.device(device))
            self._plans[key] = plan
        return plan

    def _make_plan(self, size: tuple[int, int] | None, device: torch.device) -> _RowPlan:
        use = self._use_reference
        if use is None:
            raise ValueError("no read settings are set; call ReferenceBank.set_read first")
        index = self._calibrated_index if self._calibrated_index is not None else torch.full_like(use, -1,
                                                                                                 dtype=torch.long)
        active = index >= 0
        query_in = key_in = None
        if self._query_masks is not None:
            query_in = resize_masks(self._query_masks, *size).cpu()
            active &= query_in.any(dim=1)
        if self._key_masks is not None:
            key_in = resize_masks(self._key_masks, *size).cpu()
            active &= key_in[index.clamp(min=0)].any(dim=1)
        full = active & query_in.all(dim=1) if query_in is not None else active
        calibrated_rows = active.nonzero().flatten()
        images, image_of_row = torch.unique(index[calibrated_rows], return_inverse=True)
        partial = (~full[calibrated_rows]).nonzero().flatten()

        def on(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return _RowPlan(
            plain_rows=on((~use).nonzero().flatten()),
            base_rows=on((use & ~full).nonzero().flatten()),
            calibrated_rows=on(calibrated_rows),
            images=on(images),
            image_of_row=on(image_of_row),
            key_in=on(key_in[index[calibrated_rows]]) if key_in is not None else None,
            partial=on(partial),
            query_in=on(query_in[calibrated_rows[partial]]) if query_in is not None else None,
        )


class ReferenceAttnProcessor(ComposedAttnProcessor, Contribution):
    """diffusers ``AttnProcessor2_0`` for ``attn1`` that writes or reads reference tokens, TCAN and TPC.

    Receives ``hidden_states`` [B,N,C]. Bank mode ``"write"``: stores them (after the attention's
    own spatial/group norm, which SD1.5's ``attn1`` does not have) under ``name``, then plain
    self-attention. ``"read"``: rows flagged in ``use_reference`` attend over ``[frame; ref]``
    (plus masked calibrated tokens, see the module docstring), the others plain. ``"off"``: the
    operations of ``AttnProcessor2_0``, bit for bit. It is the composed processor of
    :mod:`tcan_core.attention.processor` with the reference as its first contribution (it observes
    the tokens and replaces the attention of rows that read the reference).
    """

    def __init__(self, bank: ReferenceBank, name: str, level: int | None = None, reads: bool = True) -> None:
        if not isinstance(bank, ReferenceBank):
            raise ValueError(f"bank must be a ReferenceBank, got {type(bank).__name__}")
        if level is not None and (isinstance(level, bool) or int(level) != level or level < 0):
            raise ValueError(f"level must be a UNet level >= 0 or None, got {level}")
        super().__init__([self])
        self.bank = bank
        self.name = name
        self.level = level
        self.reads = bool(reads)

    def observe(self, hidden_states: torch.Tensor) -> None:
        """Write mode: store the tokens [B,N,C] under this layer's name."""
        if self.bank.mode == MODE_WRITE:
            self.bank.store(self.name, hidden_states)

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, row_scale: torch.Tensor | None) -> torch.Tensor | None:
        """Read mode with a row that uses the reference: attention over ``[frame; ref(; cal)]``; else None."""
        if not self.reads or self.bank.mode != MODE_READ or not self.bank.reads_reference:
            return None
        if row_scale is not None:
            raise ValueError(f"layer {self.name!r} reads the reference and another contribution scales its query; "
                             "reference attention does not take a query scale")
        return self._read(attn, query, key, value, mask)

    def layer_size(self, tokens: int) -> tuple[int, int]:
        """(h, w) of this layer for the bank's latent size: its level's, or the chain size with h * w == tokens."""
        latent = self.bank.latent_size
        if latent is None:
            raise ValueError("no latent size is set; call ReferenceBank.set_read first")
        if self.level is not None:
            height, width = level_size(latent, self.level)
            if height * width != tokens:
                raise ValueError(f"layer {self.name!r} at level {self.level} got {tokens} tokens, not the "
                                 f"{height} x {width} of a {latent[0]} x {latent[1]} latent; pass set_read the "
                                 "latent size of the batch being denoised")
            return height, width
        size = chain_size(latent, tokens)
        if size[0] * size[1] != tokens:
            raise ValueError(f"layer {self.name!r} got {tokens} tokens, no level of a {latent[0]} x {latent[1]} "
                             "latent has that many; pass set_read the latent size of the batch being denoised")
        return size

    def _read(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q, k, v [B,N,inner] with reference (and calibrated) keys per row -> [B,N,inner]."""
        bank, name = self.bank, self.name
        rows, tokens, inner_dim = query.shape
        bank.check_rows(name, rows)
        if attention_mask is not None:
            raise ValueError(f"layer {name!r} got an attention mask {tuple(attention_mask.shape)} while reading the "
                             "reference; reference attention supports self-attention without a mask only")
        reference = bank.stored(name, GROUP_REFERENCE)
        if reference is None:
            raise ValueError(f"layer {name!r} has no stored reference tokens ({len(bank.layers)} layers have); "
                             "run the appearance UNet inside `with bank.writing():` before the denoising UNet")
        chosen = bank.reference_index
        if chosen is not None:
            if int(chosen.max()) >= reference.shape[0]:
                raise ValueError(f"layer {name!r} stored {reference.shape[0]} reference(s) but reference_index asks "
                                 f"for index {int(chosen.max())}; run the appearance UNet on every reference the "
                                 "rows name")
        elif reference.shape[0] not in (1, rows):
            raise ValueError(f"layer {name!r} stored reference tokens for a batch of {reference.shape[0]} but the "
                             f"denoising batch has {rows} rows; run the appearance UNet on 1 reference latent (shared "
                             "by all rows) or on one per row, or give set_read a reference_index")
        size = self.layer_size(tokens) if bank.masked else None
        plan = bank.plan(size, query.device)
        reference = reference.to(device=query.device, dtype=query.dtype)
        key_ref, value_ref = attn.to_k(reference), attn.to_v(reference)
        if chosen is not None:
            # Projected once per stored reference, then gathered per row.
            chosen = chosen.to(query.device)
            key_ref, value_ref = key_ref[chosen], value_ref[chosen]

        out = query.new_empty((rows, tokens, inner_dim))
        if plan.plain_rows.numel():
            index = plan.plain_rows
            out[index] = attention.multi_head_attention(attn, query[index], key[index], value[index])
        if plan.base_rows.numel():
            index = plan.base_rows
            out[index] = attention.multi_head_attention(attn, query[index], _with_reference(key, key_ref, index),
                                 _with_reference(value, value_ref, index))
        if plan.calibrated_rows.numel():
            out[plan.calibrated_rows] = self._calibrated(attn, plan, size, query, key, value, key_ref, value_ref, out)
        return out

    def _calibrated(self, attn: Any, plan: _RowPlan, size: tuple[int, int] | None, query: torch.Tensor,
                    key: torch.Tensor, value: torch.Tensor, key_ref: torch.Tensor, value_ref: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """Rows ``plan.calibrated_rows`` attending over [frame; ref; cal] with the TPC masks; -> [S,N,inner].

        ``out`` [B,N,inner] already holds the [frame; ref] result of rows whose query mask is partial.
        """
        name = self.name
        calibrated = self.bank.stored(name, GROUP_CALIBRATED)
        if calibrated is None:
            raise ValueError(f"layer {name!r} has no stored calibrated tokens but calibrated_index asks for them; "
                             "run the appearance UNet on the calibrated latents inside "
                             "`with bank.writing(\"calibrated\"):` before the denoising UNet")
        self.bank.check_calibrated(name, calibrated.shape[0])
        if plan.key_in is not None and calibrated.shape[1] != plan.key_in.shape[1]:
            raise ValueError(f"layer {name!r} stored {calibrated.shape[1]} calibrated tokens per image but its "
                             f"{size[0]} x {size[1]} masks have {plan.key_in.shape[1]}; calibrated images must have "
                             "the latent size of the frames")
        calibrated = calibrated[plan.images].to(device=query.device, dtype=query.dtype)
        key_cal = attn.to_k(calibrated)[plan.image_of_row]
        value_cal = attn.to_v(calibrated)[plan.image_of_row]
        index = plan.calibrated_rows
        keys = torch.cat([_with_reference(key, key_ref, index), key_cal], dim=1)
        values = torch.cat([_with_reference(value, value_ref, index), value_cal], dim=1)
        mask = None
        if plan.key_in is not None:
            # Key-only mask [S,1,1,K]: it broadcasts over heads and queries, nothing dense is built.
            visible = plan.key_in.new_ones((index.shape[0], keys.shape[1] - key_cal.shape[1]))
            mask = torch.cat([visible, plan.key_in], dim=1)[:, None, None, :]
        result = attention.multi_head_attention(attn, query[index], keys, values, mask)
        if plan.partial.numel():
            part = plan.partial
            # Out of place: the attention saved ``result`` for its backward pass (training).
            mixed = torch.where(plan.query_in[:, :, None], result[part], out[index[part]])
            result = result.index_copy(0, part, mixed)
        return result


def _with_reference(frame: torch.Tensor, reference: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``frame`` [B,N,D], then their reference tokens ([1,M,D] shared or [B,M,D]); -> [R,N+M,D]."""
    reference = reference.expand(index.shape[0], -1, -1) if reference.shape[0] == 1 else reference[index]
    return torch.cat([frame[index], reference], dim=1)


def reference_layers(unet: torch.nn.Module) -> dict[str, int]:
    """The ``attn1`` module paths in the mid block and up blocks of an SD1.5 UNet -> their UNet level."""
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise ValueError(f"{type(unet).__name__} is not a diffusers SD1.5 UNet (no down_blocks / up_blocks); pass "
                         "a UNet2DConditionModel or UNetMotionModel")
    found = {site.path: site.level for site in unet_map(unet).with_role(ROLE_SPATIAL_SELF, (BLOCK_MID, BLOCK_UP))
             if site.path.split(".")[0] in ("mid_block", "up_blocks")}
    if not found:
        raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) in its mid or up blocks; reference "
                         "attention needs an SD1.5 UNet with transformer blocks")
    return found


@contextlib.contextmanager
def reference_attention(bank: ReferenceBank, *unets: torch.nn.Module) -> Iterator[ReferenceBank]:
    """Reference processors on the mid/up ``attn1`` of each UNet for the ``with`` block; originals restored after.

    Pass the denoising UNet first, then the appearance UNet; when they are the same object
    (training-free mode) it is installed once and its processors both write and read, as the bank's
    mode says. A distinct appearance UNet only writes: in read mode it runs plain self-attention,
    which is what it ran while writing, so a gradient-checkpointed appearance UNet recomputes the
    same values during the backward pass of training.
    """
    if not isinstance(bank, ReferenceBank):
        raise ValueError(f"bank must be a ReferenceBank, got {type(bank).__name__}")
    if not unets:
        raise ValueError("reference_attention needs at least one UNet; pass the denoising and appearance UNets")
    distinct: list[torch.nn.Module] = []
    for unet in unets:
        if not any(unet is seen for seen in distinct):
            distinct.append(unet)
    layers = [(unet, reference_layers(unet)) for unet in distinct]
    with contextlib.ExitStack() as stack:
        for unet, levels in layers:
            reads = unet is distinct[0]
            contributions = {name: ReferenceAttnProcessor(bank, name, level, reads) for name, level in levels.items()}
            # A processor already composed on an attn1 gets the reference appended; any other is replaced
            # by the reference processor itself (the contribution is its own processor).
            stack.enter_context(contributing(unet, contributions, lambda contribution: contribution))
            log.debug("reference attention on %d attn1 of %s", len(contributions), type(unet).__name__)
        yield bank


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_masks(masks: object, what: str, count: int | None, meaning: str) -> torch.Tensor:
    """``masks`` as float [M,H,W] in 0..1 (bool accepted), or a ValueError naming ``what``."""
    if (not isinstance(masks, torch.Tensor) or masks.ndim != 3 or min(masks.shape) == 0
            or (count is not None and masks.shape[0] != count)
            or not (masks.dtype.is_floating_point or masks.dtype == torch.bool)):
        expected = f"[{count},H,W]" if count is not None else "[Nc,H,W]"
        raise ValueError(f"{what} must be a float tensor {expected} in 0..1 ({meaning}), got {_describe(masks)}")
    masks = masks.detach().float()
    if not bool(torch.isfinite(masks).all()) or bool((masks < 0).any()) or bool((masks > 1).any()):
        raise ValueError(f"{what} must hold values in 0..1, got values from {masks.min().item()} to "
                         f"{masks.max().item()}")
    return masks
