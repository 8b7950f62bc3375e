"""The command line: ``doctor`` (which model files are found), ``animate``, ``prepare-data`` (videos into a
training set), ``train`` (TCAN's two training stages), ``evaluate``, ``tiny-models`` and ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("tcan_core")


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import format_report, run_doctor
    from .model_folders import ModelFolders

    reports = run_doctor(ModelFolders(args.models), inspect=not args.no_inspect)
    print(f"Models root: {Path(args.models).resolve()}")
    print(format_report(reports))
    return 0 if all(r.found for r in reports if r.slot.required) else 1


class MissingPackageError(ImportError):
    """A command needs a package that is not installed; the message names it and the pip command."""


def _require_onnx(command: str) -> None:
    """The tiny pose and face models are written with the ``onnx`` package, which only requirements-dev.txt installs."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingPackageError(
            f"`{command}` writes tiny ONNX pose and face models with the 'onnx' package, which is not installed "
            "(requirements.txt leaves it out: the nodes do not need it). Install it with `pip install onnx` "
            "(or `pip install -r requirements-dev.txt`), then run the command again.") from None


def _tiny_models(args: argparse.Namespace) -> int:
    _require_onnx("tiny-models")
    from .tiny.tree import write_demo_tree

    tree = write_demo_tree(args.out)
    for key, path in sorted(tree.files.items()):
        print(f"{key:24s} {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    _require_onnx("demo")
    from .demo import run_demo

    for line in run_demo(Path(args.out)):
        print(line, flush=True)
    return 0


def _say(line: str) -> None:
    """One finished stage, printed at once (also when the output is piped to a file or another program)."""
    print(line, flush=True)


def _progress_bar(**kwargs):
    """tqdm on stderr, shown also when stderr is not a terminal (piped), with fewer updates there."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(file=sys.stderr, disable=False, mininterval=0.1 if interactive else 5.0, **kwargs)


def _animate(args: argparse.Namespace) -> int:
    from .model_folders import ModelFolders
    from .pipeline import (AnimateOptions, animate, check_driving_path, check_options, extract_poses_from,
                           load_driving, pick_models)
    from .video_io import check_output_path, read_image, read_video, write_frames

    # 1. Every setting, the output's format and the input files, before any heavy work.
    options = AnimateOptions(checkpoint=args.checkpoint, motion_module=args.motion_module, controlnet=args.controlnet,
                             width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
                             scheduler=args.scheduler, seed=args.seed, tau=args.tau, tpc=not args.no_tpc,
                             max_frames=args.max_frames, retarget_mode=args.retarget_mode)
    check_options(options)
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps must be above 0, got {args.fps}; leave it out to use the driving video's frame rate")
    check_output_path(args.out)
    driving_kind = check_driving_path(args.driving)
    for what, path in (("reference image", args.reference), ("reference pose", args.reference_pose)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"the {what} {path} does not exist; check the path")
    models = ModelFolders(args.models)
    chosen = pick_models(models, options)
    reference = read_image(args.reference)

    # 2. Poses, model and sampling, each stage printed as it finishes.
    if args.reference_pose:
        from .pose.pose_json import load_pose_json
        from .pose_format import parse_pose_keypoint

        reference_pose = parse_pose_keypoint(load_pose_json(args.reference_pose))
    else:
        reference_pose = extract_poses_from(reference[None], models.paths("tcan_pose"))
        _say(f"reference pose from DWPose on {args.reference}")
    if driving_kind == "json":
        driving, fps = load_driving(args.driving, models, args.max_frames)
    else:
        frames, fps = read_video(args.driving, args.max_frames)
        with _progress_bar(desc="DWPose on the driving video", total=len(frames), unit="frame") as bar:
            driving = extract_poses_from(frames, models.paths("tcan_pose"), progress=bar.update)
    _say(f"{driving.num_frames} driving poses from {args.driving}")
    with _progress_bar(desc="TCAN sampling", unit="window") as bar:
        result = animate(reference, driving, models, reference_pose, options,
                         progress=lambda n, preview: bar.update(n), chosen=chosen, on_stage=_say)
    written = write_frames(args.out, result.frames, args.fps if args.fps is not None else fps)
    height, width = result.frames.shape[1:3]
    _say(f"wrote {len(result.frames)} frames ({width}x{height}): {written}")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .model_folders import ModelFolders
    from .training.prepare import prepare_data

    def say(line: str) -> None:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with _progress_bar(desc="DWPose", total=0, unit="frame") as bar:
        def on_clip(name: str, frames: int) -> None:
            bar.total += frames
            bar.set_description(f"DWPose on {name}")

        try:
            report = prepare_data(args.videos, args.out, ModelFolders(args.models).paths("tcan_pose"),
                                  max_side=args.max_side, max_frames=args.max_frames, overwrite=args.overwrite,
                                  device=device, progress=bar.update, on_clip=on_clip, say=say)
        except KeyboardInterrupt:
            print(f"interrupted: the clips finished so far are kept in {args.out} (the one being prepared is "
                  "dropped); run the same command again to continue", file=sys.stderr)
            return 130
    _say(report.summary())
    if report.clips == 0:
        print(f"error: no clip could be prepared from {args.videos} (see the reasons above); give videos in which "
              "one person is clearly visible", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tcan_core",
        description="ComfyUI-TCAN headless tools: pose-driven human image animation "
                    "(TCAN, TPC, ID-Animator, TIFF, DiffSFSR).",
    )
    parser.add_argument("--version", action="version", version=f"tcan_core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("doctor", help="list the model files found for each slot and what is missing")
    p.add_argument("--models", default="models", metavar="DIR",
                   help="models root with ComfyUI's sub-folders (checkpoints, controlnet, animatediff_models, "
                        "tcan, insightface, clip_vision, ...); default ./models")
    p.add_argument("--no-inspect", action="store_true", help="list files by name only, without reading their keys")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("tiny-models", help="write the tiny test models (real formats, tiny widths) into DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="models root to create")
    p.set_defaults(func=_tiny_models)

    p = sub.add_parser("animate", help="animate a reference image with a driving video or pose JSON (the TCAN graph)")
    p.add_argument("--reference", required=True, metavar="IMG", help="image of the character (PNG/JPEG)")
    p.add_argument("--driving", required=True, metavar="VIDEO_OR_POSE_JSON",
                   help="driving video (DWPose runs on every frame) or a POSE_KEYPOINT JSON from TCAN Pose Save")
    p.add_argument("--reference-pose", metavar="JSON",
                   help="POSE_KEYPOINT JSON of the reference (default: DWPose on the reference image)")
    p.add_argument("--models", default="models", metavar="DIR", help="models root with ComfyUI's sub-folders")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="what to write, by extension: .mp4/.mov/.mkv (H.264), .gif or .webp (animated, every frame), "
                        "or a path without an extension for a folder of PNG frames")
    p.add_argument("--checkpoint", help="SD1.5 checkpoint name in DIR/checkpoints (default: the first one the loader accepts)")
    p.add_argument("--motion-module", help="motion module name in DIR/animatediff_models (default: the first one the loader accepts)")
    p.add_argument("--controlnet", help="OpenPose ControlNet name in DIR/controlnet (default: the first one the loader accepts)")
    p.add_argument("--width", type=int, help="output width (multiple of 8); alone, the height follows the reference's aspect; "
                        "default: the reference's aspect at 512x512 area")
    p.add_argument("--height", type=int, help="output height (multiple of 8); alone, the width follows the reference's aspect")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (TCAN: 25)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (TCAN: 7.5)")
    p.add_argument("--scheduler", default="DDIM", help="DDIM, Euler, Euler ancestral, DPM++ 2M or UniPC")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, 0 to 2**64-1 (as the Sampler node)")
    p.add_argument("--tau", type=float, default=3.0, help="PTM tau (TCAN: 3; 0 turns PTM off)")
    p.add_argument("--no-tpc", action="store_true", help="skip TPC calibration of the reference")
    p.add_argument("--max-frames", type=int, help="use only the first N driving frames")
    p.add_argument("--retarget-mode", choices=("authors_code", "algorithm_1"), default="authors_code",
                   help="pose retargeting: authors_code (TCAN's released code, as in the paper's results) or "
                        "algorithm_1 (the pack's earlier reading: pairs averaged, no clip on foreshortening)")
    p.add_argument("--fps", type=float, help="frame rate of the output (default: the driving video's, or 12)")
    p.set_defaults(func=_animate)

    p = sub.add_parser("prepare-data", help="turn a folder of videos into a TCAN training set (frames, DWPose, "
                                            "rendered poses, manifest); cached and resumable")
    p.add_argument("--videos", required=True, metavar="DIR",
                   help="folder of videos (.mp4/.mov/.avi/.mkv/.webm/.gif/.webp) and/or sub-folders of frames "
                        "(.png/.jpg/.jpeg/.webp), one person per clip")
    p.add_argument("--out", required=True, metavar="DATA", help="training set folder to create or continue")
    p.add_argument("--models", default="models", metavar="DIR",
                   help="models root; DWPose's yolox_l.onnx and dw-ll_ucoco_384.onnx are searched in DIR/tcan/pose "
                        "(and the folders comfyui_controlnet_aux uses)")
    p.add_argument("--max-side", type=int, default=768, metavar="N",
                   help="scale frames down so the longer side is at most N pixels (0 keeps them); default 768")
    p.add_argument("--max-frames", type=int, metavar="N", help="use only the first N frames of each clip")
    p.add_argument("--overwrite", action="store_true", help="prepare every clip again, also those already done")
    p.add_argument("--device", default=None,
                   help="where DWPose runs: cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    p.set_defaults(func=_prepare_data)

    p = sub.add_parser("demo", help="build the tiny model set and run the whole TCAN graph on the CPU")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the models, previews and report")
    p.set_defaults(func=_demo)

    from .metrics.command import add_evaluate_parser
    from .training.command import add_train_parser

    add_evaluate_parser(sub)
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, MissingPackageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
