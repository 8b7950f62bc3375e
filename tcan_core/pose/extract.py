"""Pose extraction over a clip, independent of the detector that finds the people.

A backend is any callable ``RGB uint8 [H,W,3] -> FramePeople`` (DWPose in
:mod:`tcan_core.pose.dwpose`, OpenPose in :mod:`tcan_core.pose.openpose`). This module runs it
over the frames (with a progress callback and an interrupt check between frames), keeps one
person per frame and follows that person through the clip, applies the body/hands/face toggles,
and finds the backends' model files in the model folders.

Person choice: ``largest`` (biggest box) or ``most central`` (box centre nearest the frame
centre) is decided in the first frame that has anyone; ``index`` counts people left to right
(by box centre) in the first frame that has that many. From there the person is followed
forwards and backwards: in each frame the box that overlaps the last known box most (IoU at least
:data:`MIN_TRACK_IOU`), else the person whose neck (or box centre) is nearest the last one,
within :data:`MAX_TRACK_JUMP` box diagonals. A frame where the person is not found stays empty.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from tcan_core.model_folders import SLOTS
from tcan_core.pose.render import render_poses
from tcan_core.pose.types import (BACKEND_DWPOSE, BACKEND_OPENPOSE, BACKENDS, FramePeople, PoseBackend,
                                  backend_spec)

# Re-exported: the Pose Extract node and the command line read the choices from here.
__all__ = ["BACKENDS", "BACKEND_DWPOSE", "BACKEND_OPENPOSE", "ExtractResult", "FramePeople", "PoseBackend",
           "extract_poses", "load_backend"]
from tcan_core.pose_format import PoseSequence

log = logging.getLogger(__name__)

PERSON_LARGEST = "largest"
PERSON_CENTRAL = "most central"
PERSON_INDEX = "index"
PERSON_CHOICES = (PERSON_LARGEST, PERSON_CENTRAL, PERSON_INDEX)

MIN_TRACK_IOU = 0.1
MAX_TRACK_JUMP = 1.0
NECK = 1
PREVIEW_DIM = 0.5

_SLOTS = {slot.key: slot for slot in SLOTS}
DWPOSE_FILES = _SLOTS["dwpose"].expected
OPENPOSE_BODY_FILE, OPENPOSE_HAND_FILE = _SLOTS["openpose"].expected
OPENPOSE_FACE_FILE = "facenet.pth"


@dataclass
class ExtractResult:
    """One person's poses over the clip, how many people each frame had, and the frames left empty."""

    poses: PoseSequence
    people_found: np.ndarray
    empty_frames: list[int] = field(default_factory=list)

    def summary(self) -> str:
        frames = self.poses.num_frames
        text = f"{frames} frame(s); person found in {frames - len(self.empty_frames)}"
        if self.empty_frames:
            shown = ", ".join(str(f) for f in self.empty_frames[:20])
            more = " ..." if len(self.empty_frames) > 20 else ""
            text += f"; {len(self.empty_frames)} frame(s) without the person (left empty): {shown}{more}"
        return text


def find_model_files(names: Sequence[str], folders: Sequence[str]) -> dict[str, str]:
    """Paths of files named ``names`` (case-insensitive) anywhere below ``folders``; the first folder wins."""
    wanted = {n.lower(): n for n in names}
    found: dict[str, str] = {}
    for base in folders:
        if not os.path.isdir(base):
            continue
        for dirpath, subdirs, files in os.walk(base, followlinks=True):
            subdirs.sort()
            for f in sorted(files):
                name = wanted.get(f.lower())
                if name is not None and name not in found:
                    found[name] = os.path.join(dirpath, f)
            if len(found) == len(wanted):
                return found
    return found


def require_model_files(names: Sequence[str], folders: Sequence[str], slot: str) -> dict[str, str]:
    """Like :func:`find_model_files`, but a missing file raises FileNotFoundError saying where to get it."""
    found = find_model_files(names, folders)
    missing = [n for n in names if n not in found]
    if missing:
        info = _SLOTS[slot]
        searched = "\n  ".join(folders) if folders else "(no folders registered)"
        raise FileNotFoundError(
            f"{info.title}: {', '.join(missing)} not found in the {info.folder!r} model folders "
            f"(searched with their sub-folders):\n  {searched}\nPut {', '.join(names)} in one of "
            f"them (the pack's own is models/tcan/pose); they are published at {info.published}."
        )
    return found


_cache: dict[tuple, PoseBackend] = {}


