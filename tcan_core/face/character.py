"""TIFF's first stage on SD1.5: text + a face identity + an OpenPose image -> a full-body character image.

TIFF (text-to-image with identity, then animation) makes the reference character from a prompt
while keeping a given face: the authors use SDXL with InstantID and a pose ControlNet. Here the
same TCAN model that animates does it: the face comes from its Face ID patch (ID-Animator or
IP-Adapter FaceID), the pose from its OpenPose ControlNet, with the motion module, the
ControlNet's temporal layers and reference attention left out, so each pose image gives one
independent image. The image then feeds the TCAN Sampler as the reference.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..animation.model import TCANModel
from ..animation.sampler import AnimationResult, ProgressCallback, SamplerSettings, sample_animation
from ..animation.vae import VAELike

log = logging.getLogger(__name__)


def character_image(model: TCANModel, poses: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                    vae: VAELike, settings: SamplerSettings = SamplerSettings(),
                    device: torch.device | str | None = None, progress: ProgressCallback | None = None,
                    check_cancel: Callable[[], None] | None = None) -> AnimationResult:
    """One image per OpenPose image ``poses`` [B,H,W,3] from the prompt, the model's face and its ControlNet.

    The result's notes say when the model has no Face ID patch (the face is then whatever the
    prompt gives) or no ControlNet (the pose is then ignored).
    """
    notes = []
    if model.patch("face_id") is None:
        notes.append("No Face ID patch: the face is not controlled (add TCAN Face ID before this node).")
    if model.patch("controlnet") is None:
        notes.append("No ControlNet: the pose images are ignored (add TCAN Temporal ControlNet before this node; "
                     "its temporal layers stay off here).")
    for note in notes:
        log.warning("%s", note)
    result = sample_animation(model, None, poses, positive, negative, vae, settings, device=device,
                              progress=progress, check_cancel=check_cancel, temporal=False)
    result.notes[:0] = notes
    return result
