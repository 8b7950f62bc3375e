"""TCAN Model from MODEL: the TCAN model from ComfyUI's own MODEL (thin over ``host.tcan_model_from_comfy``).

A separate node rather than an optional input of TCAN Load Model: Load Model's required checkpoint
widget would mean nothing once a MODEL is connected, and a graph should show where its weights come
from. Load Model stays for graphs without Load Checkpoint and for the headless command line.
"""

from __future__ import annotations

import logging

from . import host
from .common import with_report
from .nodes_model import MODEL_CATEGORY, TRAINING_FREE

log = logging.getLogger(__name__)


class TCANModelFromMODEL:
    DESCRIPTION = (
        "Makes the TCAN model from ComfyUI's MODEL (Load Checkpoint's MODEL output, after any core LoRA loader "
        "or model merge). The weights are shared, not copied, and ComfyUI applies its patches to them while the "
        "TCAN Sampler runs; the MODEL itself is left unchanged. Optional: an appearance UNet trained with TCAN "
        "(models/tcan); without one the base UNet also serves as the appearance UNet (training-free mode)."
    )
    CATEGORY = MODEL_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("TCAN_MODEL",)
    RETURN_NAMES = ("tcan_model",)
    OUTPUT_TOOLTIPS = ("the TCAN model: denoising UNet (the MODEL's weights) + appearance UNet, no TCAN patches yet",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 MODEL: Load Checkpoint's MODEL output, optionally through "
                                           "Load LoRA / LoraLoaderModelOnly or a model merge."}),
            "appearance_unet": ([TRAINING_FREE] + host.list_models("tcan"), {
                "default": TRAINING_FREE,
                "tooltip": "TCAN stage-1 appearance UNet (the authors' .ckpt or the pack's .safetensors) from "
                           "models/tcan, or none to use the base UNet (training-free)."}),
        }}

    def load(self, model, appearance_unet: str):
        appearance = None if appearance_unet == TRAINING_FREE else host.model_path("tcan", appearance_unet)
        tcan_model, report = host.tcan_model_from_comfy(model, appearance)
        return with_report(report, (tcan_model,))


NODE_CLASS_MAPPINGS = {"TCANModelFromMODEL": TCANModelFromMODEL}
NODE_DISPLAY_NAME_MAPPINGS = {"TCANModelFromMODEL": "TCAN Model from MODEL"}
