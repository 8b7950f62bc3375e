"""Build a ``TCAN_MODEL`` from files: the engine behind the model nodes and the command line.

Each function takes a model and returns a new one with one more patch (the input is never
changed), and a one-paragraph report for the node. Files are recognised by their keys:

- :func:`load_tcan_model`: an SD1.5 checkpoint (single file or diffusers folder); optional
  appearance UNet (the authors' stage-1 layout or the pack's safetensors), else training-free;
- :func:`add_motion_module`: an AnimateDiff v1/v2/v3 module, or the authors' stage-2 UNet
  checkpoint, whose motion modules become the motion patch and whose APPA LoRA (if any) a LoRA patch;
- :func:`add_appa_lora`: a LoRA in peft, diffusers or kohya layout; no matching key is an error;
- :func:`add_temporal_controlnet`: the OpenPose ControlNet plus temporal layers in its down
  blocks 2 and 3, from the authors' checkpoint or shared with the motion module;
- :func:`add_ptm`: the pose-driven temperature map.

Face adapters are added by :func:`tcan_core.face.build.add_face_id`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import torch

from ..models.errors import ModelFormatError
from ..models.lora import LoraPatch, load_lora
from .model import TCANModel
from .patches import AppaLoraPatch, ControlNetPatch, MotionPatch, PTMPatch

log = logging.getLogger(__name__)

TEMPORAL_FROM_MOTION = "from motion module"
TEMPORAL_OFF = "off"


def load_tcan_model(checkpoint: str | os.PathLike, appearance: str | os.PathLike | None = None,
                    dtype: torch.dtype = torch.float32, with_vae_and_text: bool = False) -> tuple[TCANModel, str]:
    """SD1.5 checkpoint (+ optional appearance UNet file) -> (TCAN_MODEL on the CPU, report)."""
    from ..models.sd15 import load_sd15
    from ..models.tcan_ckpt import load_appearance_unet

    parts = load_sd15(checkpoint, dtype=dtype, unet_only=not with_vae_and_text)
    appearance_unet = None
    lines = [f"SD1.5 UNet from {Path(checkpoint).name} ({parts.detection.format}), {dtype}."]
    if appearance is not None:
        appearance_unet = load_appearance_unet(appearance, like=parts.unet, dtype=dtype)
        lines.append(f"Appearance UNet from {Path(appearance).name}.")
    else:
        lines.append("Training-free: the base UNet also serves as the appearance UNet.")
    model = TCANModel(unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, source=str(checkpoint),
                      appearance_unet=appearance_unet)
    return model, " ".join(lines)


def add_motion_module(model: TCANModel, path: str | os.PathLike, dtype: torch.dtype | None = None,
                      lora_strength: float = 1.0) -> tuple[TCANModel, str]:
    """Add an AnimateDiff motion module, or the authors' stage-2 UNet (motion modules + APPA LoRA)."""
    from ..models.motion_module import load_motion_module
    from ..models.state_dict import read_shapes
    from ..models.tcan_ckpt import detect_tcan_checkpoint, load_tcan_unet

    dtype = dtype or next(model.unet.parameters()).dtype
    p = Path(path)
    kind = detect_tcan_checkpoint(read_shapes(p)) if p.is_file() else "other"
    if kind == "tcan_unet":
        parts = load_tcan_unet(p, model.unet, dtype=dtype)
        if parts.motion_adapter is None:
            raise ModelFormatError(f"{p.name} is a TCAN UNet checkpoint without motion modules (a stage-1 "
                                   "checkpoint); choose it in TCAN APPA LoRA (it reads the LoRA inside), and pick an "
                                   "AnimateDiff motion module (mm_sd_v15_v2.ckpt) here with tcan_unet 'none'")
        out = model.with_patch(MotionPatch(parts.motion_adapter, str(p)))
        lines = [f"Motion modules from the TCAN stage-2 UNet {p.name}."]
        if parts.lora is not None:
            out = out.with_patch(AppaLoraPatch(LoraPatch(parts.lora, lora_strength)))
            lines.append(f"APPA LoRA at strength {lora_strength:g}: {parts.lora.coverage.describe()}.")
        if parts.base_mismatch:
            lines.append(f"{len(parts.base_mismatch)} base UNet tensors differ from the loaded checkpoint's; "
                         "the checkpoint's SD1.5 base weights are used (the file's base weights are ignored).")
        return out, " ".join(lines)
    adapter, det = load_motion_module(p, dtype=dtype)
    version = det.details.get("version", "?")
    report = (f"AnimateDiff {version} motion module from {p.name} ({det.format}), up to "
              f"{adapter.config.get('motion_max_seq_length')} frames per window.")
    return model.with_patch(MotionPatch(adapter, str(p))), report