def load_backend(name: str, folders: Sequence[str], device: str = "cpu",
                 hands: bool = True, face: bool = True) -> PoseBackend:
    """Build (or reuse) the ``name`` backend from model files found below ``folders``.

    ``device`` is where the host runs models (a "cuda" device asks onnxruntime for its CUDA
    provider on that GPU and puts OpenPose's networks there). OpenPose loads its hand and face networks only when asked for.
    """
    device = str(device)
    spec = backend_spec(name)
    if name == BACKEND_DWPOSE:
        files = require_model_files(DWPOSE_FILES, folders, "dwpose")
        paths = tuple(files[n] for n in DWPOSE_FILES)
    elif name == BACKEND_OPENPOSE:
        names = [OPENPOSE_BODY_FILE] + [OPENPOSE_HAND_FILE] * hands + [OPENPOSE_FACE_FILE] * face
        files = require_model_files(names, folders, "openpose")
        paths = (files[OPENPOSE_BODY_FILE], files.get(OPENPOSE_HAND_FILE), files.get(OPENPOSE_FACE_FILE))
    else:
        raise ValueError(f"pose backend {name!r} is registered but load_backend does not know its model files; "
                         "add them next to the other backends' in load_backend")
    stamps = tuple(os.stat(p).st_mtime_ns if p else 0 for p in paths)
    key = (name, paths, stamps, device)
    if key in _cache:
        return _cache[key]
    # The backend's module is imported when first used: its own packages are optional.
    backend = spec.factory()(*paths, device=device)
    _cache.clear()
    _cache[key] = backend
    return backend


def clear_backend_cache() -> None:
    """Drop the cached pose backend; its ONNX sessions / networks are freed with it (the next load reads the files)."""
    _cache.clear()


def backend_cache_bytes() -> int:
    """Bytes of the model files behind the cached pose backend (0 when none is cached)."""
    return sum(os.path.getsize(p) for key in _cache for p in key[1] if p)


