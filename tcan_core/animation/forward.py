"""One window's guided noise prediction: the forward the sampler runs under ``no_grad`` and a trainer with gradients.

TCAN (Kim et al., ECCV 2024), per window of frames at one timestep: the ControlNet once per
window (its residuals serve both halves of guidance), the calibrated references of the window through the
appearance UNet (TPC), the denoising UNet on ``[uncond ; cond]`` with the reference left out of the
unconditional half, and classifier-free guidance. :func:`window_forward` takes one typed
:class:`WindowInput`; patches take part only through :class:`ForwardHook` points, so this module
names no patch kind:

- :meth:`ForwardHook.prepare_window`: data for a window, computed once from its pose images and
  kept on the CPU (PTM: the temperature map);
- :meth:`ForwardHook.residuals`: ControlNet residuals to add to the UNet (several are summed);
- :meth:`ForwardHook.enter_window` / :meth:`ForwardHook.exit_window`: per-window attention state
  around the denoising UNet call (PTM: the map its temporal attentions read).

The other hook points live where they act: extra context tokens in ``RunState.context_tokens``
(face adapters), keys/values, query scales and attention branches as contributions of the
composable attention processor (:mod:`tcan_core.attention.processor`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

Residuals = tuple[Sequence[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WindowCall:
    """One evaluation of one window as hooks see it.

    ``latents`` [f,4,h,w] is the UNet input (scaled for the scheduler, UNet dtype), ``poses``
    [f,3,H,W] the window's pose images (device, UNet dtype), ``text`` [1,T,C] the text context
    without extra tokens, ``temporal_frames`` the temporal layers' frames per video (None: off) and
    ``motion`` the state those layers read.
    """

    latents: torch.Tensor
    timestep: torch.Tensor
    poses: torch.Tensor
    text: torch.Tensor
    step: int
    steps: int
    temporal_frames: int | None
    motion: Any

    @property
    def frames(self) -> int:
        return int(self.latents.shape[0])


class ForwardHook:
    """A patch's part in a window evaluation; every point does nothing unless a subclass overrides it."""

    def prepare_window(self, pose_images: torch.Tensor) -> Any:
        """Data for one window from its pose images [f,H,W,3] (CPU float), computed once and kept."""
        return None

    def residuals(self, call: WindowCall) -> Residuals | None:
        """(down residuals, mid residual) at batch f for the denoising UNet, or None."""
        return None

    def enter_window(self, prepared: Any, latent_size: tuple[int, int]) -> None:
        """Set per-window attention state before the denoising UNet call."""

    def exit_window(self) -> None:
        """Clear what :meth:`enter_window` set; called also when the UNet call fails."""


@dataclass(frozen=True)
class WindowInput:
    """Everything one window's guided prediction needs besides the model and its hooks.

    ``positive`` / ``negative`` [1,T',C] are the contexts with the patches' extra tokens,
    ``appearance_context`` the one for the appearance UNet; ``prepared`` holds each hook's window
    data in hook order; ``calibrated`` (TPC) is (images used, each frame's index among them, driving
    person masks [f,h,w], warped reference masks [U,h,w]) on the device, ``calibrated_latents``
    [Nc,4,h,w] the calibrated references' latents. Training sets the last two:
    ``reference_rows`` bool [f] says which rows read the reference (TCAN's stage 1 drops it for some
    samples; None: every row guidance allows), ``reference_index`` long [f] which stored reference
    each row reads (one per video of a batch; None: one shared reference).
    """

    call: WindowCall
    positive: torch.Tensor
    negative: torch.Tensor
    appearance_context: torch.Tensor
    prepared: Sequence[Any]
    latent_size: tuple[int, int]
    cfg: float
    reference_out_of_uncond: bool = True
    calibrated: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    calibrated_latents: torch.Tensor | None = None
    reference_rows: torch.Tensor | None = None
    reference_index: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (cfg > 1)."""
        return self.cfg > 1.0


def appearance_pass(appearance: torch.nn.Module, bank: Any, motion: Any, group: str, latents: torch.Tensor,
                    t: torch.Tensor, context: torch.Tensor) -> None:
    """The appearance UNet on clean reference latents [R,4,h,w] at timestep ``t``: fills ``group`` of the bank."""
    motion.num_frames = None
    with bank.writing(group):
        appearance(latents, t, encoder_hidden_states=context.expand(latents.shape[0], -1, -1).to(latents.dtype),
                   return_dict=False)


def _control_residuals(hooks: Sequence[ForwardHook], call: WindowCall) -> Residuals | tuple[None, None]:
    """The hooks' ControlNet residuals, summed when several give some; (None, None) when none does."""
    down = mid = None
    for hook in hooks:
        found = hook.residuals(call)
        if found is None:
            continue
        if down is None:
            down, mid = list(found[0]), found[1]
        else:
            down, mid = [a + b for a, b in zip(down, found[0])], mid + found[1]
    return down, mid


