"""``python -m tcan_core demo``: the tiny model set, run through the whole TCAN graph on the CPU.

Writes into OUT: ``models/`` (the tiny models in their real formats), ``doctor.txt``,
``reference.png`` with ``reference_pose.json`` and ``driving_pose.json`` (inputs for ``animate``), ``pose_retargeted.png`` / ``pose_retargeted.mp4`` (the synthetic dance
retargeted to the character and drawn for the OpenPose ControlNet), ``tpc_preview.png`` (the
character calibrated to every fourth pose), ``temperature_map.png`` (PTM of the first window:
white is the pose, darker is held still) and ``animation.png`` / ``animation.mp4`` (the frames the
TCAN sampler made with the tiny models: noise-like, since tiny random weights draw nothing, but
made by the same code path as a real run).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .demo_scene import character_image, character_pose, driving_dance
from .doctor import format_report, run_doctor
from .model_folders import ModelFolders
from .models.controlnet import load_controlnet
from .models.motion_module import load_motion_module
from .models.sd15 import load_sd15
from .pose.render import render_poses
from .pose.retarget import retarget_poses
from .pose.smooth import smooth_poses
from .tiny.tree import write_demo_tree
from .tpc import calibrate
from .tpc.preview import preview_frames
from .pipeline import AnimateOptions, animate
from .video_io import write_frames
from .pose.pose_json import save_pose_json
from .pose_format import to_pose_keypoint

# Small enough to run the whole graph on a laptop CPU in seconds; a real run uses 25 steps at 512x512.
DEMO_STEPS = 4
DEMO_AREA = 120 * 160


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")


def _sheet(frames: np.ndarray, step: int) -> np.ndarray:
    """Every ``step``-th frame of ``[F,H,W,3]`` side by side."""
    return np.concatenate(list(frames[::step]), axis=1)


def run_demo(out: Path) -> Iterator[str]:
    """Run the demo into ``out``, yielding one line of progress at a time."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tree = write_demo_tree(out / "models")
    yield f"tiny models written to {tree.root} ({time.perf_counter() - start:.1f} s)"
    report = format_report(run_doctor(ModelFolders(tree.root)))
    (out / "doctor.txt").write_text(report + "\n")
    yield report

    sd = load_sd15(tree.files["sd15_safetensors"])
    with torch.no_grad():
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        text = sd.text_encoder(torch.tensor([[49406, 49407] + [49407] * 75]))[0]
        eps = sd.unet(latent, 999, encoder_hidden_states=text).sample
        image = sd.vae.decode(latent / sd.vae.config.scaling_factor).sample
    yield (f"SD1.5 loaded ({sd.detection.describe()}): UNet eps {tuple(eps.shape)}, "
           f"VAE decode {tuple(image.shape)}")
    _, det = load_controlnet(tree.files["controlnet_ldm"])
    yield f"ControlNet loaded ({det.describe()})"
    for version in ("v1", "v2", "v3"):
        _, det = load_motion_module(tree.files[f"motion_{version}"])
        yield f"motion module loaded ({det.describe()})"

    dance = driving_dance(frames=24)
    character = character_pose()
    reference = character_image(character)
    _save_png(out / "reference.png", reference)
    save_pose_json(to_pose_keypoint(character), out / "reference_pose.json")
    save_pose_json(to_pose_keypoint(dance), out / "driving_pose.json")
    smoothed = smooth_poses(dance).poses
    retargeted = retarget_poses(character, smoothed, canvas="reference")
    rendered = render_poses(retargeted.poses)
    _save_png(out / "pose_retargeted.png", _sheet(rendered, 4))
    write_frames(out / "pose_retargeted.mp4", rendered)
    video = "and pose_retargeted.mp4"
    yield (f"poses: {dance.num_frames} driving frames smoothed and retargeted to the character "
           f"(body scale {retargeted.body_scale:.2f}); wrote pose_retargeted.png {video}")

    cal = calibrate(reference.astype(np.float32) / 255.0, character, retargeted.poses, keypoint_set="body")
    preview = (preview_frames(cal).numpy() * 255).round().astype(np.uint8)
    _save_png(out / "tpc_preview.png", _sheet(preview, 4))
    yield f"{cal.summary().splitlines()[0]} Wrote tpc_preview.png."

    # The model files are picked as `animate` picks them (the first each loader accepts), so the two agree.
    options = AnimateOptions(steps=DEMO_STEPS, area=DEMO_AREA, tau=3.0, tpc=True)
    started = time.perf_counter()
    result = animate(reference, dance, ModelFolders(tree.root), reference_pose=character, options=options)
    for line in result.report:
        yield line
    _save_png(out / "animation.png", _sheet(result.frames, 4))
    write_frames(out / "animation.mp4", result.frames)
    video = "and animation.mp4"
    if result.temperature is not None:
        _save_png(out / "temperature_map.png", (np.repeat(result.temperature[..., None], 3, -1) * 255).astype(np.uint8))
    height, width = result.frames.shape[1:3]
    yield (f"TCAN sampler: {len(result.frames)} frames at {width}x{height}, {DEMO_STEPS} DDIM steps, windows 16/4, "
           f"in {time.perf_counter() - started:.1f} s; wrote animation.png {video} and temperature_map.png")
    yield f"demo finished in {time.perf_counter() - start:.1f} s; outputs in {out}"