def _as_uint8(frame: np.ndarray, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame {index} must be an RGB image [H,W,3], got shape {list(frame.shape)}")
    if frame.dtype == np.uint8:
        return np.ascontiguousarray(frame)
    return (np.clip(frame.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def check_frames(frames: Sequence[np.ndarray] | np.ndarray) -> tuple[int, int]:
    """Frames must be a non-empty batch of one size: returns (height, width) or raises ValueError."""
    if len(frames) == 0:
        raise ValueError("the image batch is empty (0 frames); connect an image or a video's frames")
    sizes = sorted({tuple(np.shape(f)[:2]) for f in frames})
    if len(sizes) > 1:
        shown = ", ".join(f"{w} x {h}" for h, w in sizes)
        raise ValueError(f"frames have different sizes ({shown}); resize them to one size "
                         "(for example with an Upscale Image node) before extracting poses")
    return sizes[0]


def resize_for_detection(image: np.ndarray, resolution: int) -> tuple[np.ndarray, float, float]:
    """Scale ``[H,W,3]`` so its short side is ``resolution`` (0 keeps it): image, and x, y factors back."""
    if resolution < 0:
        raise ValueError(f"detection resolution must be 0 (keep the frame size) or positive, got {resolution}")
    h, w = image.shape[:2]
    if resolution == 0 or min(h, w) == resolution:
        return image, 1.0, 1.0
    k = resolution / min(h, w)
    new_w, new_h = max(int(round(w * k)), 1), max(int(round(h * k)), 1)
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (new_w, new_h), interpolation=interp), w / new_w, h / new_h


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box ``[4]`` with each of ``boxes`` ``[P,4]`` -> ``[P]``."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    return inter / np.maximum(_area(box) + _area(boxes) - inter, 1e-9)


def _anchor_points(people: FramePeople, boxes: np.ndarray) -> np.ndarray:
    """``[P,2]`` the neck where it is seen, else the box centre."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    neck = people.body[:, NECK]
    return np.where(neck[:, 2:3] > 0, neck[:, :2], centres)


def choose_person(people: FramePeople, mode: str, index: int, width: int, height: int) -> int | None:
    """The person to follow in one frame by ``mode``; None when ``index`` is beyond the people there."""
    boxes = people.person_boxes()
    if mode == PERSON_LARGEST:
        return int(np.argmax(_area(boxes)))
    if mode == PERSON_CENTRAL:
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        return int(np.argmin(np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2)))
    if mode == PERSON_INDEX:
        order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
        return int(order[index]) if index < len(order) else None
    raise ValueError(f"unknown person choice {mode!r}; choose one of: {', '.join(PERSON_CHOICES)}")


def _follow(prev_box: np.ndarray, prev_point: np.ndarray, people: FramePeople) -> int | None:
    """The person in ``people`` that continues the track ending at ``prev_box`` / ``prev_point``."""
    if people.count == 0:
        return None
    boxes = people.person_boxes()
    iou = box_iou(prev_box, boxes)
    best = int(np.argmax(iou))
    if iou[best] >= MIN_TRACK_IOU:
        return best
    dist = np.hypot(*(_anchor_points(people, boxes) - prev_point).T)
    nearest = int(np.argmin(dist))
    reach = MAX_TRACK_JUMP * float(np.hypot(*(prev_box[2:] - prev_box[:2])))
    return nearest if dist[nearest] <= reach else None


def track_person(detections: Sequence[FramePeople], mode: str, index: int, width: int, height: int) -> np.ndarray:
    """Per frame, which detected person is the chosen one: ``[F]`` indices, -1 where not found."""
    if mode not in PERSON_CHOICES:
        raise ValueError(f"unknown person choice {mode!r}; choose one of: {', '.join(PERSON_CHOICES)}")
    if index < 0:
        raise ValueError(f"person index must be 0 or more, got {index}")
    chosen = np.full(len(detections), -1, np.int64)
    start = next((f for f, d in enumerate(detections) if d.count > (index if mode == PERSON_INDEX else 0)), None)
    if start is None:
        most = max((d.count for d in detections), default=0)
        raise ValueError(f"person index {index} was asked for, but no frame has more than {most} "
                         f"person(s) (indices count from 0, left to right); lower the index")
    chosen[start] = choose_person(detections[start], mode, index, width, height)
    for step in (1, -1):
        people = detections[start]
        boxes = people.person_boxes()
        box, point = boxes[chosen[start]], _anchor_points(people, boxes)[chosen[start]]
        frames = range(start + 1, len(detections)) if step == 1 else range(start - 1, -1, -1)
        for f in frames:
            pick = _follow(box, point, detections[f])
            if pick is None:
                continue
            chosen[f] = pick
            boxes = detections[f].person_boxes()
            box, point = boxes[pick], _anchor_points(detections[f], boxes)[pick]
    return chosen


def extract_poses(frames: Sequence[np.ndarray] | np.ndarray, backend: Callable[[np.ndarray], FramePeople], *,
                  person: str = PERSON_LARGEST, index: int = 0, body: bool = True, hands: bool = True,
                  face: bool = True, detect_resolution: int = 512,
                  progress: Callable[[int], None] | None = None,
                  check_interrupt: Callable[[], None] | None = None) -> ExtractResult:
    """Run ``backend`` on every frame (``[F,H,W,3]`` uint8 or float 0..1) and keep one person per frame.

    ``progress(1)`` is called after each frame and ``check_interrupt()`` before each one. Frames
    where the person is not found stay empty; if no frame has anyone, ValueError.
    """
    if person not in PERSON_CHOICES:
        raise ValueError(f"unknown person choice {person!r}; choose one of: {', '.join(PERSON_CHOICES)}")
    height, width = check_frames(frames)
    detections: list[FramePeople] = []
    for i in range(len(frames)):
        if check_interrupt is not None:
            check_interrupt()
        image, sx, sy = resize_for_detection(_as_uint8(frames[i], i), detect_resolution)
        found = backend(image)
        detections.append(found.scaled(sx, sy) if (sx, sy) != (1.0, 1.0) else found)
        if progress is not None:
            progress(1)
    counts = np.array([d.count for d in detections], np.int64)
    if not counts.any():
        raise ValueError(f"no person was found in any of the {len(frames)} frame(s); use frames where a "
                         "person is clearly visible, try the other backend or a higher detection resolution")
    chosen = track_person(detections, person, index, width, height)
    seq = PoseSequence.empty(len(frames), 1, width, height)
    for f, pick in enumerate(chosen):
        if pick < 0:
            continue
        seq.people[f] = 1
        people = detections[f]
        if body:
            seq.body[f, 0] = people.body[pick]
        if face:
            seq.face[f, 0] = people.face[pick]
        if hands:
            seq.hands[f, 0] = people.hands[pick]
    empty = [int(f) for f in np.nonzero(chosen < 0)[0]]
    if empty:
        log.info("pose extraction: the person was not found in %d of %d frames", len(empty), len(frames))
    return ExtractResult(seq, counts, empty)


def preview_frames(frames: Sequence[np.ndarray] | np.ndarray, poses: PoseSequence, body: bool = True,
                   hands: bool = True, face: bool = True) -> np.ndarray:
    """Skeletons drawn over the dimmed frames: float32 ``[F,H,W,3]`` in 0..1."""
    height, width = check_frames(frames)
    skeleton = render_poses(poses, width, height, body=body, hands=hands, face=face)
    drawn = skeleton.any(-1, keepdims=True)
    out = np.empty((len(frames), height, width, 3), np.float32)
    for i in range(len(frames)):
        base = _as_uint8(frames[i], i).astype(np.float32) / 255.0
        out[i] = np.where(drawn[i], skeleton[i].astype(np.float32) / 255.0, base * PREVIEW_DIM)
    return out
