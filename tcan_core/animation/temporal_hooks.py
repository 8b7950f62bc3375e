"""AnimateDiff motion modules run inside a shared diffusers 2D UNet for one call, through forward hooks.

AnimateDiff (Guo et al., ICLR 2024) animates an SD1.5 UNet by inserting a temporal transformer
after its spatial layers; TCAN (Kim et al., ECCV 2024) uses that motion module for its denoising
UNet, and in training-free mode the very same 2D UNet weights also serve as its appearance UNet,
which runs on one reference latent without temporal layers. ``UNetMotionModel.from_unet2d`` would
copy every weight into a second model, so instead :func:`motion_installed` registers one forward
hook per temporal layer on the 2D UNet for the ``with`` block and removes them in ``finally``.

Where the hooks sit is where diffusers' ``UNetMotionModel`` runs its motion modules, so the result
matches it to float tolerance:

- ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D``: after each ``attentions[j]`` (which follows
  ``resnets[j]``), i.e. after each (resnet, attention) pair;
- ``DownBlock2D`` / ``UpBlock2D``: after each ``resnets[j]``;
- ``UNetMidBlock2DCrossAttn`` (only when the adapter has a mid block, AnimateDiff v2): after each
  ``attentions[j]``, before the resnet that follows it.

Hooks read a shared :class:`MotionState`. ``num_frames=None`` leaves every output untouched (the
appearance pass gives bit-identical results to the plain UNet); otherwise the batch is
``videos * num_frames`` latents, video-major (all frames of video 0, then of video 1), the layout
``UNetMotionModel`` gets from flattening ``[B,C,F,H,W]`` to ``[B*F,C,H,W]``. The temporal
ControlNet (:mod:`.controlnet_t`) installs its layers with the same hooks and state.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch

from ..bases import base_by_block_widths
from ..models.detect import FIX

log = logging.getLogger(__name__)


class MotionState:
    """Frames per video for the temporal layers of one model call; None skips them (appearance pass).

    ``checkpoint`` (training with gradient checkpointing) recomputes each temporal layer in the
    backward pass instead of keeping its activations: diffusers' own checkpointing does not reach
    layers run from forward hooks.
    """

    def __init__(self, num_frames: int | None = None, checkpoint: bool = False) -> None:
        self.num_frames = num_frames
        self.checkpoint = bool(checkpoint)

    @property
    def num_frames(self) -> int | None:
        """Frames per video in the batch (batch = videos * num_frames, video-major), or None."""
        return self._num_frames

    @num_frames.setter
    def num_frames(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"num_frames must be a whole number >= 1, or None to skip the temporal layers; "
                             f"got {value!r}")
        self._num_frames = value

    def __repr__(self) -> str:
        return f"MotionState(num_frames={self._num_frames})"


def positional_limit(motion_module: torch.nn.Module) -> int | None:
    """Most frames a temporal transformer's sinusoidal positional encoding covers (v1: 24, v2/v3: 32), or None."""
    limits = [int(block.pos_embed.pe.shape[1]) for block in getattr(motion_module, "transformer_blocks", ())
              if getattr(block, "pos_embed", None) is not None and hasattr(block.pos_embed, "pe")]
    return min(limits) if limits else None


def frames_per_video(state: MotionState, batch: int, limit: int | None) -> int:
    """``state.num_frames`` checked against a batch of ``batch`` latents and a positional limit."""
    frames = state.num_frames
    if frames is None:
        raise ValueError("the temporal layers are switched off (num_frames is None); set MotionState.num_frames")
    if batch % frames != 0:
        raise ValueError(f"a batch of {batch} latents is not a whole number of videos of num_frames={frames} "
                         f"frames; pass every frame of each window (batch = videos x {frames}, video-major) or "
                         f"set num_frames to the frames per video")
    if limit is not None and frames > limit:
        raise ValueError(f"the motion module's positional encoding covers at most {limit} frames, got {frames} "
                         f"frames per video; set the context length to {limit} or less (TCAN uses 16)")
    return frames


def temporal_sites(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) in a diffusers 2D down/mid/up block after whose output AnimateDiff runs a temporal layer."""
    from diffusers.models.unets.unet_2d_blocks import (
        CrossAttnDownBlock2D,
        CrossAttnUpBlock2D,
        DownBlock2D,
        UNetMidBlock2DCrossAttn,
        UpBlock2D,
    )

    if isinstance(block, (CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn)):
        return [(f"attentions.{j}", module) for j, module in enumerate(block.attentions)]
    if isinstance(block, (DownBlock2D, UpBlock2D)):
        return [(f"resnets.{j}", module) for j, module in enumerate(block.resnets)]
    raise ValueError(f"temporal layers go into SD1.5-style blocks (CrossAttnDownBlock2D, DownBlock2D, "
                     f"UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D), got {type(block).__name__}; "
                     "use an SD1.5 UNet or ControlNet")


class _TemporalHook:
    """Forward hook running one temporal transformer on the output of the module it is registered on."""

    def __init__(self, motion_module: torch.nn.Module, state: MotionState) -> None:
        self.motion_module = motion_module
        self.state = state
        self.limit = positional_limit(motion_module)

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        """Resnet output [B*F,C,h,w], or a Transformer2DModel output holding it -> the same with motion applied."""
        if self.state.num_frames is None:
            return None
        if isinstance(output, torch.Tensor):
            return self._apply(output)
        if isinstance(output, tuple):
            return (self._apply(output[0]),) + tuple(output[1:])
        output.sample = self._apply(output.sample)
        return output

    def _apply(self, hidden_states: torch.Tensor) -> torch.Tensor:
        frames = frames_per_video(self.state, hidden_states.shape[0], self.limit)
        if self.state.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.motion_module, hidden_states, num_frames=frames, use_reentrant=False)
        return self.motion_module(hidden_states, num_frames=frames)


def _autocast_on(device_type: str) -> bool:
    """Autocast is on for ``device_type`` (torch 2.4+ takes the type; older torch has one flag per device)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def check_placement(model: torch.nn.Module, modules: Sequence[torch.nn.Module], source: str) -> None:
    """Temporal layers must live on the model's device and, unless autocast is on, in its dtype before a call.

    Under autocast (mixed-precision training: trained layers in float32, frozen ones in half
    precision) the operations choose their own dtype, so only the device must agree.
    """
    reference = next(model.parameters(), None)
    layer = next((p for m in modules for p in m.parameters()), None)
    if reference is None or layer is None:
        return
    dtype_differs = layer.dtype != reference.dtype and not _autocast_on(reference.device.type)
    if layer.device != reference.device or dtype_differs:
        raise ValueError(f"{source} is on {layer.device} in {layer.dtype} but {type(model).__name__} is on "
                         f"{reference.device} in {reference.dtype}; move it with .to(device, dtype) first")


