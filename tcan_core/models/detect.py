"""Recognise a model file's format and base model from its keys and shapes, never its name.

Every function here takes ``{key: shape}`` (see :func:`state_dict.read_shapes`), so the command
line's ``doctor`` can classify files without loading their tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..bases import SD15 as SD15_FACTS
from .errors import ModelFormatError, WrongBaseModelError
from .state_dict import Shapes

SD15 = SD15_FACTS.name
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")

# What to use instead, for each slot, when a file is for another base.
FIX = SD15_FACTS.fix


@dataclass
class Detection:
    """What a file is: ``kind`` (checkpoint, controlnet, motion, ...), ``base`` and ``format``."""

    kind: str
    base: str
    format: str
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if k != "prefix")
        return f"{self.kind} for {self.base}, {self.format} format" + (f" ({extra})" if extra else "")


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _context_dim(shapes: Shapes, prefix: str) -> int | None:
    for k, s in shapes.items():
        if k.startswith(prefix) and k.endswith("attn2.to_k.weight") and len(s) == 2:
            return int(s[1])
    return None


def _proj_in_linear(shapes: Shapes, prefix: str) -> bool | None:
    for k, s in shapes.items():
        if k.startswith(prefix) and k.endswith(".proj_in.weight") and "motion_modules" not in k:
            return len(s) == 2
    return None


def _base_from_unet(shapes: Shapes, prefix: str) -> str:
    """SD1.5, SD2.x or SDXL from a UNet's cross-attention width and projection layout."""
    if _has_prefix(shapes, prefix + "label_emb.") or _has_prefix(shapes, prefix + "add_embedding."):
        return "SDXL"
    ctx = _context_dim(shapes, prefix)
    if ctx == 2048:
        return "SDXL"
    if ctx == 1024 or _proj_in_linear(shapes, prefix):
        return "SD2.x"
    return SD15


def guess_other_kind(shapes: Shapes) -> str:
    """A short description of what a file that is not a full checkpoint seems to be."""
    keys = list(shapes)
    if any("motion_modules" in k or "temporal_attentions" in k for k in keys):
        return "an AnimateDiff motion module"
    if any(k.startswith(("control_model.", "zero_convs.", "input_hint_block.", "controlnet_cond_embedding.")) for k in keys):
        return "a ControlNet"
    if any("lora_" in k or ".lora." in k or "lora_A" in k for k in keys):
        return "a LoRA"
    if any(k.startswith(("encoder.down", "decoder.up", "encoder.down_blocks")) for k in keys):
        return "a VAE"
    if any(k.startswith(("input_blocks.", "down_blocks.")) for k in keys):
        return "a UNet without text encoder and VAE"
    if any(k.startswith(("image_proj", "ip_adapter", "face_adapter", "adapter_modules")) for k in keys):
        return "an image/face adapter"
    return "not a Stable Diffusion checkpoint"


def detect_checkpoint(shapes: Shapes) -> Detection:
    """Classify a single-file base checkpoint (LDM key names): SD1.5, SD2.x, SDXL, SD3, Flux, ..."""
    if _has_prefix(shapes, "conditioner.embedders.") or _has_prefix(shapes, UNET + "label_emb."):
        return Detection("checkpoint", "SDXL", "LDM single file")
    if _has_prefix(shapes, UNET + "joint_blocks."):
        return Detection("checkpoint", "SD3", "single file")
    if _has_prefix(shapes, UNET + "double_blocks.") or _has_prefix(shapes, "double_blocks."):
        return Detection("checkpoint", "Flux", "single file")
    if _has_prefix(shapes, "cond_stage_model.model."):
        return Detection("checkpoint", "SD2.x", "LDM single file")
    if not _has_prefix(shapes, UNET + "input_blocks."):
        return Detection("other", "unknown", guess_other_kind(shapes))
    base = _base_from_unet(shapes, UNET)
    details = {}
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None:
        details["in_channels"] = int(conv_in[1])
    if not _has_prefix(shapes, VAE):
        details["vae"] = "missing"
    if not any(_has_prefix(shapes, p) for p in CLIP_PREFIXES):
        details["text_encoder"] = "missing"
    return Detection("checkpoint", base, "LDM single file", details)


def detect_controlnet(shapes: Shapes) -> Detection:
    """Classify a ControlNet file: LDM keys (with or without ``control_model.``) or diffusers keys."""
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        return Detection("controlnet", _base_from_unet(shapes, ""), "diffusers")
    for prefix in ("control_model.", ""):
        if prefix + "input_hint_block.0.weight" in shapes:
            fmt = "LDM" + (" (control_model. prefix)" if prefix else "")
            return Detection("controlnet", _base_from_unet(shapes, prefix), fmt, {"prefix": prefix})
    if any(k.startswith("lora_controlnet") or "lora_controlnet" in k for k in shapes):
        return Detection("other", "unknown", "a Control-LoRA, not a full ControlNet")
    if _has_prefix(shapes, "adapter.") or _has_prefix(shapes, "body."):
        return Detection("other", "unknown", "a T2I-Adapter, not a ControlNet")
    return Detection("other", "unknown", guess_other_kind(shapes))


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


def detect_motion_module(shapes: Shapes) -> Detection:
    """Classify an AnimateDiff motion module: v1 (PE 24, no mid block), v2 (mid block), v3 (PE 32,
    no mid block), for SD1.5 (4 down blocks) or SDXL (3), in the original or diffusers key layout."""
    keys = list(shapes)
    if any("temporal_attentions" in k for k in keys):
        return Detection("motion", "SDXL", "HotshotXL")
    if not any(".motion_modules." in k for k in keys):
        return Detection("other", "unknown", guess_other_kind(shapes))
    fmt = "AnimateDiff" if any(".temporal_transformer." in k for k in keys) else "diffusers"
    downs = {int(m.group(2)) for k in keys if (m := _BLOCK.match(k)) and m.group(1) == "down_blocks"}
    widths = []
    for i in sorted(downs):
        for k, s in shapes.items():
            if k.startswith(f"down_blocks.{i}.motion_modules.0.") and k.endswith("proj_in.weight"):
                widths.append(int(s[0]))
                break
    pe = [s for k, s in shapes.items() if k.endswith("pos_encoder.pe") or k.endswith("pos_embed.pe")]
    if not pe:
        return Detection("motion", SD15 if len(downs) == 4 else "SDXL", "AnimateLCM-style (no positional encoding)",
                         {"down_blocks": len(downs)})
    max_len = int(pe[0][1])
    mid = any(k.startswith("mid_block.") for k in keys)
    base = SD15 if len(downs) == 4 else ("SDXL" if len(downs) == 3 else f"unknown ({len(downs)} down blocks)")
    version = "v2" if mid else ("v3" if max_len == 32 else "v1")
    return Detection("motion", base, fmt, {"version": version, "max_frames": max_len, "mid_block": mid,
                                           "channels": tuple(widths)})


def require_sd15(det: Detection, slot: str, source: str) -> None:
    """Raise a clear error unless ``det`` is an SD1.5 model of the kind ``slot`` needs."""
    wanted = {"checkpoint": "an SD1.5 checkpoint", "controlnet": "an SD1.5 ControlNet",
              "motion": "an SD1.5 AnimateDiff motion module"}[slot]
    if det.kind != slot:
        raise ModelFormatError(f"{source} is {det.format}, not {wanted}; {FIX[slot]}.")
    if det.base != SD15:
        raise WrongBaseModelError(
            f"{source} is {'an' if det.base[0] in 'S' else 'a'} {det.base} {slot} ({det.format}); this "
            f"slot needs {wanted}: {FIX[slot]}."
        )
