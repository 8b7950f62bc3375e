"""One entry for both face adapters: recognise the file by its keys, load it, and turn a ``TCAN_FACE``
into the adapter's input.

- ID-Animator (:mod:`.id_adapter`): ``face_adapter.*`` / ``image_proj.*``, or ``adapter_modules.*`` /
  ``image_proj_model.*``; input: CLIP ViT-H/14 penultimate hidden states of the aligned face crops;
- IP-Adapter FaceID SD1.5 (:mod:`.ip_faceid`): ``ip_adapter.*`` / ``image_proj.*``; input: the
  512-d insightface identity embedding.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..models.errors import ModelFormatError
from ..models.keys import unwrapped_names
from ..models.state_dict import format_keys, load_state_dict_file
from .id_adapter import (ID_ANIMATOR, IP_ADAPTER_FACEID, FaceAdapterWeights, check_image_encoder,
                         clip_image_embeddings, clip_uncond_embeddings, parse_id_animator_state_dict)
from .identity import FaceIdentity
from .ip_faceid import SUPPORTED_FORMATS, parse_ip_faceid_state_dict

log = logging.getLogger(__name__)

_ID_ANIMATOR_PREFIXES = ("face_adapter.", "adapter_modules.", "image_proj_model.")
_IP_ADAPTER_PREFIX = "ip_adapter."


def _lora_hint(keys: list[str]) -> str:
    from ..models.lora import detect_lora_layout

    try:
        layout = detect_lora_layout(keys)
    except ModelFormatError:
        return ""
    return (f" It is a LoRA ({layout} keys), such as the separate ip-adapter-faceid_sd15_lora.safetensors: load it "
            "with TCAN APPA LoRA, and pick the FaceID adapter (ip-adapter-faceid_sd15.bin) here.")


def detect_face_adapter(keys: Iterable[str], source: str = "face adapter file") -> str:
    """``ID_ANIMATOR`` or ``IP_ADAPTER_FACEID`` from a file's keys; ModelFormatError naming both layouts otherwise.
    Other IP-Adapters (Plus, FaceID-Plus) are recognised as IP-Adapters here and refused by name when parsed."""
    keys = unwrapped_names(keys)
    id_animator = any(k.startswith(_ID_ANIMATOR_PREFIXES) for k in keys)
    ip_adapter = any(k.startswith(_IP_ADAPTER_PREFIX) for k in keys)
    if id_animator and ip_adapter:
        raise ModelFormatError(f"{source} mixes ID-Animator (face_adapter / adapter_modules) and IP-Adapter "
                               "(ip_adapter) keys; a face adapter file is one of the two. Download it again.")
    if id_animator:
        return ID_ANIMATOR
    if ip_adapter:
        return IP_ADAPTER_FACEID
    raise ModelFormatError(f"{source} is not a face adapter: the supported formats are {SUPPORTED_FORMATS}. Its "
                           f"keys: {format_keys(keys)}.{_lora_hint(keys)}")


def parse_face_adapter_state_dict(sd: Mapping[str, torch.Tensor], unet: nn.Module,
                                  source: str = "face adapter file") -> FaceAdapterWeights:
    """A face adapter state dict of either format -> its weights for ``unet`` (strict, see each parser)."""
    if detect_face_adapter(sd, source) == ID_ANIMATOR:
        return parse_id_animator_state_dict(sd, unet, source)
    return parse_ip_faceid_state_dict(sd, unet, source)


def load_face_adapter(path: str | os.PathLike, unet: nn.Module) -> FaceAdapterWeights:
    """ID-Animator's animator.ckpt or IP-Adapter FaceID's ip-adapter-faceid_sd15.bin (.safetensors too), told apart
    by their keys, parsed for ``unet``."""
    p = Path(path)
    return parse_face_adapter_state_dict(load_state_dict_file(p), unet, source=str(p))


def face_embeddings(weights: FaceAdapterWeights, face: FaceIdentity,
                    image_encoder: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeddings, uncond_embeddings or None) of ``face`` for the adapter: ID-Animator -> CLIP hidden states of
    the crops [N,tokens,1280] and of a blank image [1,tokens,1280] (``image_encoder`` required); IP-Adapter FaceID
    -> the identity embedding [1,512] and None (the patch projects a zero embedding; the encoder is not used)."""
    if not weights.uses_image_encoder:
        width = int(face.embedding.shape[-1])
        if width != weights.embedding_dim:
            raise ValueError(f"the face's identity embedding has {width} values, but IP-Adapter FaceID "
                             f"{weights.source} needs the {weights.embedding_dim}-d insightface embedding; analyse "
                             "the face with an insightface model pack (antelopev2 or buffalo_l)")
        return face.embedding.detach().float()[None], None
    if image_encoder is None:
        raise ValueError(f"the ID-Animator face adapter {weights.source} needs a CLIP ViT-H/14 image encoder from "
                         "models/clip_vision (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors): connect or pick one")
    check_image_encoder(image_encoder, weights)
    return clip_image_embeddings(image_encoder, face.crops), clip_uncond_embeddings(image_encoder)