@contextlib.contextmanager
def temporal_hooks_installed(pairs: Sequence[tuple[str, torch.nn.Module, torch.nn.Module]],
                             state: MotionState) -> Iterator[MotionState]:
    """Hook each (name, site, temporal transformer) for the ``with`` block; removed after it, also on error."""
    if not isinstance(state, MotionState):
        raise ValueError(f"state must be a MotionState, got {type(state).__name__}")
    for name, site, _ in pairs:
        if any(isinstance(hook, _TemporalHook) for hook in site._forward_hooks.values()):
            raise ValueError(f"{name} already has a temporal layer installed; temporal layers are installed once "
                             "per model: leave the first with-block before entering another")
    handles = []
    try:
        for _, site, motion_module in pairs:
            handles.append(site.register_forward_hook(_TemporalHook(motion_module, state)))
        yield state
    finally:
        for handle in handles:
            handle.remove()


def _widths(model: torch.nn.Module) -> tuple[int, ...]:
    return tuple(int(c) for c in model.config.block_out_channels)


def _adapter_widths(adapter: torch.nn.Module) -> tuple[int, ...]:
    return tuple(int(block.motion_modules[0].in_channels) if len(block.motion_modules) else 0
                 for block in adapter.down_blocks)


def _unet_pairs(unet: torch.nn.Module, adapter: torch.nn.Module,
                source: str) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(name, site, temporal transformer) for every place the adapter's motion modules run in ``unet``."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks", "mid_block", "config")):
        raise ValueError(f"motion modules go into a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    if not (hasattr(adapter, "down_blocks") and hasattr(adapter, "up_blocks")):
        raise ValueError(f"{source}: expected a diffusers MotionAdapter, got {type(adapter).__name__}; "
                         "load it with the TCAN motion module loader")
    unet_widths, adapter_widths = _widths(unet), _adapter_widths(adapter)
    if unet_widths != adapter_widths or len(adapter.up_blocks) != len(unet.up_blocks):
        advice = (FIX["motion"] if len(unet_widths) == 4
                  else f"choose a motion module made for the UNet's base (block widths {unet_widths})")
        raise ValueError(f"{source}: the motion module has block widths {adapter_widths} ({base_by_block_widths(adapter_widths)} "
                         f"motion module) but the UNet has {unet_widths} ({base_by_block_widths(unet_widths)} UNet); {advice}")
    pairs = []
    groups = [(f"down_blocks.{i}", block, adapter.down_blocks[i]) for i, block in enumerate(unet.down_blocks)]
    if getattr(adapter, "mid_block", None) is not None:
        groups.append(("mid_block", unet.mid_block, adapter.mid_block))
    groups += [(f"up_blocks.{i}", block, adapter.up_blocks[i]) for i, block in enumerate(unet.up_blocks)]
    for name, block, motion in groups:
        if block is None:
            raise ValueError(f"{source}: the motion module has a mid block but the UNet has none; "
                             f"{FIX['motion']}")
        sites = temporal_sites(block)
        if len(sites) != len(motion.motion_modules):
            raise ValueError(f"{source}: the UNet's {name} has {len(sites)} layers but the motion module has "
                             f"{len(motion.motion_modules)} temporal layers for it; the motion module was made for "
                             f"another layer count: {FIX['motion']}")
        pairs += [(f"{name}.{site_name}", site, module)
                  for (site_name, site), module in zip(sites, motion.motion_modules)]
    return pairs


def check_motion_fits(unet: torch.nn.Module, adapter: torch.nn.Module, source: str) -> None:
    """Raise a clear ValueError unless ``adapter``'s blocks (count, widths, layers) fit ``unet``."""
    _unet_pairs(unet, adapter, source)


@contextlib.contextmanager
def motion_installed(unet: torch.nn.Module, adapter: torch.nn.Module, state: MotionState,
                     source: str = "motion module") -> Iterator[MotionState]:
    """AnimateDiff's temporal layers from ``adapter`` in ``unet`` for the ``with`` block; [B*F,C,H,W] in and out.

    ``source`` names the adapter in errors (a file name, say). The UNet and adapter are not
    copied or changed; with ``state.num_frames = None`` the UNet runs exactly as without them.
    """
    pairs = _unet_pairs(unet, adapter, source)
    check_placement(unet, [module for _, _, module in pairs], source)
    with temporal_hooks_installed(pairs, state):
        log.debug("%d temporal layers of %s installed in %s", len(pairs), source, type(unet).__name__)
        yield state
