"""Hand edits of a pose clip, stored as a JSON list and applied in order (TCAN Pose Edit).

An edit list is JSON text, a list of objects, each with an ``op``::

    {"op": "move", "frame": 12, "person": 0, "point": 4, "x": 231.5, "y": 310.0}
    {"op": "delete", "frames": [40, 52], "person": 0, "point": 7}
    {"op": "copy", "source": 30, "frames": [31, 35], "person": 0}
    {"op": "interpolate", "frames": [60, 70], "person": 0}

``frame``/``frames`` are frame numbers of the clip (0-based; ``frames`` is an inclusive range
``[first, last]``), ``person`` the index in the frame's people list (default 0), ``point`` a
keypoint index of ``part`` (``body`` by default: OpenPose-18; also ``face``, ``hand_left``,
``hand_right``), ``x``/``y`` pixels of the pose canvas. ``move`` sets a point (a missing point
becomes seen with confidence 1); ``delete`` makes a point missing on every frame of the range;
``copy`` puts the whole person of frame ``source`` on every frame of the range; ``interpolate``
fills the frames strictly inside the range linearly from its two end frames (points seen at both
ends only). Edits name frames and points, never detector output, so they survive re-running the
nodes upstream; an edit whose frame or person is not in the clip is reported, never dropped
silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np

from ..pose_format import N_BODY, N_FACE, N_HAND, PoseSequence

log = logging.getLogger(__name__)

OP_MOVE, OP_DELETE, OP_COPY, OP_INTERPOLATE = "move", "delete", "copy", "interpolate"
OPS = (OP_MOVE, OP_DELETE, OP_COPY, OP_INTERPOLATE)
PARTS = {"body": N_BODY, "face": N_FACE, "hand_left": N_HAND, "hand_right": N_HAND}
FORMAT_HELP = ('a JSON list such as [{"op": "move", "frame": 0, "person": 0, "point": 4, "x": 100, "y": 200}]; '
               f"ops: {', '.join(OPS)}")


@dataclass(frozen=True)
class PoseEdit:
    """One validated edit; ``frames`` is the inclusive range it touches (``move``: one frame)."""

    op: str
    frames: tuple[int, int]
    person: int = 0
    part: str = "body"
    point: int | None = None
    x: float | None = None
    y: float | None = None
    source: int | None = None

    def describe(self) -> str:
        where = f"frame {self.frames[0]}" if self.frames[0] == self.frames[1] else f"frames {self.frames[0]}-{self.frames[1]}"
        what = f"{self.op} {where}, person {self.person}"
        if self.point is not None:
            what += f", {self.part} point {self.point}"
        if self.source is not None:
            what += f", from frame {self.source}"
        return what


@dataclass
class EditResult:
    """The edited clip and what happened to each edit."""

    poses: PoseSequence
    applied: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.applied} edit(s) applied to {self.poses.num_frames} frames"
        if self.problems:
            text += f"; {len(self.problems)} not applied:\n" + "\n".join(self.problems)
        return text


def _whole(value, what: str, index: int, op, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise ValueError(f"edit {index} ({op}): {what} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _int(item: dict, key: str, index: int, default: int | None = None) -> int:
    return _whole(item.get(key, default), f"'{key}'", index, item.get("op"))


def _number(item: dict, key: str, index: int) -> float:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"edit {index} ({item.get('op')}): '{key}' must be a number of pixels, got {value!r}")
    return float(value)


def _range(item: dict, index: int) -> tuple[int, int]:
    op, value = item.get("op"), item.get("frames")
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"edit {index} ({op}): 'frames' must be [first, last], got {value!r}")
    first = _whole(value[0], "'frames' first", index, op)
    last = _whole(value[1], "'frames' last", index, op)
    if last < first:
        raise ValueError(f"edit {index} ({op}): 'frames' must be [first, last] with first <= last, got {value!r}")
    return first, last


def parse_edits(text: str) -> list[PoseEdit]:
    """JSON edit text -> validated edits; an empty text is no edit. Raises ``ValueError`` saying what is wrong."""
    if not text or not text.strip():
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the pose edits are not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         f"expected {FORMAT_HELP}. Fix the 'edits' text of TCAN Pose Edit.") from exc
    if not isinstance(items, list):
        raise ValueError(f"the pose edits must be a JSON list, got a {type(items).__name__}; expected {FORMAT_HELP}")
    edits = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"edit {i} must be a JSON object, got {item!r}; expected {FORMAT_HELP}")
        op = item.get("op")
        if op not in OPS:
            raise ValueError(f"edit {i}: 'op' must be one of {', '.join(OPS)}, got {op!r}")
        person = _int(item, "person", i, default=0)
        part = item.get("part", "body")
        if part not in PARTS:
            raise ValueError(f"edit {i} ({op}): 'part' must be one of {', '.join(PARTS)}, got {part!r}")
        point = None
        if op in (OP_MOVE, OP_DELETE):
            point = _int(item, "point", i)
            if point >= PARTS[part]:
                raise ValueError(f"edit {i} ({op}): 'point' of the {part} must be 0..{PARTS[part] - 1}, got {point}")
        if op == OP_MOVE:
            frame = _int(item, "frame", i)
            edits.append(PoseEdit(op, (frame, frame), person, part, point,
                                  _number(item, "x", i), _number(item, "y", i)))
        elif op == OP_DELETE:
            edits.append(PoseEdit(op, _range(item, i), person, part, point))
        elif op == OP_COPY:
            edits.append(PoseEdit(op, _range(item, i), person, source=_int(item, "source", i)))
        else:
            first, last = _range(item, i)
            if last - first < 2:
                raise ValueError(f"edit {i} (interpolate): 'frames' {[first, last]} has no frame strictly between "
                                 "its ends; give two frames at least 2 apart")
            edits.append(PoseEdit(op, (first, last), person))
    return edits


def _points(seq: PoseSequence, part: str) -> tuple[np.ndarray, int | None]:
    """The array holding ``part`` and, for hands, which hand: body/face ``[F,P,N,3]``, hands ``[F,P,2,21,3]``."""
    if part == "body":
        return seq.body, None
    if part == "face":
        return seq.face, None
    return seq.hands, 0 if part == "hand_left" else 1


def _copy(seq: PoseSequence) -> PoseSequence:
    return PoseSequence(seq.body.copy(), seq.face.copy(), seq.hands.copy(), seq.people.copy(), seq.width, seq.height)


def _has_person(seq: PoseSequence, frame: int, person: int) -> bool:
    return frame < seq.num_frames and person < int(seq.people[frame])


def _missing(seq: PoseSequence, edit: PoseEdit, frames: list[int], role: str = "") -> str:
    """Why ``frames`` cannot be edited: past the clip's end, or without the person."""
    past = [f for f in frames if f >= seq.num_frames]
    if past:
        return f"frame {past[0]} is past the end of the clip ({seq.num_frames} frames, 0-{seq.num_frames - 1})"
    bad = [f for f in frames if not _has_person(seq, f, edit.person)]
    shown = ", ".join(str(f) for f in bad[:5]) + (" ..." if len(bad) > 5 else "")
    return f"{role}frame(s) {shown} have no person {edit.person} (people there: {int(seq.people[bad[0]])})"


