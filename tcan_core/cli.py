"""The command line: ``doctor`` (which model files are found), ``tiny-models`` and ``demo``."""

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

    p = sub.add_parser("demo", help="build the tiny model set and run what the pack has on the CPU")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the models, previews and report")
    p.set_defaults(func=_demo)
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
