"""``prepare-data``: a folder of videos (or of frame folders) -> a training set the trainer reads.

For every video: its frames (the longer side brought down to ``max_side``), the pack's DWPose
on each frame (one person, followed through the clip), gap filling and One-Euro smoothing
(:func:`tcan_core.pose.smooth.smooth_poses`), and the smoothed poses drawn as OpenPose images
at the frame size. The output::

    DATA/manifest.json                      version, settings, clips and skipped sources (with reasons)
    DATA/clips/<name>/images/000000.png     the frames
    DATA/clips/<name>/dwpose/000000.png     the rendered poses (what the OpenPose ControlNet reads)
    DATA/clips/<name>/poses.json            the poses as a POSE_KEYPOINT JSON (TCAN Pose Load reads it)

Cached and resumable: a source whose size and modification time (and the settings) match its
manifest entry is not read again, also when it was skipped before. Each clip is written into a
hidden temporary folder and renamed into place when complete, and the manifest is rewritten
(temp file + ``os.replace``) after every clip, so an interrupted run leaves only finished clips
under their names and the next run carries on from there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tcan_core.training.data import (CLIPS_FOLDER, IMAGE_SUFFIXES, IMAGES_FOLDER, KEYPOINTS_FILE, MANIFEST,
                                     POSES_FOLDER, natural_key)
from tcan_core.video_io import VIDEO_INPUT_SUFFIXES

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DEFAULT_MAX_SIDE = 768
FRAME_NAME = "{:06d}.png"
TEMP_PREFIX = ".tmp-"
ACCEPTED_SOURCES = (f"video files ({', '.join(VIDEO_INPUT_SUFFIXES)}) or sub-folders of frames "
                    f"({', '.join(IMAGE_SUFFIXES)}, in name order)")


@dataclass(frozen=True)
class Source:
    """One input clip: a video file or a folder of frames, and the clip name it gets."""

    name: str
    path: Path
    kind: str  # "video" or "frames"


@dataclass
class PrepareReport:
    """What a prepare-data run did: clips written now, clips already done, sources skipped (name, reason)."""

    out: Path
    written: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    clips: int = 0

    def summary(self) -> str:
        """One line: clips prepared now, already done, skipped, and how many the training set holds."""
        return (f"{len(self.written)} clip(s) prepared, {len(self.cached)} already done, {len(self.skipped)} "
                f"skipped; the training set holds {self.clips} clip(s): {self.out / MANIFEST}")


class SkipClip(Exception):
    """A source that gives no clip (unreadable, no person); the message is the reason the manifest lists."""


def _safe_name(stem: str) -> str:
    name = re.sub(r"[^\w.-]+", "_", stem).strip("._")
    return name or "clip"


def find_sources(videos: str | Path, out: Path | None = None) -> list[Source]:
    """The videos and frame folders directly in ``videos``, by natural name order; clear errors when there are none."""
    folder = Path(videos).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"the videos folder {folder} does not exist; give --videos a folder holding "
                                f"{ACCEPTED_SOURCES}")
    if not folder.is_dir():
        raise ValueError(f"--videos must be a folder, got the file {folder}; put the video in a folder and give "
                         f"that folder (it may hold {ACCEPTED_SOURCES})")
    out_resolved = out.resolve() if out is not None else None
    found: list[tuple[str, Path, str]] = []
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix.lower() in VIDEO_INPUT_SUFFIXES:
            found.append((path.stem, path, "video"))
        elif path.is_dir() and path.resolve() != out_resolved and any(
                p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            found.append((path.name, path, "frames"))
    if not found:
        raise ValueError(f"the videos folder {folder} holds no {ACCEPTED_SOURCES}; put your clips there "
                         "(one person per clip)")
    return [Source(_safe_name(stem), path, kind) for stem, path, kind in found]


def source_stamp(source: Source) -> dict:
    """Size in bytes and newest modification time (ns) of a source (of all its frame files for a folder)."""
    if source.kind == "video":
        stat = source.path.stat()
        return {"source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}
    files = [p for p in source.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    stats = [p.stat() for p in files]
    return {"source_size": sum(s.st_size for s in stats) + len(files),
            "source_mtime_ns": max([s.st_mtime_ns for s in stats] + [source.path.stat().st_mtime_ns])}


def read_source(source: Source, max_frames: int | None, max_side: int) -> tuple[np.ndarray, float | None]:
    """A source's frames RGB uint8 [F,H,W,3], longer side at most ``max_side``, and its frame rate (None for a
    frame folder)."""
    from tcan_core.video_io import fit_max_side, read_image, read_video

    fps: float | None = None
    if source.kind == "video":
        frames, fps = read_video(source.path, max_frames, max_side)
    else:
        files = sorted((p for p in source.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: natural_key(p.name))[:max_frames]
        frames = [fit_max_side(read_image(p), max_side) for p in files]
    if len(frames) == 0:
        raise ValueError(f"{source.path} has no readable frames")
    sizes = sorted({f.shape[:2] for f in frames})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes)
        raise ValueError(f"its frames have different sizes ({shown}); give all frames of a clip one size")
    return np.stack(frames), fps


def _write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, atomically (a temp file beside it, then os.replace)."""
    temporary = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _check_out(out: Path) -> dict:
    """The manifest already in ``out`` (empty when new); refuses a non-empty folder prepare-data did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the training set (it is created if missing)")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("%s is unreadable; every clip is prepared again", manifest)
            return {}
        return data if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION else {}
    if out.is_dir() and any(not p.name.startswith(TEMP_PREFIX) for p in out.iterdir()):
        raise ValueError(f"--out {out} already holds files but no {MANIFEST}, so it was not written by prepare-data; "
                         "give a new or empty folder (nothing there is changed)")
    return {}


def _remove_leftovers(clips_dir: Path) -> None:
    """Temporary clip folders of an interrupted earlier run."""
    if clips_dir.is_dir():
        for path in clips_dir.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def _write_clip(final: Path, frames: np.ndarray, rendered: np.ndarray, pose_keypoint: list[dict]) -> None:
    """Write a clip into a temporary folder beside ``final`` and rename it into place when complete."""
    import cv2

    from tcan_core.pose.pose_json import save_pose_json

    temporary = final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{final.name}")
    old = final.with_name(f"{TEMP_PREFIX}old-{uuid.uuid4().hex}-{final.name}")
    try:
        for sub, images in ((IMAGES_FOLDER, frames), (POSES_FOLDER, rendered)):
            (temporary / sub).mkdir(parents=True)
            for i, image in enumerate(images):
                if not cv2.imwrite(str(temporary / sub / FRAME_NAME.format(i)), image[..., ::-1]):
                    raise OSError(f"could not write {temporary / sub / FRAME_NAME.format(i)}; check the free "
                                  "disk space and the folder's permissions")
        save_pose_json(pose_keypoint, temporary / KEYPOINTS_FILE)
        # A directory cannot be renamed onto a non-empty one: the old clip steps aside first.
        if final.exists():
            os.replace(final, old)
        os.replace(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _clip_poses(frames: np.ndarray, fps: float | None, backend, progress: Callable[[int], None] | None):
    """DWPose on every frame -> (smoothed PoseSequence, frames where the person was found)."""
    from tcan_core.pose.extract import extract_poses
    from tcan_core.pose.smooth import DEFAULT_FPS, smooth_poses

    counts: list[int] = []

    def counted(image: np.ndarray):
        found = backend(image)
        counts.append(found.count)
        return found

    try:
        result = extract_poses(frames, counted, progress=progress)
    except ValueError as exc:
        if len(counts) == len(frames) and not any(counts):
            raise SkipClip(f"no person found in any of its {len(frames)} frame(s)") from exc
        raise
    smoothed = smooth_poses(result.poses, fps=fps or DEFAULT_FPS).poses
    return smoothed, len(frames) - len(result.empty_frames)


def _entry_matches(entry: dict | None, source: Source, stamp: dict, settings: dict) -> bool:
    return (entry is not None and entry.get("source") == str(source.path.resolve())
            and all(entry.get(k) == v for k, v in {**stamp, **settings}.items()))


def _unique(name: str, used: set[str]) -> str:
    if name not in used:
        return name
    number = 2
    while f"{name}-{number}" in used:
        number += 1
    return f"{name}-{number}"


def _prepare_clip(source: Source, final: Path, max_frames: int | None, max_side: int, backend: Callable[[], object],
                  progress: Callable[[int], None] | None, on_clip: Callable[[str, int], None] | None) -> dict:
    """Read one source, find its poses, render them and write the clip to ``final``: its manifest fields.

    ``backend()`` gives the DWPose backend (loaded when first needed). Raises :class:`SkipClip`
    for a source that cannot be read or shows no person.
    """
    from tcan_core.pose.render import render_poses
    from tcan_core.pose_format import to_pose_keypoint

    try:
        frames, fps = read_source(source, max_frames, max_side)
    except (ValueError, OSError) as exc:
        raise SkipClip(str(exc)) from exc
    if on_clip is not None:
        on_clip(source.name, len(frames))
    poses, with_person = _clip_poses(frames, fps, backend(), progress)
    height, width = frames.shape[1:3]
    _write_clip(final, frames, render_poses(poses, width, height), to_pose_keypoint(poses))
    return {"frames": len(frames), "fps": fps, "width": int(width), "height": int(height),
            "frames_with_person": int(with_person)}


def prepare_data(videos: str | Path, out: str | Path, pose_folders: Sequence[str], *,
                 max_side: int = DEFAULT_MAX_SIDE, max_frames: int | None = None, overwrite: bool = False,
                 device: str = "cpu", progress: Callable[[int], None] | None = None,
                 on_clip: Callable[[str, int], None] | None = None,
                 say: Callable[[str], None] | None = None) -> PrepareReport:
    """Turn the videos and frame folders in ``videos`` into a training set in ``out`` (see the module docstring).

    ``pose_folders`` are searched for the DWPose files; ``progress(n)`` is called after every
    ``n`` frames, ``on_clip(name, frames)`` when a clip's frames are read, ``say(line)`` for each
    clip written or skipped. ``overwrite`` prepares every clip again, ignoring the cache. Clips
    of earlier runs whose source is not in ``videos`` stay in the set, so several folders can
    be prepared into one.
    """
    from tcan_core.pose.extract import BACKEND_DWPOSE, load_backend

    # 1. Settings, sources and the output folder, before any heavy work.
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 0 or 0 < max_side < 64:
        raise ValueError(f"--max-side must be 0 (keep the frame size) or at least 64 pixels, got {max_side!r}; "
                         f"the default is {DEFAULT_MAX_SIDE}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"--max-frames must be at least 1, got {max_frames!r}; leave it out to use every frame")
    out = Path(out).expanduser()
    sources = find_sources(videos, out)
    old = _check_out(out)
    clips_dir = out / CLIPS_FOLDER
    clips_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(clips_dir)
    say = say or (lambda line: None)
    settings = {"max_side": max_side, "max_frames": max_frames}

    # 2. What earlier runs did; an entry is found again by its source path, so a clip keeps its name.
    done: dict[str, dict] = {e["name"]: e for e in old.get("clips", []) if isinstance(e, dict) and "name" in e
                             and (clips_dir / str(e["name"])).is_dir()}
    passed: dict[str, dict] = {e["name"]: e for e in old.get("skipped", []) if isinstance(e, dict) and "name" in e}
    by_source = {e.get("source"): name for name, e in [*passed.items(), *done.items()]}
    used = set(done) | set(passed)
    named: list[Source] = []
    for source in sources:
        name = by_source.get(str(source.path.resolve())) or _unique(source.name, used)
        used.add(name)
        named.append(Source(name, source.path, source.kind))

    def save() -> None:
        _write_json(out / MANIFEST, {
            "version": MANIFEST_VERSION, "tool": "python -m tcan_core prepare-data",
            "clips": [done[n] for n in sorted(done, key=natural_key)],
            "skipped": [passed[n] for n in sorted(passed, key=natural_key)]})

    loaded: list = []

    def backend():
        if not loaded:
            loaded.append(load_backend(BACKEND_DWPOSE, pose_folders, device=device))
        return loaded[0]

    # 3. Each clip not done yet; the manifest is saved after each one.
    report = PrepareReport(out)
    for source in named:
        stamp = source_stamp(source)
        record = {"name": source.name, "source": str(source.path.resolve()), **stamp, **settings}
        if not overwrite and _entry_matches(done.get(source.name), source, stamp, settings):
            report.cached.append(source.name)
            continue
        if not overwrite and _entry_matches(passed.get(source.name), source, stamp, settings):
            report.skipped.append((source.name, passed[source.name]["reason"]))
            say(f"skipped {source.name} (as before; --overwrite tries again): {passed[source.name]['reason']}")
            continue
        try:
            fields = _prepare_clip(source, clips_dir / source.name, max_frames, max_side, backend, progress, on_clip)
        except SkipClip as exc:
            passed[source.name] = {**record, "reason": str(exc)}
            done.pop(source.name, None)
            shutil.rmtree(clips_dir / source.name, ignore_errors=True)
            report.skipped.append((source.name, str(exc)))
            say(f"skipped {source.name}: {exc}")
        else:
            done[source.name] = {**record, **fields}
            passed.pop(source.name, None)
            report.written.append(source.name)
            say(f"prepared {source.name}: {fields['frames']} frames {fields['width']}x{fields['height']}, "
                f"person found in {fields['frames_with_person']}")
        save()
    save()
    report.clips = len(done)
    return report