def apply_edits(seq: PoseSequence, edits: list[PoseEdit]) -> EditResult:
    """Apply ``edits`` in order to a copy of ``seq``; an edit that names a missing frame or person is reported.

    ``move`` and ``delete`` need the person on their frames (a range edits the frames that have
    them and reports the others); ``copy`` needs the person on the source frame and adds it where a
    target frame lacks it; ``interpolate`` needs the person on both end frames.
    """
    out = _copy(seq)
    result = EditResult(out)
    for i, edit in enumerate(edits):
        first, last = edit.frames
        frames = list(range(first, last + 1))
        label = f"edit {i} ({edit.describe()})"
        if edit.op == OP_COPY:
            if not _has_person(out, edit.source, edit.person):
                result.problems.append(f"{label}: {_missing(out, edit, [edit.source], 'source ')}")
                continue
            inside = [f for f in frames if f < out.num_frames]
            for f in inside:
                out.body[f, edit.person] = out.body[edit.source, edit.person]
                out.face[f, edit.person] = out.face[edit.source, edit.person]
                out.hands[f, edit.person] = out.hands[edit.source, edit.person]
                out.people[f] = max(int(out.people[f]), edit.person + 1)
            if len(inside) < len(frames):
                result.problems.append(f"{label}: frames {inside[-1] + 1 if inside else first}-{last} are past the end "
                                       f"of the clip ({out.num_frames} frames); copied to the others")
            result.applied += 1
            continue
        if edit.op == OP_INTERPOLATE:
            ends = [first, last]
            if not all(_has_person(out, f, edit.person) for f in ends):
                result.problems.append(f"{label}: {_missing(out, edit, ends, 'end ')}")
                continue
            for arr, hand in ((out.body, None), (out.face, None), (out.hands, 0), (out.hands, 1)):
                a = arr[first, edit.person] if hand is None else arr[first, edit.person, hand]
                b = arr[last, edit.person] if hand is None else arr[last, edit.person, hand]
                both = (a[:, 2] > 0) & (b[:, 2] > 0)
                for f in range(first + 1, last):
                    t = (f - first) / (last - first)
                    target = arr[f, edit.person] if hand is None else arr[f, edit.person, hand]
                    target[both] = (1 - t) * a[both] + t * b[both]
            out.people[first + 1:last] = np.maximum(out.people[first + 1:last], edit.person + 1)
            result.applied += 1
            continue
        arr, hand = _points(out, edit.part)
        ok = [f for f in frames if _has_person(out, f, edit.person)]
        if len(ok) < len(frames):
            result.problems.append(f"{label}: {_missing(out, edit, [f for f in frames if f not in ok])}"
                                   + ("; applied to the other frames" if ok else ""))
        if not ok:
            continue
        for f in ok:
            target = arr[f, edit.person] if hand is None else arr[f, edit.person, hand]
            if edit.op == OP_MOVE:
                conf = target[edit.point, 2]
                target[edit.point] = (edit.x, edit.y, conf if conf > 0 else 1.0)
            else:
                target[edit.point] = 0.0
        result.applied += 1
    if result.problems:
        log.warning("pose edits not applied: %s", "; ".join(result.problems))
    return result
