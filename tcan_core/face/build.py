"""Add a face adapter to a ``TCAN_MODEL``: the engine behind the TCAN Face ID node (see
:mod:`tcan_core.animation.build` for the other patches)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from ..animation.model import TCANModel, modules_on
from .adapters import face_embeddings, load_face_adapter
from .clip_vision import load_clip_vision
from .id_adapter import FaceIDPatch
from .identity import FaceIdentity

log = logging.getLogger(__name__)


def add_face_id(model: TCANModel, adapter_path: str | os.PathLike, face: FaceIdentity,
                clip_vision_path: str | os.PathLike | None = None, scale: float = 0.8,
                lora_strength: float = 1.0, device: torch.device | str | None = None) -> tuple[TCANModel, str]:
    """Add a face adapter (ID-Animator's animator.ckpt or ip-adapter-faceid_sd15.bin, told apart by their keys) for
    ``face``; ID-Animator also needs the CLIP ViT-H/14 image encoder file ``clip_vision_path``, which runs on
    ``device`` (default: where it was loaded, the CPU) for the face crops and goes back after. A face patch
    already on the model is replaced."""
    weights = load_face_adapter(adapter_path, model.unet)
    encoder = None
    if weights.uses_image_encoder and clip_vision_path is not None:
        encoder = load_clip_vision(clip_vision_path)
    on_device = modules_on(torch.device(device), encoder) if device is not None else contextlib.nullcontext()
    with on_device:
        embeddings, uncond = face_embeddings(weights, face, encoder)
    # The patch keeps its inputs on the CPU; the sampler moves the face tokens to its device.
    embeddings, uncond = embeddings.cpu(), (uncond.cpu() if uncond is not None else None)
    # ID-Animator projects each crop and mixes the tokens with the faces' weights; FaceID's single identity
    # embedding is already the weighted mix.
    face_weights = face.weights if weights.uses_image_encoder else None
    patch = FaceIDPatch(weights, embeddings, scale=scale, uncond_embeddings=uncond, lora_strength=lora_strength,
                        face_weights=face_weights)
    if encoder is not None:
        how = f"image encoder {Path(clip_vision_path).name}"
    elif clip_vision_path is not None:
        how = "identity embedding (the image encoder is not used)"
    else:
        how = "identity embedding"
    lora = "no LoRA" if not weights.lora.weights else f"LoRA strength {lora_strength:g}"
    report = (f"Face ID: {weights.kind} {Path(adapter_path).name}, {face.num_faces} face(s), scale {scale:g}, "
              f"{weights.num_tokens} tokens after the text, {how}, {lora}.")
    return model.with_patch(patch), report
