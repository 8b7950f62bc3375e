"""One map of a UNet's attentions, computed once per model and read by every feature that patches attention.

For every diffusers ``Attention`` in a UNet (or a ``MotionAdapter``, a ControlNet's temporal
layers, anything holding ``down_blocks/mid_block/up_blocks``) the map records:

- ``role``: spatial self-attention (``attn1`` of a spatial transformer block), spatial
  cross-attention (``attn2``), temporal (inside ``motion_modules``), or other;
- ``level``: the UNet level it works at (0 is the latent's size). ``down_blocks.i`` runs at level
  i, ``mid_block`` at ``len(down_blocks) - 1`` and ``up_blocks.i`` at ``len(up_blocks) - 1 - i``;
  None outside those blocks;
- the latent size rule (:func:`level_size`): diffusers' SD1.5 UNet halves the latent with a
  stride-2 convolution (kernel 3, padding 1) after every down block but the last, so level k works
  at ``h_k = ceil(h_{k-1} / 2)``, ``w_k = ceil(w_{k-1} / 2)``; the up blocks upsample back to the
  skip sizes;
- ``slot``: for spatial attentions, the index as ``enumerate(unet.attn_processors)`` numbers them
  on a plain ``UNet2DConditionModel`` (down blocks, up blocks, mid block; ``attn1`` before
  ``attn2`` in each transformer block), the numbering of the diffusers, ID-Animator and
  IP-Adapter files; temporal attentions get none.

Reference attention (TCAN), PTM (TCAN), face adapters (ID-Animator, IP-Adapter FaceID) and the
APPA LoRA targets all read this map instead of parsing module names themselves.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch

log = logging.getLogger(__name__)

ROLE_SPATIAL_SELF = "spatial self"
ROLE_SPATIAL_CROSS = "spatial cross"
ROLE_TEMPORAL = "temporal"
ROLE_OTHER = "other"
ROLES = (ROLE_SPATIAL_SELF, ROLE_SPATIAL_CROSS, ROLE_TEMPORAL, ROLE_OTHER)

BLOCK_DOWN, BLOCK_MID, BLOCK_UP = "down", "mid", "up"
# The order of the blocks in ``unet.attn_processors`` of a UNet2DConditionModel.
_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
_TEMPORAL_PART = "motion_modules"


def level_size(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size of UNet level ``level`` for a latent of ``latent_size``: halve with ceil per level."""
    height, width = latent_size
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def chain_size(latent_size: tuple[int, int], count: int) -> tuple[int, int]:
    """The largest size of the halving chain of ``latent_size`` whose area divides ``count`` (1 x 1 at the end).

    For a layer whose level is not known: ``count`` is its tokens per row (area == count) or its
    rows (batch x area). Ambiguous when the batch is a multiple of the area ratio between two
    levels, which is why the map's levels are used whenever there is one.
    """
    size = (int(latent_size[0]), int(latent_size[1]))
    while count % (size[0] * size[1]) != 0:
        size = level_size(size, 1)
    return size


@dataclass(frozen=True)
class AttentionSite:
    """One attention of a model: module path, role, block, UNet level and ``attn_processors`` slot."""

    path: str
    role: str
    block: str | None
    level: int | None
    slot: int | None

    def size(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) this attention works at for a latent of ``latent_size``; ValueError without a level."""
        if self.level is None:
            raise ValueError(f"attention {self.path!r} is outside the down/mid/up blocks, so its size is not known "
                             "from the latent size")
        return level_size(latent_size, self.level)


@dataclass(frozen=True)
class UNetMap:
    """Every attention of one model, in module order (see the module docstring)."""

    sites: tuple[AttentionSite, ...]

    def __iter__(self) -> Iterator[AttentionSite]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def with_role(self, role: str, blocks: tuple[str, ...] | None = None) -> tuple[AttentionSite, ...]:
        """The sites of ``role`` (one of ``ROLES``), optionally only in ``blocks`` (down, mid, up)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return tuple(s for s in self.sites if s.role == role and (blocks is None or s.block in blocks))

    def site(self, path: str) -> AttentionSite:
        """The site at module path ``path``; ValueError naming the model's attentions otherwise."""
        for s in self.sites:
            if s.path == path:
                return s
        raise ValueError(f"no attention at {path!r}; the model has {len(self.sites)} attentions")

    def slots(self, role: str | None = None) -> dict[str, int]:
        """Module path -> ``attn_processors`` slot of the spatial attentions (of ``role`` when given)."""
        return {s.path: s.slot for s in self.sites if s.slot is not None and (role is None or s.role == role)}


def _role(parts: list[str]) -> str:
    if _TEMPORAL_PART in parts:
        return ROLE_TEMPORAL
    if "transformer_blocks" in parts and parts[-1] == "attn1":
        return ROLE_SPATIAL_SELF
    if "transformer_blocks" in parts and parts[-1] == "attn2":
        return ROLE_SPATIAL_CROSS
    return ROLE_OTHER


def _block_and_level(model: torch.nn.Module, parts: list[str]) -> tuple[str | None, int | None]:
    """The block kind and UNet level of the attention at ``parts``, from the innermost down/mid/up block on its path."""
    for at in range(len(parts) - 1, -1, -1):
        name = parts[at]
        if name == "mid_block":
            owner = model.get_submodule(".".join(parts[:at])) if at else model
            return BLOCK_MID, (len(owner.down_blocks) - 1 if hasattr(owner, "down_blocks") else None)
        if name in ("down_blocks", "up_blocks") and at + 1 < len(parts) and parts[at + 1].isdigit():
            index = int(parts[at + 1])
            if name == "down_blocks":
                return BLOCK_DOWN, index
            owner = model.get_submodule(".".join(parts[:at])) if at else model
            return BLOCK_UP, len(owner.up_blocks) - 1 - index
    return None, None


def build_unet_map(model: torch.nn.Module) -> UNetMap:
    """The :class:`UNetMap` of ``model``, computed from its modules (use :func:`unet_map` for the cached one)."""
    from diffusers.models.attention_processor import Attention

    found: list[tuple[str, str, str | None, int | None, tuple[int, int] | None]] = []
    for order, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, Attention):
            continue
        parts = name.split(".")
        role = _role(parts)
        block, level = _block_and_level(model, parts)
        numbered = role in (ROLE_SPATIAL_SELF, ROLE_SPATIAL_CROSS) and parts[0] in _BLOCK_ORDER
        found.append((name, role, block, level, (_BLOCK_ORDER[parts[0]], order) if numbered else None))
    numbered = sorted(key for *_, key in found if key is not None)
    slot_of = {key: i for i, key in enumerate(numbered)}
    sites = tuple(AttentionSite(name, role, block, level, slot_of[key] if key is not None else None)
                  for name, role, block, level, key in found)
    log.debug("mapped %d attentions of %s", len(sites), type(model).__name__)
    return UNetMap(sites)


_MAPS: "weakref.WeakKeyDictionary[torch.nn.Module, UNetMap]" = weakref.WeakKeyDictionary()


def unet_map(model: torch.nn.Module) -> UNetMap:
    """The :class:`UNetMap` of ``model``, computed on first use and kept as long as the model lives."""
    found = _MAPS.get(model)
    if found is None:
        found = build_unet_map(model)
        _MAPS[model] = found
    return found