def window_forward(unet: torch.nn.Module, appearance: torch.nn.Module, bank: Any, hooks: Sequence[ForwardHook],
                   window: WindowInput) -> torch.Tensor:
    """Guided noise prediction of one window, [f,4,h,w] in float32, TCAN (see the module docstring)."""
    call = window.call
    frames, x, t = call.frames, call.latents, call.timestep
    dtype, device = x.dtype, x.device
    down_res, mid_res = _control_residuals(hooks, call)

    guided = window.guided
    halves = 2 if guided else 1
    use_reference = torch.ones(halves * frames, dtype=torch.bool, device=device)
    if guided and window.reference_out_of_uncond:
        use_reference[:frames] = False
    if window.reference_rows is not None:
        use_reference &= window.reference_rows.to(device).bool().repeat(halves)
    calibrated_index = query_masks = key_masks = None
    if window.calibrated is not None:
        used, local, query, key_masks = window.calibrated
        if t.ndim and bool((t != t.reshape(-1)[0]).any()):
            raise ValueError("TPC's calibrated references are encoded at the window's timestep, but the rows of this "
                             "window have different timesteps; give every row of a window the same timestep")
        appearance_pass(appearance, bank, call.motion, "calibrated", window.calibrated_latents[used],
                        t if t.ndim == 0 else t.reshape(-1)[:1],
                        window.appearance_context)
        calibrated_index = torch.where(use_reference, local.repeat(halves), torch.full_like(local.repeat(halves), -1))
        query_masks = query.repeat(halves, 1, 1)
    if bank is not None:
        reference_index = None if window.reference_index is None else window.reference_index.repeat(halves)
        bank.set_read(window.latent_size, use_reference, calibrated_index, query_masks, key_masks, reference_index)

    if guided:
        model_in = torch.cat([x, x])
        context = torch.cat([window.negative.expand(frames, -1, -1),
                             window.positive.expand(frames, -1, -1)]).to(dtype)
        if down_res is not None:
            down_res = [r.repeat(2, 1, 1, 1) for r in down_res]
            mid_res = mid_res.repeat(2, 1, 1, 1)
    else:
        model_in, context = x, window.positive.expand(frames, -1, -1).to(dtype)

    call.motion.num_frames = call.temporal_frames
    entered: list[ForwardHook] = []
    try:
        for hook, prepared in zip(hooks, window.prepared):
            hook.enter_window(prepared, window.latent_size)
            entered.append(hook)
        eps = unet(model_in, t, encoder_hidden_states=context, down_block_additional_residuals=down_res,
                   mid_block_additional_residual=mid_res, return_dict=False)[0].float()
    finally:
        for hook in reversed(entered):
            hook.exit_window()
    if not guided:
        return eps
    uncond, cond = eps.chunk(2)
    return uncond + window.cfg * (cond - uncond)
