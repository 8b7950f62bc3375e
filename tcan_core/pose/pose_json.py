"""POSE_KEYPOINT to and from JSON files, in the schema comfyui_controlnet_aux writes.

A file holds a list of frame dicts (``canvas_width``, ``canvas_height``, ``people``); a single
frame dict is accepted too. Keys other packs add (``animals``, ``version``) are ignored. What is
loaded is checked and returned in pixel coordinates with all four keypoint arrays per person;
what is saved is the same normal form, so a saved clip loads back identical.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from tcan_core.paths import safe_join
from tcan_core.pose_format import parse_pose_keypoint, to_pose_keypoint

log = logging.getLogger(__name__)

EXPECTED = ("a POSE_KEYPOINT JSON: a list of frames like {\"canvas_width\": W, \"canvas_height\": H, "
            "\"people\": [{\"pose_keypoints_2d\": [x, y, c, ...], ...}]} as written by TCAN Pose Save "
            "or comfyui_controlnet_aux")


def normalize_pose_keypoint(pose_keypoint) -> list[dict]:
    """Any POSE_KEYPOINT (list of frames or one frame, pixel or 0..1) -> list of frames in pixels."""
    return to_pose_keypoint(parse_pose_keypoint(pose_keypoint))


def dumps_pose_json(pose_keypoint) -> str:
    """POSE_KEYPOINT -> JSON text in the normal form (pixels, one dict per frame)."""
    return json.dumps(normalize_pose_keypoint(pose_keypoint))


def loads_pose_json(text: str, source: str = "pose JSON") -> list[dict]:
    """JSON text -> POSE_KEYPOINT in pixels; ``source`` names the file in error messages."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         f"expected {EXPECTED}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{source} holds a JSON {type(data).__name__}; expected {EXPECTED}")
    if not data:
        raise ValueError(f"{source} holds an empty list: it has no frames; expected {EXPECTED}")
    for i, frame in enumerate(data):
        if not isinstance(frame, dict) or not isinstance(frame.get("people", 0), (list, type(None))):
            what = type(frame).__name__ if not isinstance(frame, dict) else f"a dict with keys {sorted(frame)[:6]}"
            raise ValueError(f"{source}: frame {i} is {what}, not a pose frame; expected {EXPECTED}")
    try:
        return normalize_pose_keypoint(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from exc


def load_pose_json(path: str | os.PathLike) -> list[dict]:
    """Read a POSE_KEYPOINT JSON file -> list of frames in pixels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose file {str(path)!r} does not exist; check the file name")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path.name} is not a text file; expected {EXPECTED}") from exc
    return loads_pose_json(text, source=path.name)


def save_pose_json(pose_keypoint, path: str | os.PathLike) -> Path:
    """Write POSE_KEYPOINT to ``path`` (parent folders are made); returns the path."""
    path = Path(path)
    text = dumps_pose_json(pose_keypoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log.info("saved %s", path)
    return path


def next_numbered_path(directory: str | os.PathLike, prefix: str, ext: str = ".json") -> Path:
    """The first free ``<prefix>_NNNNN<ext>`` inside ``directory`` (``prefix`` may name sub-folders)."""
    target = safe_join(directory, prefix + ext, "filename prefix")
    stem = target.name[: -len(ext)]
    pattern = re.compile(re.escape(stem) + r"_(\d+)" + re.escape(ext) + "$")
    used = [int(m.group(1)) for p in (target.parent.iterdir() if target.parent.is_dir() else [])
            if (m := pattern.match(p.name))]
    return target.parent / f"{stem}_{max(used, default=0) + 1:05d}{ext}"


def list_pose_files(directory: str | os.PathLike) -> list[str]:
    """Relative names of the ``.json`` files under ``directory``, sorted."""
    base = Path(directory)
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.json")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts))
