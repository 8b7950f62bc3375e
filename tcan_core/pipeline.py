"""The whole TCAN graph headless: reference image + driving video (or pose JSON) -> animated video.

The same steps the example workflow wires up in ComfyUI (DESIGN.md section 2):

1. poses: DWPose on the reference and on every driving frame (or a saved POSE_KEYPOINT JSON for
   the driving poses), smoothed, retargeted to the character (TCAN Algorithm 1) and rendered;
2. optional TPC calibration of the reference onto every driving pose;
3. the TCAN model from the models root: SD1.5 checkpoint, AnimateDiff motion module, OpenPose
   ControlNet with temporal layers from the motion module, PTM;
4. the TCAN sampler with empty prompts; the command line writes the frames by the output's extension
   (:mod:`tcan_core.video_io`: H.264 video, animated GIF or WebP, or PNG frames).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .model_folders import ModelFolders, list_model_files, resolve_in_folders
from .pose_format import PoseSequence, parse_pose_keypoint
from .video_io import VIDEO_INPUT_SUFFIXES, read_image, read_video, write_frames

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = VIDEO_INPUT_SUFFIXES
# The Sampler node's seed widget goes up to 2**64 - 1; the command line takes the same range.
MAX_SEED = 2**64 - 1

__all__ = ["AnimateOptions", "AnimateOutputs", "ModelChoice", "animate", "check_driving_path", "check_options",
           "extract_poses_from",
           "load_driving", "output_size", "pick_model", "pick_models", "read_image", "read_video", "write_frames"]


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


def check_options(options: AnimateOptions) -> None:
    """Raise a ValueError naming the first bad setting; cheap, so it runs before any pose or model work."""
    from .animation.sampler import SamplerSettings

    # A side left out follows the reference's aspect; the one given must be valid on its own.
    SamplerSettings(seed=options.seed, steps=options.steps, cfg=options.cfg, scheduler=options.scheduler,
                    width=options.width or 512, height=options.height or 512).check()
    if not 0 <= options.seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED} (2**64 - 1), got {options.seed}")
    if not math.isfinite(options.tau) or options.tau < 0:
        raise ValueError(f"tau must be 0 or more, got {options.tau}; TCAN uses 3 (0 turns PTM off)")
    if options.max_frames is not None and options.max_frames < 1:
        raise ValueError(f"max frames must be at least 1, got {options.max_frames}; leave it out to use every "
                         "driving frame")
    if options.area < 64 * 64:
        raise ValueError(f"area must be at least 64x64 pixels, got {options.area}")


def output_size(reference_width: int, reference_height: int, width: int | None, height: int | None,
                area: int = 512 * 512) -> tuple[int, int]:
    """(width, height) of the output: as given; one side given -> the other from the reference's aspect
    (a multiple of 8, at least 64); neither -> the reference's aspect at about ``area`` pixels."""
    from .animation.sampler import size_for_aspect

    aspect = reference_width / reference_height
    if width and height:
        return width, height
    if width:
        return width, max(64, round(width / aspect / 8) * 8)
    if height:
        return max(64, round(height * aspect / 8) * 8), height
    return size_for_aspect(aspect, area)


@dataclass
class ModelChoice:
    """A model file chosen for a slot, and the line that says which and why."""

    path: Path
    line: str


def _model_checks() -> dict[str, tuple[str, Callable[[Path], object]]]:
    """folder -> (what it holds, the loader's own check that raises for a file the loader would refuse)."""
    from .models.controlnet import check_controlnet
    from .models.motion_module import check_motion_module
    from .models.sd15 import check_sd15

    return {"checkpoints": ("SD1.5 checkpoint", check_sd15),
            "animatediff_models": ("AnimateDiff motion module", check_motion_module),
            "controlnet": ("OpenPose ControlNet", check_controlnet)}


def pick_model(folders: ModelFolders, folder: str, name: str | None) -> ModelChoice:
    """The file ``name`` in ``folder`` (checked as its loader checks it), or the first file there the loader accepts."""
    from .models.errors import ModelFileError, ModelFormatError

    what, check = _model_checks()[folder]
    dirs = folders.paths(folder)
    if name is not None:
        path = Path(resolve_in_folders(folder, name, dirs))
        check(path)
        return ModelChoice(path, f"{what}: {name} (as asked)")
    names = list_model_files(dirs, folders.extensions(folder))
    skipped: list[str] = []
    for candidate in names:
        path = Path(resolve_in_folders(folder, candidate, dirs))
        try:
            check(path)
        except (ModelFileError, ModelFormatError, OSError) as exc:
            skipped.append(f"{candidate} ({str(exc).splitlines()[0]})")
            continue
        note = f"; skipped {len(skipped)} file(s) the loader refuses: " + "; ".join(skipped) if skipped else ""
        return ModelChoice(path, f"{what}: {candidate} (the first usable file in {folder}){note}")
    tried = ("; the files there are refused by the loader: " + "; ".join(skipped)) if skipped else ""
    raise FileNotFoundError(f"no usable {what} found; searched {', '.join(dirs)}{tried}. Run `python -m tcan_core "
                            f"doctor --models {folders.root}` to see which files are expected and where they "
                            "are published")


