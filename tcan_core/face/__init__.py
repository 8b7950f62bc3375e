"""Face identity for TCAN: ID-Animator's face adapter (He et al. 2024) and IP-Adapter FaceID (Ye et al. 2023)
on the denoising UNet, and the CLIP image encoder ID-Animator reads."""

from .adapters import detect_face_adapter, face_embeddings, load_face_adapter, parse_face_adapter_state_dict
from .clip_vision import clear_clip_vision_cache, clip_vision_config, load_clip_vision
from .id_adapter import (
    DEFAULT_SCALE,
    ID_ANIMATOR,
    IP_ADAPTER_FACEID,
    FaceAdapterWeights,
    FaceAttnProcessor,
    FaceIDPatch,
    FaceState,
    IDAnimatorWeights,
    Resampler,
    append_face_tokens,
    attention_slots,
    check_image_encoder,
    clip_image_embeddings,
    clip_uncond_embeddings,
    cross_attention_slots,
    face_attention_installed,
    face_tokens,
    load_id_animator,
    parse_id_animator_state_dict,
)
from .ip_faceid import IPFaceIDWeights, MLPProjModel, load_ip_faceid, parse_ip_faceid_state_dict

__all__ = [
    "DEFAULT_SCALE", "ID_ANIMATOR", "IP_ADAPTER_FACEID", "FaceAdapterWeights", "FaceAttnProcessor", "FaceIDPatch",
    "FaceState", "IDAnimatorWeights", "IPFaceIDWeights", "MLPProjModel", "Resampler", "append_face_tokens",
    "attention_slots", "check_image_encoder", "clear_clip_vision_cache", "clip_image_embeddings",
    "clip_uncond_embeddings", "clip_vision_config", "cross_attention_slots", "detect_face_adapter",
    "face_attention_installed", "face_embeddings", "face_tokens", "load_clip_vision", "load_face_adapter",
    "load_id_animator", "load_ip_faceid", "parse_face_adapter_state_dict", "parse_id_animator_state_dict",
    "parse_ip_faceid_state_dict",
]