def add_appa_lora(model: TCANModel, path: str | os.PathLike, strength: float = 1.0) -> tuple[TCANModel, str]:
    """Add a LoRA (peft, diffusers or kohya keys, or the one inside a TCAN UNet checkpoint) at ``strength``."""
    from ..models.state_dict import read_shapes
    from ..models.tcan_ckpt import detect_tcan_checkpoint, load_tcan_unet

    p = Path(path)
    if p.is_file() and detect_tcan_checkpoint(read_shapes(p)) == "tcan_unet":
        parsed = load_tcan_unet(p, model.unet, dtype=next(model.unet.parameters()).dtype).lora
        if parsed is None:
            raise ModelFormatError(f"{p.name} is a TCAN UNet checkpoint without APPA LoRA weights; choose it in "
                                   "TCAN Motion Module (it holds motion modules) and pick a LoRA file here")
        where = "the APPA LoRA inside the TCAN UNet checkpoint"
    else:
        parsed = load_lora(p, model.unet)
        where = f"{parsed.layout} keys"
    patch = LoraPatch(parsed, strength)
    report = f"LoRA {p.name} ({where}) at strength {strength:g}: {parsed.coverage.describe()}."
    if parsed.ignored_keys:
        report += f" {len(parsed.ignored_keys)} text-encoder keys ignored (APPA patches the UNet)."
    if model.appearance_unet is None and strength != 0:
        report += (" Training-free mode: the appearance pass shares these weights, so it also sees the LoRA; "
                   "load the appearance UNet trained with it for TCAN's exact setup.")
    return model.with_patch(AppaLoraPatch(patch)), report


def add_temporal_controlnet(model: TCANModel, controlnet_path: str | os.PathLike, temporal: str = TEMPORAL_FROM_MOTION,
                            strength: float = 1.0, start: float = 0.0, end: float = 1.0,
                            dtype: torch.dtype | None = None) -> tuple[TCANModel, str]:
    """Add the OpenPose ControlNet with temporal layers: ``temporal`` is TEMPORAL_FROM_MOTION, TEMPORAL_OFF
    or the path of the authors' temporal ControlNet checkpoint."""
    from ..models.controlnet import load_controlnet
    from ..models.tcan_ckpt import load_temporal_controlnet
    from .controlnet_t import TemporalLayers

    dtype = dtype or next(model.unet.parameters()).dtype
    controlnet, det = load_controlnet(controlnet_path, dtype=dtype)
    name = Path(controlnet_path).name
    if temporal == TEMPORAL_OFF:
        layers, how = None, "temporal layers off (frozen per-frame ControlNet)"
    elif temporal == TEMPORAL_FROM_MOTION:
        motion = model.patch("motion")
        if motion is None:
            raise ValueError("temporal layers 'from motion module' need a motion module on the model: connect "
                             "TCAN Motion Module before TCAN Temporal ControlNet, or set temporal layers to 'off' "
                             "or to a TCAN temporal ControlNet checkpoint")
        layers = TemporalLayers.from_motion_adapter(motion.adapter)
        how = f"temporal layers in down blocks 2 and 3 shared with the motion module {Path(motion.source).name}"
    else:
        own, modules = load_temporal_controlnet(temporal, dtype=dtype)
        if own is not None:
            controlnet = own
            name = f"{Path(temporal).name} (its own ControlNet weights)"
        layers = TemporalLayers.from_modules(modules)
        how = f"temporal layers from {Path(temporal).name}"
    patch = ControlNetPatch(controlnet, str(controlnet_path), layers, float(strength), float(start), float(end))
    report = (f"ControlNet {name} ({det.format}); {how}; strength {strength:g}, steps {start:g}..{end:g} of the run; "
              "runs once per window at batch 1, its residuals shared by both halves of guidance.")
    return model.with_patch(patch), report


def add_ptm(model: TCANModel, tau: float) -> tuple[TCANModel, str]:
    """Add TCAN's pose-driven temperature map with ``tau`` (0 turns it off)."""
    patch = PTMPatch(float(tau))
    patch.motion_of(model)
    report = ("PTM off (tau 0): plain temporal attention." if tau == 0 else
              f"PTM tau {tau:g}: temporal attention logits divided by T = {tau:g} * distance to the pose + 1.")
    return model.with_patch(patch), report
