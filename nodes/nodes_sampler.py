"""TCAN Sampler: the TCAN model, a reference and pose images -> animated frames (thin over the sampler)."""

from __future__ import annotations

import logging

import torch

from tcan_core.animation.sampler import NOISE_MODES, SamplerSettings, sample_animation
from tcan_core.animation.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from tcan_core.animation.windows import DEFAULT_CONTEXT_LENGTH, DEFAULT_CONTEXT_OVERLAP, context_windows

from . import host
from .common import CATEGORY, with_report

log = logging.getLogger(__name__)

NODE_NAME = "TCAN Sampler"


def conditioning_tensor(conditioning, side: str) -> torch.Tensor:
    """The text context [1, tokens, C] of a CONDITIONING (first entry; more are reported, not mixed)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning or not isinstance(conditioning[0], (list, tuple)):
        raise ValueError(f"{side} must be a CONDITIONING from CLIPTextEncode, got {type(conditioning).__name__}")
    if len(conditioning) > 1:
        log.warning("%s conditioning has %d entries; the TCAN Sampler uses the first", side, len(conditioning))
    return conditioning[0][0]


class TCANSampler:
    DESCRIPTION = (
        "Animates the reference with the pose images: TCAN's appearance UNet (reference attention), temporal "
        "ControlNet, PTM and MultiDiffusion windows for any number of frames. Optional TPC calibration adds the "
        "reference aligned to each pose. Pose images and calibration are resized to width x height when their "
        "aspect ratio matches (within 2%); otherwise the node says which size to use."
    )
    CATEGORY = f"{CATEGORY}/animation"
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("frames", "latent")
    OUTPUT_TOOLTIPS = ("the animated frames, one per pose image", "the final latents (one per frame)")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tcan_model": ("TCAN_MODEL", {"tooltip": "The TCAN model with its patches."}),
                "reference": ("IMAGE", {"tooltip": "One image of the character to animate."}),
                "pose_images": ("IMAGE", {"tooltip": "Rendered OpenPose images, one per output frame "
                                                     "(TCAN Pose Render)."}),
                "positive": ("CONDITIONING", {"tooltip": "SD1.5 CLIPTextEncode; TCAN uses an empty prompt."}),
                "negative": ("CONDITIONING", {"tooltip": "SD1.5 CLIPTextEncode; TCAN uses an empty prompt."}),
                "vae": ("VAE", {"tooltip": "The SD1.5 VAE (Load Checkpoint's VAE output)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                  "control_after_generate": True,
                                  "tooltip": "Seed of the initial noise; the same seed gives the same frames."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip": "TCAN uses 25."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Guidance scale; TCAN uses 7.5, 1 turns guidance off."}),
                "scheduler": (list(SCHEDULERS), {"default": DEFAULT_SCHEDULER, "tooltip": "TCAN uses DDIM."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                  "tooltip": "Output width, a multiple of 8."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                   "tooltip": "Output height, a multiple of 8."}),
                "context_length": ("INT", {"default": DEFAULT_CONTEXT_LENGTH, "min": 1, "max": 128,
                                           "tooltip": "Frames per window (TCAN: 16)."}),
                "context_overlap": ("INT", {"default": DEFAULT_CONTEXT_OVERLAP, "min": 0, "max": 127,
                                            "tooltip": "Frames shared by neighbouring windows (TCAN: 4)."}),
                "closed_loop": ("BOOLEAN", {"default": False,
                                            "tooltip": "Windows wrap around the end so the clip loops."}),
                "initial_noise": (list(NOISE_MODES), {
                    "default": NOISE_MODES[0],
                    "tooltip": "Independent noise per frame, or one window's noise repeated along the clip "
                               "(the authors' pipeline)."}),
                "reference_out_of_uncond": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Leave the reference out of the unconditional half of guidance (TCAN), so "
                               "guidance also pushes toward the reference's appearance."}),
            },
            "optional": {
                "calibration": ("TCAN_CALIBRATION", {
                    "tooltip": "TPC calibration of the same driving frames (TCAN TPC Calibrate)."}),
            },
        }

    def sample(self, tcan_model, reference, pose_images, positive, negative, vae, seed, steps, cfg, scheduler,
               width, height, context_length, context_overlap, closed_loop, initial_noise,
               reference_out_of_uncond, calibration=None):
        settings = SamplerSettings(seed=seed, steps=steps, cfg=cfg, scheduler=scheduler, width=width, height=height,
                                   context_length=context_length, context_overlap=context_overlap,
                                   closed_loop=closed_loop, noise=initial_noise,
                                   reference_out_of_uncond=reference_out_of_uncond)
        windows = window_count(int(pose_images.shape[0]), settings)
        result = run_sampling(tcan_model, steps * windows, NODE_NAME, lambda device, progress: sample_animation(
            tcan_model, reference, pose_images, conditioning_tensor(positive, "positive"),
            conditioning_tensor(negative, "negative"), vae, settings, calibration=calibration, device=device,
            progress=progress, check_cancel=host.check_interrupt))
        report = (f"{result.frames.shape[0]} frames at {width}x{height}, {steps} {scheduler} steps x {windows} "
                  f"window(s), cfg {cfg:g}; {tcan_model.describe()}.")
        if result.notes:
            report += " " + " ".join(result.notes)
        return with_report(report, (result.frames, {"samples": result.latents}))


def window_count(frames: int, settings: SamplerSettings) -> int:
    """Windows per step for ``frames`` frames (the progress bar counts steps x windows); checks the settings."""
    settings.check()
    if frames == 0:
        return 1
    return len(context_windows(frames, settings.context_length, settings.context_overlap, settings.closed_loop))


def run_sampling(tcan_model, total: int, name: str, call):
    """``call(device, progress)`` with room made on the device for the model, the weights of a model from
    ComfyUI's MODEL loaded by ComfyUI for the call, a progress bar of ``total`` updates, and the device cache
    emptied afterwards (also on error or Cancel)."""
    device = host.torch_device()
    host.free_memory(_weights_bytes(tcan_model) * 2, device)
    try:
        with host.model_weights_loaded(tcan_model), host.Progress(total, name) as bar:
            return call(device, bar.update)
    finally:
        host.soft_empty_cache()


def _weights_bytes(model) -> int:
    """Bytes of the model's UNets (a rough size for asking the host to make room)."""
    modules = {id(m): m for m in (model.unet, model.appearance_unet) if m is not None}
    return sum(p.numel() * p.element_size() for m in modules.values() for p in m.parameters())


NODE_CLASS_MAPPINGS = {"TCANSampler": TCANSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"TCANSampler": NODE_NAME}
