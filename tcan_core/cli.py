"""The command line: ``doctor`` (which model files are found), ``animate``, ``tiny-models`` and ``demo``."""

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


def _tiny_models(args: argparse.Namespace) -> int:
    from .tiny.tree import write_demo_tree

    tree = write_demo_tree(args.out)
    for key, path in sorted(tree.files.items()):
        print(f"{key:24s} {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    for line in run_demo(Path(args.out)):
        print(line)
    return 0


def _animate(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .model_folders import ModelFolders
    from .pipeline import AnimateOptions, animate, extract_poses_from, load_driving, read_image, write_video

    models = ModelFolders(args.models)
    reference = read_image(args.reference)
    driving, fps = load_driving(args.driving, models, args.max_frames)
    if args.reference_pose:
        from .pose.pose_json import load_pose_json
        from .pose_format import parse_pose_keypoint

        reference_pose = parse_pose_keypoint(load_pose_json(args.reference_pose))
    else:
        reference_pose = extract_poses_from(reference[None], models.paths("tcan_pose"))
    options = AnimateOptions(checkpoint=args.checkpoint, motion_module=args.motion_module, controlnet=args.controlnet,
                             width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
                             scheduler=args.scheduler, seed=args.seed, tau=args.tau, tpc=not args.no_tpc,
                             max_frames=args.max_frames, retarget_mode=args.retarget_mode)
    with tqdm(desc="TCAN", unit="window", disable=None) as bar:
        result = animate(reference, driving, models, reference_pose, options,
                         progress=lambda n, preview: bar.update(n))
    for line in result.report:
        print(line)
    out = Path(args.out)
    if not write_video(out, result.frames, args.fps or fps):
        frames_dir = out.with_suffix("")
        frames_dir.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(result.frames):
            import cv2

            cv2.imwrite(str(frames_dir / f"{i:05d}.png"), np.ascontiguousarray(frame[..., ::-1]))
        print(f"no mp4 encoder available; wrote {len(result.frames)} PNG frames to {frames_dir}")
        return 0
    print(f"wrote {len(result.frames)} frames ({result.frames.shape[2]}x{result.frames.shape[1]}) to {out}")
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
    p.add_argument("--out", required=True, metavar="OUT.mp4", help="video to write")
    p.add_argument("--checkpoint", help="SD1.5 checkpoint name in DIR/checkpoints (default: the first one)")
    p.add_argument("--motion-module", help="motion module name in DIR/animatediff_models (default: the first one)")
    p.add_argument("--controlnet", help="OpenPose ControlNet name in DIR/controlnet (default: the first one)")
    p.add_argument("--width", type=int, help="output width (multiple of 8); default: the reference's aspect at 512x512 area")
    p.add_argument("--height", type=int, help="output height (multiple of 8)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (TCAN: 25)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (TCAN: 7.5)")
    p.add_argument("--scheduler", default="DDIM", help="DDIM, Euler, Euler ancestral, DPM++ 2M or UniPC")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=3.0, help="PTM tau (TCAN: 3; 0 turns PTM off)")
    p.add_argument("--no-tpc", action="store_true", help="skip TPC calibration of the reference")
    p.add_argument("--max-frames", type=int, help="use only the first N driving frames")
    p.add_argument("--retarget-mode", choices=("authors_code", "algorithm_1"), default="authors_code",
                   help="pose retargeting: authors_code (TCAN's released code, as in the paper's results) or "
                        "algorithm_1 (the pack's earlier reading: pairs averaged, no clip on foreshortening)")
    p.add_argument("--fps", type=float, help="frame rate of the output (default: the driving video's, or 12)")
    p.set_defaults(func=_animate)

    p = sub.add_parser("demo", help="build the tiny model set and run the whole TCAN graph on the CPU")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the models, previews and report")
    p.set_defaults(func=_demo)

    from .metrics.command import add_evaluate_parser

    add_evaluate_parser(sub)
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
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
