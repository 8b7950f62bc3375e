"""TCAN's temporal ControlNet: the frozen pose ControlNet with motion-module layers in down blocks 2 and 3.

TCAN (Kim et al., ECCV 2024) keeps the pose ControlNet frozen and adds temporal transformers to
its down blocks 2 and 3, initialised from the AnimateDiff (Guo et al., ICLR 2024) motion module's
down blocks 2 and 3, so that the pose residuals of a window agree from frame to frame. In SD1.5,
block 2 is a ``CrossAttnDownBlock2D`` (a temporal layer after each (resnet, attention) pair) and
block 3 a ``DownBlock2D`` (one after each resnet) - the places AnimateDiff puts them in the UNet.

:class:`TemporalLayers` holds the layers under the names a ``MotionAdapter`` gives them
(``down_blocks.<i>.motion_modules.<j>.*``), so a motion module's state dict loads into it and
:func:`tcan_core.animation.ptm.install_ptm` finds them at level i. In training-free mode
:meth:`TemporalLayers.from_motion_adapter` shares the adapter's modules instead of copying them.
:func:`temporal_controlnet_installed` hooks them into the ControlNet for one ``with`` block with the
hooks and :class:`~tcan_core.animation.temporal_hooks.MotionState` of :mod:`.temporal_hooks`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator, Mapping

import torch

from ..bases import SD15
from ..models.detect import FIX
from .temporal_hooks import MotionState, check_placement, temporal_hooks_installed, temporal_sites

log = logging.getLogger(__name__)

TCAN_BLOCKS = SD15.controlnet_temporal_blocks


class _MotionBlock(torch.nn.Module):
    """One down block's temporal layers, kept under ``motion_modules`` as in diffusers' ``MotionAdapter``."""

    def __init__(self, motion_modules: torch.nn.ModuleList) -> None:
        super().__init__()
        self.motion_modules = motion_modules


class TemporalLayers(torch.nn.Module):
    """Temporal transformers for some ControlNet down blocks: ``down_blocks[str(i)].motion_modules[j]``."""

    def __init__(self, modules: Mapping[int, torch.nn.ModuleList]) -> None:
        super().__init__()
        self.down_blocks = torch.nn.ModuleDict(
            {str(i): _MotionBlock(layers) for i, layers in sorted(modules.items())})

    @property
    def blocks(self) -> tuple[int, ...]:
        """Indices of the ControlNet down blocks that get temporal layers, ascending."""
        return tuple(int(i) for i in self.down_blocks)

    def motion_modules(self, block: int) -> torch.nn.ModuleList:
        """The temporal transformers of down block ``block``, in the order they run."""
        return self.down_blocks[str(block)].motion_modules

    @classmethod
    def from_motion_adapter(cls, adapter: torch.nn.Module, blocks: Iterable[int] = TCAN_BLOCKS) -> "TemporalLayers":
        """The adapter's down-block motion modules for ``blocks``, shared (same parameters), not copied."""
        if not hasattr(adapter, "down_blocks"):
            raise ValueError(f"expected a diffusers MotionAdapter, got {type(adapter).__name__}; "
                             "load it with the TCAN motion module loader")
        blocks = tuple(blocks)
        count = len(adapter.down_blocks)
        bad = [i for i in blocks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
        if bad or not blocks:
            raise ValueError(f"blocks must be down-block indices of the motion module (0..{count - 1}), got "
                             f"{blocks}; TCAN uses {TCAN_BLOCKS}")
        return cls.from_modules({i: adapter.down_blocks[i].motion_modules for i in blocks})

    @classmethod
    def from_modules(cls, modules: Mapping[int, torch.nn.ModuleList]) -> "TemporalLayers":
        """Temporal layers from ``{down block index: ModuleList of AnimateDiffTransformer3D}``, shared."""
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        if not isinstance(modules, Mapping) or not modules:
            raise ValueError(f"modules must be a non-empty dict {{down block index: ModuleList}}, got {modules!r}")
        checked: dict[int, torch.nn.ModuleList] = {}
        for index, layers in modules.items():
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"down block indices must be whole numbers >= 0, got {index!r}")
            if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
                raise ValueError(f"down block {index} needs a non-empty torch.nn.ModuleList of temporal layers, "
                                 f"got {type(layers).__name__}")
            wrong = [type(layer).__name__ for layer in layers if not isinstance(layer, AnimateDiffTransformer3D)]
            if wrong:
                raise ValueError(f"down block {index} holds {', '.join(wrong)}; temporal layers must be diffusers "
                                 "AnimateDiffTransformer3D modules (from a MotionAdapter)")
            checked[index] = layers
        return cls(checked)


def _controlnet_pairs(controlnet: torch.nn.Module, temporal: TemporalLayers,
                      source: str) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(name, site, temporal transformer) for every temporal layer of ``temporal`` in ``controlnet``."""
    if not isinstance(temporal, TemporalLayers):
        raise ValueError(f"{source}: expected TemporalLayers, got {type(temporal).__name__}; build them with "
                         "TemporalLayers.from_motion_adapter")
    if not (hasattr(controlnet, "down_blocks") and hasattr(controlnet, "config")):
        raise ValueError(f"temporal layers go into a diffusers ControlNetModel, got {type(controlnet).__name__}")
    widths = tuple(int(c) for c in controlnet.config.block_out_channels)
    pairs = []
    for index in temporal.blocks:
        layers = temporal.motion_modules(index)
        if index >= len(controlnet.down_blocks):
            raise ValueError(f"{source}: temporal layers for down block {index}, but the ControlNet has "
                             f"{len(controlnet.down_blocks)} down blocks (widths {widths}); {FIX['controlnet']}")
        layer_widths = sorted({int(layer.in_channels) for layer in layers})
        if layer_widths != [widths[index]]:
            raise ValueError(f"{source}: the temporal layers of down block {index} have width "
                             f"{', '.join(map(str, layer_widths))} but the ControlNet's down block {index} has "
                             f"width {widths[index]} (block widths {widths}); the ControlNet and the motion module "
                             f"must be for the same base: {FIX['controlnet']}, and {FIX['motion']}")
        sites = temporal_sites(controlnet.down_blocks[index])
        if len(sites) != len(layers):
            raise ValueError(f"{source}: the ControlNet's down block {index} has {len(sites)} layers but there are "
                             f"{len(layers)} temporal layers for it; {FIX['controlnet']}, and {FIX['motion']}")
        pairs += [(f"down_blocks.{index}.{name}", site, layer) for (name, site), layer in zip(sites, layers)]
    return pairs


def check_temporal_fits(controlnet: torch.nn.Module, temporal: TemporalLayers, source: str) -> None:
    """Raise a clear ValueError unless ``temporal``'s blocks, widths and layer counts fit ``controlnet``."""
    _controlnet_pairs(controlnet, temporal, source)


@contextlib.contextmanager
def temporal_controlnet_installed(controlnet: torch.nn.Module, temporal: TemporalLayers, state: MotionState,
                                  source: str = "temporal ControlNet layers") -> Iterator[MotionState]:
    """TCAN's temporal layers in ``controlnet`` for the ``with`` block; batch [B*F,...] video-major in and out.

    ``source`` names the layers in errors. The ControlNet is not copied or changed; with
    ``state.num_frames = None`` it runs exactly as the frozen ControlNet.
    """
    pairs = _controlnet_pairs(controlnet, temporal, source)
    check_placement(controlnet, [layer for _, _, layer in pairs], source)
    with temporal_hooks_installed(pairs, state):
        log.debug("%d temporal layers installed in %s", len(pairs), type(controlnet).__name__)
        yield state