def pick_models(folders: ModelFolders, options: AnimateOptions) -> dict[str, ModelChoice]:
    """The checkpoint, motion module and ControlNet a run uses: those named in ``options`` or the first usable ones."""
    return {"checkpoints": pick_model(folders, "checkpoints", options.checkpoint),
            "animatediff_models": pick_model(folders, "animatediff_models", options.motion_module),
            "controlnet": pick_model(folders, "controlnet", options.controlnet)}


def extract_poses_from(frames: np.ndarray, pose_folders: Sequence[str],
                       progress: Callable[[int], None] | None = None) -> PoseSequence:
    """DWPose on ``frames`` [F,H,W,3] uint8 -> one person's poses; ``progress(n)`` after every ``n`` frames."""
    from .pose.extract import BACKEND_DWPOSE, extract_poses, load_backend

    backend = load_backend(BACKEND_DWPOSE, pose_folders)
    return extract_poses(frames, backend, progress=progress).poses


def animate(reference: np.ndarray, driving_poses: PoseSequence, models: ModelFolders,
            reference_pose: PoseSequence | None = None, options: AnimateOptions = AnimateOptions(),
            progress: Callable[[int, torch.Tensor | None], None] | None = None,
            chosen: dict[str, ModelChoice] | None = None,
            on_stage: Callable[[str], None] | None = None) -> AnimateOutputs:
    """Reference RGB uint8 [H,W,3] + driving poses -> animated frames uint8 [F,h,w,3] (see the module docstring).

    ``chosen`` are the model files from :func:`pick_models` (picked here when not given);
    ``on_stage(line)`` is called with each line of the report as soon as its stage finishes.
    """
    from .animation import build
    from .animation.ptm import window_previews
    from .animation.sampler import SamplerSettings, sample_animation
    from .animation.text import encode_empty_prompt
    from .animation.vae import DiffusersVAE
    from .pose.render import render_poses
    from .pose.retarget import retarget_poses
    from .pose.smooth import smooth_poses
    from .tpc import calibrate

    report: list[str] = []

    def stage(line: str) -> None:
        report.append(line)
        if on_stage is not None:
            on_stage(line)

    # 0. Every setting and every model file is checked before any heavy work.
    check_options(options)
    if chosen is None:
        chosen = pick_models(models, options)
    for choice in chosen.values():
        stage(choice.line)

    if reference_pose is None:
        reference_pose = extract_poses_from(reference[None], models.paths("tcan_pose"))
    if options.max_frames is not None:
        driving_poses = driving_poses.first(options.max_frames)
    smoothed = smooth_poses(driving_poses).poses
    retargeted = retarget_poses(reference_pose, smoothed, canvas="reference", mode=options.retarget_mode)
    ref_h, ref_w = reference.shape[:2]
    width, height = output_size(ref_w, ref_h, options.width, options.height, options.area)
    SamplerSettings(width=width, height=height).check()
    rendered = render_poses(retargeted.poses, width, height)
    stage(f"{rendered.shape[0]} poses retargeted to the character (body scale "
          f"{retargeted.body_scale:.2f}) and rendered at {width}x{height}")

    calibration = None
    if options.tpc:
        calibration = calibrate(reference.astype(np.float32) / 255.0, reference_pose, retargeted.poses,
                                keypoint_set="body")
        stage(calibration.summary().splitlines()[0])

    model, line = build.load_tcan_model(chosen["checkpoints"].path, with_vae_and_text=True)
    stage(line)
    model, line = build.add_motion_module(model, chosen["animatediff_models"].path)
    stage(line)
    model, line = build.add_temporal_controlnet(model, chosen["controlnet"].path)
    stage(line)
    model, line = build.add_ptm(model, options.tau)
    stage(line)

    context = encode_empty_prompt(model.text_encoder)
    ref_tensor = torch.from_numpy(reference).float()[None] / 255.0
    pose_tensor = torch.from_numpy(rendered).float() / 255.0
    settings = SamplerSettings(seed=options.seed, steps=options.steps, cfg=options.cfg, scheduler=options.scheduler,
                               width=width, height=height)
    result = sample_animation(model, ref_tensor, pose_tensor, context, context, DiffusersVAE(model.vae), settings,
                              calibration=calibration, progress=progress)
    frames = (result.frames.numpy() * 255.0).round().astype(np.uint8)
    stage(f"sampled {len(frames)} frames at {width}x{height} ({options.steps} {options.scheduler} steps)")
    temperature = None
    if options.tau > 0:
        temperature = window_previews(pose_tensor, options.tau)[0, ..., 0].numpy()
    return AnimateOutputs(frames=frames, poses=rendered, reference=reference, calibration=calibration,
                          temperature=temperature, report=report)


def check_driving_path(path: str | Path) -> str:
    """'json' or 'video' for a driving input that exists and has a known extension; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the driving input {path} does not exist; give a video or a pose JSON "
                                "(from TCAN Pose Save)")
    if path.suffix.lower() == ".json":
        return "json"
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"the driving input {path} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a pose "
                         "JSON (.json from TCAN Pose Save)")
    return "video"


def load_driving(path: str | Path, models: ModelFolders, max_frames: int | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[PoseSequence, float]:
    """A driving video (DWPose on every frame) or a POSE_KEYPOINT JSON -> (poses, fps)."""
    from .pose.pose_json import load_pose_json

    if check_driving_path(path) == "json":
        return parse_pose_keypoint(load_pose_json(path)), 12.0
    frames, fps = read_video(path, max_frames)
    return extract_poses_from(frames, models.paths("tcan_pose"), progress), fps
