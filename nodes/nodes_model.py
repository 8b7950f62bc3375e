"""TCAN model nodes: TCAN Load Model and the patch nodes (thin over ``tcan_core.animation.build``).

Every patch node returns a clone of the model it gets, with one more patch recorded; the input
model is never changed, so two branches of a graph never see each other's patches.
"""

from __future__ import annotations

import logging

import torch

from tcan_core.animation import build
from tcan_core.animation.ptm import DEFAULT_TAU, window_previews
from tcan_core.animation.windows import DEFAULT_CONTEXT_LENGTH, DEFAULT_CONTEXT_OVERLAP

from . import host
from .common import CATEGORY, with_report
from .previews import with_preview

log = logging.getLogger(__name__)

NONE = "none"
TRAINING_FREE = "none (training-free: base UNet)"
MODEL_CATEGORY = f"{CATEGORY}/model"
MODEL_TOOLTIP = "The TCAN model (TCAN Load Model, then any of the TCAN patch nodes)."


class TCANLoadModel:
    DESCRIPTION = (
        "Loads the SD1.5 UNet of a checkpoint file as a TCAN model. In a graph with Load Checkpoint, use TCAN "
        "Model from MODEL instead: it shares that MODEL's weights (one copy in memory) and sees its LoRAs. "
        "Optional: an appearance UNet trained with TCAN (models/tcan); without one the base UNet's weights also "
        "serve as the appearance UNet (training-free mode)."
    )
    CATEGORY = MODEL_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("TCAN_MODEL",)
    RETURN_NAMES = ("tcan_model",)
    OUTPUT_TOOLTIPS = ("the TCAN model: denoising UNet + appearance UNet, no patches yet",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (host.list_models("checkpoints"), {
                "tooltip": "An SD1.5 checkpoint (single file or diffusers folder) from models/checkpoints."}),
            "appearance_unet": ([TRAINING_FREE] + host.list_models("tcan"), {
                "default": TRAINING_FREE,
                "tooltip": "TCAN stage-1 appearance UNet (the authors' .ckpt or the pack's .safetensors) from "
                           "models/tcan, or none to use the base UNet (training-free)."}),
        }}

    def load(self, ckpt_name: str, appearance_unet: str):
        appearance = None if appearance_unet == TRAINING_FREE else host.model_path("tcan", appearance_unet)
        model, report = build.load_tcan_model(host.model_path("checkpoints", ckpt_name), appearance,
                                              dtype=host.unet_dtype())
        return with_report(report, (model,))


class TCANMotionModule:
    DESCRIPTION = (
        "Adds AnimateDiff temporal layers (v1, v2 or v3 from models/animatediff_models) to the denoising UNet, "
        "or the motion modules of a TCAN stage-2 UNet checkpoint from models/tcan, whose APPA LoRA is added too."
    )
    CATEGORY = MODEL_CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("TCAN_MODEL",)
    RETURN_NAMES = ("tcan_model",)
    OUTPUT_TOOLTIPS = ("a clone of the model with the motion module",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tcan_model": ("TCAN_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "motion_module": (host.list_models("animatediff_models") + [NONE], {
                "tooltip": "AnimateDiff SD1.5 motion module (mm_sd_v15_v2.ckpt is TCAN's); 'none' when tcan_unet "
                           "holds the motion modules."}),
            "tcan_unet": ([NONE] + host.list_models("tcan"), {
                "default": NONE,
                "tooltip": "Optional TCAN stage-2 UNet checkpoint; when set, its motion modules replace the "
                           "AnimateDiff file and its APPA LoRA is added."}),
            "lora_strength": ("FLOAT", {
                "default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                "tooltip": "Strength of the APPA LoRA inside a TCAN stage-2 UNet checkpoint."}),
        }}

    def patch(self, tcan_model, motion_module: str, tcan_unet: str, lora_strength: float):
        if tcan_unet != NONE:
            path = host.model_path("tcan", tcan_unet)
        elif motion_module != NONE:
            path = host.model_path("animatediff_models", motion_module)
        else:
            raise ValueError("TCAN Motion Module has no file: pick an AnimateDiff motion_module (mm_sd_v15_v2.ckpt "
                             "in models/animatediff_models) or a TCAN stage-2 tcan_unet checkpoint (models/tcan)")
        model, report = build.add_motion_module(tcan_model, path, lora_strength=lora_strength)
        return with_report(report, (model,))


class TCANAppaLora:
    DESCRIPTION = (
        "Adds TCAN's APPA LoRA (rank 16 on to_q/to_k/to_v of every spatial attention) or any SD1.5 UNet LoRA "
        "from models/loras (peft, diffusers or kohya keys). A file that matches no UNet layer is an error."
    )
    CATEGORY = MODEL_CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("TCAN_MODEL",)
    RETURN_NAMES = ("tcan_model",)
    OUTPUT_TOOLTIPS = ("a clone of the model with the LoRA",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tcan_model": ("TCAN_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "lora_name": (host.list_models("loras") + [f"tcan/{n}" for n in host.list_models("tcan")], {
                "tooltip": "The LoRA file (models/loras), or a TCAN stage-1 UNet checkpoint in models/tcan (listed "
                           "as tcan/...), whose APPA LoRA is read."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "1 is the trained effect, 0 turns it off."}),
        }}

    def patch(self, tcan_model, lora_name: str, strength: float):
        if lora_name.startswith("tcan/") and lora_name[len("tcan/"):] in host.list_models("tcan"):
            path = host.model_path("tcan", lora_name[len("tcan/"):])
        else:
            path = host.model_path("loras", lora_name)
        model, report = build.add_appa_lora(tcan_model, path, strength)
        return with_report(report, (model,))


