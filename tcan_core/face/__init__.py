"""Face identity for TCAN: ID-Animator's face adapter (He et al. 2024) on the denoising UNet."""

from .id_adapter import (
    DEFAULT_SCALE,
    FaceAttnProcessor,
    FaceIDPatch,
    FaceState,
    IDAnimatorWeights,
    Resampler,
    append_face_tokens,
    check_image_encoder,
    clip_image_embeddings,
    clip_uncond_embeddings,
    cross_attention_slots,
    face_attention_installed,
    face_tokens,
    load_id_animator,
    parse_id_animator_state_dict,
)

__all__ = [
    "DEFAULT_SCALE", "FaceAttnProcessor", "FaceIDPatch", "FaceState", "IDAnimatorWeights", "Resampler",
    "append_face_tokens", "check_image_encoder", "clip_image_embeddings", "clip_uncond_embeddings",
    "cross_attention_slots", "face_attention_installed", "face_tokens", "load_id_animator",
    "parse_id_animator_state_dict",
]
