"""One TCAN training step's loss, through the sampler's own window forward.

TCAN (Kim et al., ECCV 2024), section 3 and Fig. 2, trains in two stages with the epsilon loss of
latent diffusion, ``|| eps - eps_theta(z_t, t, pose, reference) ||^2`` (Rombach et al. 2022, eq. 2),
on empty prompts:

- stage 1 (image level, one frame per sample): the appearance UNet and the APPA LoRA of the
  denoising UNet learn, the base UNet and the OpenPose ControlNet are frozen;
- stage 2 (video level, clips of ``F`` frames): the motion modules of the denoising UNet and the
  temporal layers of the ControlNet's down blocks 2 and 3 learn; everything else is frozen.

:class:`TrainingModel` holds the modules of a stage and :meth:`TrainingModel.forward` computes
the loss of a batch the way sampling computes a prediction: the appearance UNet on the clean
reference latents at the sample's timestep (:func:`~tcan_core.animation.forward.appearance_pass`,
filling the reference bank), then :func:`~tcan_core.animation.forward.window_forward` with the
model's patches as hooks (the ControlNet's residuals with its temporal layers, the motion module,
PTM when asked), without guidance and with gradients. :meth:`TrainingModel.installed` applies the
patches and the reference attention for a ``with`` block around forward *and* backward, so that
gradient checkpointing recomputes the same graph.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from ..animation.forward import WindowCall, WindowInput, appearance_pass, window_forward
from ..animation.model import RunState, TCANModel
from ..animation.patches import ControlNetPatch, MotionPatch, PTMPatch
from ..animation.temporal_hooks import MotionState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainBatch:
    """One micro-batch on the device, prepared by the trainer.

    ``noisy`` [B*F,4,h,w] are the noised target latents (video-major), ``noise`` the epsilon added
    to them, ``timesteps`` long [B] one per video, ``poses`` [B*F,3,H,W] the rendered pose images in
    0..1, ``reference`` [B,4,h,w] the clean reference latents and ``use_reference`` bool [B] which
    videos read the reference (TCAN's stage 1 drops it for about 10% of the samples). With TPC
    (one video per batch), ``calibrated`` is (images used, each frame's index among them, driving
    person masks [F,h,w], warped reference masks [U,h,w]) and ``calibrated_latents`` [U,4,h,w] the
    calibrated references' latents, as :class:`~tcan_core.animation.forward.WindowInput` takes them.
    ``pose_images`` [B*F,H,W,3] are the same poses on the CPU, for hooks that prepare window data
    (PTM); None copies them from ``poses``.
    """

    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    poses: torch.Tensor
    reference: torch.Tensor
    use_reference: torch.Tensor
    frames: int
    calibrated: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    calibrated_latents: torch.Tensor | None = None
    pose_images: torch.Tensor | None = None

    @property
    def videos(self) -> int:
        return int(self.timesteps.shape[0])


class TrainingModel(torch.nn.Module):
    """The modules of one TCAN training stage; ``forward(batch)`` -> the batch's mean epsilon loss.

    ``unet`` is the denoising UNet (with the APPA LoRA as a peft adapter in stage 1), ``appearance``
    the appearance UNet, ``controlnet`` the frozen OpenPose ControlNet with ``temporal`` layers
    (stage 2), ``motion`` the motion module (stage 2), ``text`` the empty prompt's context [1,77,C].
    ``ptm_tau`` > 0 switches TCAN's pose-driven temperature map on (off in the authors' training).
    """

    def __init__(self, unet: torch.nn.Module, appearance: torch.nn.Module, controlnet: torch.nn.Module,
                 text: torch.Tensor, motion: torch.nn.Module | None = None, temporal: torch.nn.Module | None = None,
                 ptm_tau: float = 0.0) -> None:
        super().__init__()
        self.unet = unet
        self.appearance = appearance
        self.controlnet = controlnet
        self.motion = motion
        self.temporal = temporal
        self.register_buffer("text", text.detach().clone(), persistent=False)
        self.ptm_tau = float(ptm_tau)
        self._session: tuple[RunState, object] | None = None

    def tcan_model(self) -> TCANModel:
        """The same modules as a ``TCAN_MODEL`` with the stage's patches, for the sampler and :meth:`installed`."""
        model = TCANModel(unet=self.unet, vae=None, text_encoder=None, source="training",
                          appearance_unet=self.appearance)
        if self.motion is not None:
            model = model.with_patch(MotionPatch(self.motion, "motion module in training"))
        model = model.with_patch(ControlNetPatch(self.controlnet, "OpenPose ControlNet in training", self.temporal))
        if self.ptm_tau > 0:
            model = model.with_patch(PTMPatch(self.ptm_tau))
        return model

    @contextlib.contextmanager
    def installed(self, device: torch.device, checkpoint: bool = False) -> Iterator["TrainingModel"]:
        """Patches and reference attention on for the ``with`` block (forward and backward); off after it.
        ``checkpoint`` recomputes the temporal layers in the backward pass (gradient checkpointing)."""
        from ..animation.reference import ReferenceBank, reference_attention

        run = RunState(device=torch.device(device), motion=MotionState(num_frames=None, checkpoint=checkpoint))
        bank = ReferenceBank()
        with self.tcan_model().patched(run), reference_attention(bank, self.unet, self.appearance):
            self._session = (run, bank)
            try:
                yield self
            finally:
                self._session = None
                bank.clear()

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        """Mean squared error between the predicted and the added noise over the batch (a scalar, float32)."""
        if self._session is None:
            raise RuntimeError("TrainingModel.forward runs inside `with model.installed(device):`, which applies "
                               "the motion module, the ControlNet and reference attention")
        run, bank = self._session
        frames, videos = batch.frames, batch.videos
        rows = batch.noisy.shape[0]
        if rows != videos * frames:
            raise ValueError(f"a batch of {rows} latents is not {videos} videos x {frames} frames")
        if batch.calibrated is not None and videos != 1:
            raise ValueError(f"TPC calibrates one video per batch, got {videos}; use --batch-size 1 with --tpc")
        dtype = next(self.unet.parameters()).dtype
        text = self.text.to(dtype)
        # A frozen appearance UNet needs no graph (and, shared with the denoising UNet, must not be recomputed).
        learns = any(p.requires_grad for p in self.appearance.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and learns):
            appearance_pass(self.appearance, bank, run.motion, "reference", batch.reference.to(dtype),
                            batch.timesteps, text)
        temporal = frames if self.motion is not None else None
        call = WindowCall(batch.noisy.to(dtype), batch.timesteps.repeat_interleave(frames), batch.poses.to(dtype),
                          text, 0, 1, temporal, run.motion)
        pose_images = batch.pose_images
        if pose_images is None:
            pose_images = batch.poses.detach().float().movedim(1, -1).cpu()
        prepared = [hook.prepare_window(pose_images) for hook in run.hooks]
        # One video shares its one stored reference with every row; several are gathered per row.
        reference_index = (None if videos == 1 else
                           torch.arange(videos, device=batch.noisy.device).repeat_interleave(frames))
        window = WindowInput(call, text, text, text, prepared, tuple(batch.noisy.shape[-2:]), cfg=1.0,
                             calibrated=batch.calibrated,
                             calibrated_latents=None if batch.calibrated_latents is None
                             else batch.calibrated_latents.to(dtype),
                             reference_rows=batch.use_reference.repeat_interleave(frames),
                             reference_index=reference_index)
        eps = window_forward(self.unet, self.appearance, bank, run.hooks, window)
        return F.mse_loss(eps.float(), batch.noise.float())