class TCANTemporalControlNet:
    DESCRIPTION = (
        "Adds the OpenPose ControlNet (frozen) with TCAN's temporal layers in its down blocks 2 and 3: shared "
        "with the motion module (training-free, as TCAN initialises them), from a TCAN temporal ControlNet "
        "checkpoint in models/tcan, or off."
    )
    CATEGORY = MODEL_CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("TCAN_MODEL",)
    RETURN_NAMES = ("tcan_model",)
    OUTPUT_TOOLTIPS = ("a clone of the model with the ControlNet",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tcan_model": ("TCAN_MODEL", {"tooltip": MODEL_TOOLTIP}),
            "controlnet_name": (host.list_models("controlnet"), {
                "tooltip": "The SD1.5 OpenPose ControlNet (control_v11p_sd15_openpose) from models/controlnet."}),
            "temporal_layers": ([build.TEMPORAL_FROM_MOTION, build.TEMPORAL_OFF] + host.list_models("tcan"), {
                "default": build.TEMPORAL_FROM_MOTION,
                "tooltip": "'from motion module' shares the motion module's down-block 2/3 layers; 'off' runs "
                           "the plain per-frame ControlNet; or pick a TCAN temporal ControlNet checkpoint."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "Scale of the ControlNet residuals."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Fraction of the steps after which the ControlNet starts."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Fraction of the steps at which the ControlNet stops."}),
        }}

    def patch(self, tcan_model, controlnet_name: str, temporal_layers: str, strength: float, start_percent: float,
              end_percent: float):
        temporal = temporal_layers
        if temporal not in (build.TEMPORAL_FROM_MOTION, build.TEMPORAL_OFF):
            temporal = host.model_path("tcan", temporal_layers)
        model, report = build.add_temporal_controlnet(tcan_model, host.model_path("controlnet", controlnet_name),
                                                      temporal, strength, start_percent, end_percent)
        return with_report(report, (model,))


class TCANPTM:
    DESCRIPTION = (
        "TCAN's Pose-driven Temperature Map: temporal attention is flattened away from the person "
        "(logits divided by T = tau * distance to the pose + 1), which holds the background still. "
        "tau 0 turns it off. Connect the pose images to see the map of each window (white: free motion, "
        "dark: held still)."
    )
    CATEGORY = MODEL_CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("TCAN_MODEL", "IMAGE")
    RETURN_NAMES = ("tcan_model", "temperature_map")
    OUTPUT_TOOLTIPS = ("a clone of the model with PTM",
                       "1/T of each window of the pose images (white = T 1 on the pose, darker = hotter)")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tcan_model": ("TCAN_MODEL", {"tooltip": MODEL_TOOLTIP}),
                "tau": ("FLOAT", {"default": DEFAULT_TAU, "min": 0.0, "max": 20.0, "step": 0.1,
                                  "tooltip": "TCAN uses 3; 0 is plain temporal attention."}),
            },
            "optional": {
                "pose_images": ("IMAGE", {"tooltip": "Rendered poses, to preview the temperature maps."}),
                "context_length": ("INT", {"default": DEFAULT_CONTEXT_LENGTH, "min": 1, "max": 128,
                                           "tooltip": "Window length of the sampler (for the preview)."}),
                "context_overlap": ("INT", {"default": DEFAULT_CONTEXT_OVERLAP, "min": 0, "max": 127,
                                            "tooltip": "Window overlap of the sampler (for the preview)."}),
            },
        }

    def patch(self, tcan_model, tau: float, pose_images: torch.Tensor | None = None,
              context_length: int = DEFAULT_CONTEXT_LENGTH, context_overlap: int = DEFAULT_CONTEXT_OVERLAP):
        model, report = build.add_ptm(tcan_model, tau)
        if pose_images is None or pose_images.shape[0] == 0:
            maps = torch.ones(1, 64, 64, 3)
        else:
            maps = window_previews(pose_images, tau, context_length, context_overlap)
            report += f" Preview: {maps.shape[0]} window(s)."
        return with_preview(report, (model, maps), maps, "ptm")


NODE_CLASS_MAPPINGS = {
    "TCANLoadModel": TCANLoadModel,
    "TCANMotionModule": TCANMotionModule,
    "TCANAppaLora": TCANAppaLora,
    "TCANTemporalControlNet": TCANTemporalControlNet,
    "TCANPTM": TCANPTM,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TCANLoadModel": "TCAN Load Model",
    "TCANMotionModule": "TCAN Motion Module",
    "TCANAppaLora": "TCAN APPA LoRA",
    "TCANTemporalControlNet": "TCAN Temporal ControlNet",
    "TCANPTM": "TCAN PTM",
}
