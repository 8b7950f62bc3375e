"""The whole TCAN graph headless: reference image + driving video (or pose JSON) -> animated video.

The same steps the example workflow wires up in ComfyUI (DESIGN.md section 2):

1. poses: DWPose on the reference and on every driving frame (or a saved POSE_KEYPOINT JSON for
   the driving poses), smoothed, retargeted to the character (TCAN Algorithm 1) and rendered;
2. optional TPC calibration of the reference onto every driving pose;
3. the TCAN model from the models root: SD1.5 checkpoint, AnimateDiff motion module, OpenPose
   ControlNet with temporal layers from the motion module, PTM;
4. the TCAN sampler with empty prompts; the frames are written as an mp4.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from .model_folders import ModelFolders, list_model_files, resolve_in_folders
from .pose_format import PoseSequence, parse_pose_keypoint

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


@dataclass
class AnimateOptions:
    """Settings of the headless run; the defaults are TCAN's (sizes follow the reference)."""

    checkpoint: str | None = None
    motion_module: str | None = None
    controlnet: str | None = None
    width: int | None = None
    height: int | None = None
    area: int = 512 * 512
    steps: int = 25
    cfg: float = 7.5
    scheduler: str = "DDIM"
    seed: int = 0
    tau: float = 3.0
    tpc: bool = True
    max_frames: int | None = None
    retarget_mode: str = "authors_code"  # tcan_core.pose.retarget.MODES; the authors' code made TCAN's results


@dataclass
class AnimateOutputs:
    """What a headless run produced: the frames, the rendered poses and the calibration (if any)."""

    frames: np.ndarray
    poses: np.ndarray
    reference: np.ndarray
    calibration: object | None
    temperature: np.ndarray | None
    report: list[str]


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> RGB uint8 [H,W,3]."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read the image {path}; give a PNG or JPEG file")
    return np.ascontiguousarray(image[..., ::-1])


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """A video file -> (RGB uint8 [F,H,W,3], fps)."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open the video {path}; give an mp4/mov/avi/webm file or a pose JSON")
    fps = capture.get(cv2.CAP_PROP_FPS) or 12.0
    frames = []
    while max_frames is None or len(frames) < max_frames:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    capture.release()
    if not frames:
        raise ValueError(f"the video {path} has no readable frames")
    return np.ascontiguousarray(np.stack(frames)), float(fps)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 12.0) -> bool:
    """RGB uint8 [F,H,W,3] -> an mp4 (mp4v); False when no encoder is available."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        return False
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    return path.is_file() and path.stat().st_size > 0


def pick_model(folders: ModelFolders, folder: str, name: str | None, what: str) -> Path:
    """The file ``name`` in ``folder`` (resolved inside it), or the first file there; a clear error if none."""
    dirs = folders.paths(folder)
    if name is not None:
        return Path(resolve_in_folders(folder, name, dirs))
    names = list_model_files(dirs, folders.extensions(folder))
    if not names:
        raise FileNotFoundError(f"no {what} found; searched {', '.join(dirs)}. Run `python -m tcan_core doctor "
                                f"--models {folders.root}` to see which files are expected and where they are published")
    return Path(resolve_in_folders(folder, names[0], dirs))


def extract_poses_from(frames: np.ndarray, pose_folders: Sequence[str]) -> PoseSequence:
    """DWPose on ``frames`` [F,H,W,3] uint8 -> one person's poses."""
    from .pose.extract import BACKEND_DWPOSE, extract_poses, load_backend

    backend = load_backend(BACKEND_DWPOSE, pose_folders)
    return extract_poses(frames, backend).poses


def animate(reference: np.ndarray, driving_poses: PoseSequence, models: ModelFolders,
            reference_pose: PoseSequence | None = None, options: AnimateOptions = AnimateOptions(),
            progress: Callable[[int, torch.Tensor | None], None] | None = None) -> AnimateOutputs:
    """Reference RGB uint8 [H,W,3] + driving poses -> animated frames uint8 [F,h,w,3] (see the module docstring)."""
    from .animation import build
    from .animation.ptm import window_previews
    from .animation.sampler import SamplerSettings, sample_animation, size_for_aspect
    from .animation.text import encode_empty_prompt
    from .animation.vae import DiffusersVAE
    from .pose.render import render_poses
    from .pose.retarget import retarget_poses
    from .pose.smooth import smooth_poses
    from .tpc import calibrate

    report: list[str] = []
    if reference_pose is None:
        reference_pose = extract_poses_from(reference[None], models.paths("tcan_pose"))
    if options.max_frames is not None:
        driving_poses = driving_poses.first(options.max_frames)
    smoothed = smooth_poses(driving_poses).poses
    retargeted = retarget_poses(reference_pose, smoothed, canvas="reference", mode=options.retarget_mode)
    ref_h, ref_w = reference.shape[:2]
    width, height = (options.width, options.height) if options.width and options.height else \
        size_for_aspect(ref_w / ref_h, options.area)
    rendered = render_poses(retargeted.poses, width, height)
    report.append(f"{rendered.shape[0]} poses retargeted to the character (body scale "
                  f"{retargeted.body_scale:.2f}) and rendered at {width}x{height}")

    calibration = None
    if options.tpc:
        calibration = calibrate(reference.astype(np.float32) / 255.0, reference_pose, retargeted.poses,
                                keypoint_set="body")
        report.append(calibration.summary().splitlines()[0])

    model, line = build.load_tcan_model(pick_model(models, "checkpoints", options.checkpoint, "SD1.5 checkpoint"),
                                        with_vae_and_text=True)
    report.append(line)
    model, line = build.add_motion_module(
        model, pick_model(models, "animatediff_models", options.motion_module, "AnimateDiff motion module"))
    report.append(line)
    model, line = build.add_temporal_controlnet(
        model, pick_model(models, "controlnet", options.controlnet, "OpenPose ControlNet"))
    report.append(line)
    model, line = build.add_ptm(model, options.tau)
    report.append(line)

    context = encode_empty_prompt(model.text_encoder)
    ref_tensor = torch.from_numpy(reference).float()[None] / 255.0
    pose_tensor = torch.from_numpy(rendered).float() / 255.0
    settings = SamplerSettings(seed=options.seed, steps=options.steps, cfg=options.cfg, scheduler=options.scheduler,
                               width=width, height=height)
    result = sample_animation(model, ref_tensor, pose_tensor, context, context, DiffusersVAE(model.vae), settings,
                              calibration=calibration, progress=progress)
    frames = (result.frames.numpy() * 255.0).round().astype(np.uint8)
    temperature = None
    if options.tau > 0:
        temperature = window_previews(pose_tensor, options.tau)[0, ..., 0].numpy()
    return AnimateOutputs(frames=frames, poses=rendered, reference=reference, calibration=calibration,
                          temperature=temperature, report=report)


def load_driving(path: str | Path, models: ModelFolders, max_frames: int | None = None) -> tuple[PoseSequence, float]:
    """A driving video (DWPose on every frame) or a POSE_KEYPOINT JSON -> (poses, fps)."""
    from .pose.pose_json import load_pose_json

    path = Path(path)
    if path.suffix.lower() == ".json":
        poses = parse_pose_keypoint(load_pose_json(path))
        return poses, 12.0
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"the driving input {path} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a pose "
                         "JSON (.json from TCAN Pose Save)")
    frames, fps = read_video(path, max_frames)
    return extract_poses_from(frames, models.paths("tcan_pose")), fps
