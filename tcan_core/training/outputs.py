"""What a training stage leaves behind: weight files the existing nodes load, and validation clips.

Stage 1 writes ``appearance_unet.safetensors`` (the full diffusers UNet; TCAN Load Model's
appearance_unet) and ``appa_lora.safetensors`` (peft keys with diffusers' ``lora_adapter_metadata``;
TCAN APPA LoRA). Stage 2 writes ``motion_module.safetensors`` (diffusers ``MotionAdapter`` keys;
TCAN Motion Module) and ``temporal_controlnet.safetensors`` (the ControlNet's temporal layers,
``down_blocks.{2,3}.motion_modules.*``; TCAN Temporal ControlNet's temporal_layers). Every file
carries metadata: ``tcan_stage``, ``tcan_part``, ``tcan_base``, ``tcan_steps`` and the run's settings
as JSON in ``tcan_settings``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .checkpoint import save_safetensors

log = logging.getLogger(__name__)

APPEARANCE_FILE = "appearance_unet.safetensors"
LORA_FILE = "appa_lora.safetensors"
MOTION_FILE = "motion_module.safetensors"
TEMPORAL_FILE = "temporal_controlnet.safetensors"
STAGE_FILES = {1: (APPEARANCE_FILE, LORA_FILE), 2: (MOTION_FILE, TEMPORAL_FILE)}

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The peft LoRA factors of ``unet`` as ``<path>.lora_A.weight`` / ``<path>.lora_B.weight``."""
    from peft.utils import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(unet))


def file_metadata(stage: int, part: str, base: str, steps: int, settings: Mapping[str, Any]) -> dict[str, str]:
    """The metadata every output file carries."""
    return {"tcan_stage": str(stage), "tcan_part": part, "tcan_base": base, "tcan_steps": str(steps),
            "tcan_settings": json.dumps(settings, sort_keys=True, default=str)}


def save_stage_files(out: Path, stage: int, parts: Mapping[str, torch.nn.Module | None], trained_appearance: bool,
                     lora: Mapping[str, float] | None, base: str, steps: int, settings: Mapping[str, Any],
                     dtype: torch.dtype) -> dict[str, Path]:
    """Write the stage's weight files into ``out`` (atomically) -> {file name: path}.

    ``parts`` holds ``unet``, ``appearance``, ``motion`` and ``temporal``; ``lora`` the LoRA's rank and
    alpha (None: no LoRA was trained); ``trained_appearance`` False leaves the appearance UNet out (a
    LoRA-only fine-tune does not change it).
    """
    def cast(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in sd.items()}

    written: dict[str, Path] = {}
    if stage == 1:
        if trained_appearance:
            meta = file_metadata(stage, "appearance_unet", base, steps, settings)
            written[APPEARANCE_FILE] = save_safetensors(out / APPEARANCE_FILE, cast(parts["appearance"].state_dict()),
                                                        meta)
        if lora is not None:
            meta = file_metadata(stage, "appa_lora", base, steps, settings)
            meta["lora_adapter_metadata"] = json.dumps({"r": int(lora["rank"]), "lora_alpha": float(lora["alpha"]),
                                                        "target_modules": list(lora["targets"])})
            written[LORA_FILE] = save_safetensors(out / LORA_FILE, cast(lora_state_dict(parts["unet"])), meta)
    else:
        written[MOTION_FILE] = save_safetensors(out / MOTION_FILE, cast(parts["motion"].state_dict()),
                                                file_metadata(stage, "motion_module", base, steps, settings))
        written[TEMPORAL_FILE] = save_safetensors(out / TEMPORAL_FILE, cast(parts["temporal"].state_dict()),
                                                  file_metadata(stage, "temporal_controlnet", base, steps, settings))
    for name, path in written.items():
        log.info("wrote %s", path)
    return written


def contact_sheet(rows: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """Rows of frames (each RGB uint8 [N,H,W,3], same H and W) -> one image: up to ``columns`` frames per
    row, spread evenly over each row's frames."""
    height, width = rows[0].shape[1:3]
    sheet = np.zeros((height * len(rows), width * columns, 3), dtype=np.uint8)
    for r, frames in enumerate(rows):
        picks = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        for c, index in enumerate(picks):
            sheet[r * height:(r + 1) * height, c * width:(c + 1) * width] = frames[index]
    return sheet
