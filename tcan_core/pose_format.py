"""POSE_KEYPOINT, ComfyUI's shared pose type, to and from dense arrays (DESIGN.md section 4).

A POSE_KEYPOINT is a list with one dict per frame::

    {"canvas_width": W, "canvas_height": H,
     "people": [{"pose_keypoints_2d": [x, y, c] * 18, "face_keypoints_2d": [x, y, c] * 70,
                 "hand_left_keypoints_2d": [x, y, c] * 21, "hand_right_keypoints_2d": [x, y, c] * 21}]}

Packs write coordinates in pixels or in 0..1; :func:`parse_pose_keypoint` detects which per array
and returns pixels. A missing point has confidence 0 (its x, y are then meaningless).
Keypoint order is OpenPose-18 (0 nose, 1 neck, 2 r-shoulder, ... 17 l-ear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BODY, N_FACE, N_HAND = 18, 70, 21
BODY_KEYS = ("pose_keypoints_2d", N_BODY)
FACE_KEYS = ("face_keypoints_2d", N_FACE)
HAND_KEYS = (("hand_left_keypoints_2d", N_HAND), ("hand_right_keypoints_2d", N_HAND))

BODY_NAMES = (
    "nose", "neck", "r-shoulder", "r-elbow", "r-wrist", "l-shoulder", "l-elbow", "l-wrist",
    "r-hip", "r-knee", "r-ankle", "l-hip", "l-knee", "l-ankle", "r-eye", "l-eye", "r-ear", "l-ear",
)


@dataclass
class PoseSequence:
    """Dense keypoints of a clip, in pixels of a ``width`` x ``height`` canvas.

    body ``[F,P,18,3]``, face ``[F,P,70,3]``, hands ``[F,P,2,21,3]`` (left, right), each
    ``(x, y, confidence)``; ``P`` is the largest number of people in any frame, and people a frame
    does not have are all-zero. ``people[f]`` is how many people frame ``f`` really has.
    """

    body: np.ndarray
    face: np.ndarray
    hands: np.ndarray
    people: np.ndarray
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return int(self.body.shape[0])

    def first(self, frames: int) -> "PoseSequence":
        """The first ``frames`` frames (all when there are fewer)."""
        return PoseSequence(self.body[:frames], self.face[:frames], self.hands[:frames], self.people[:frames],
                            self.width, self.height)

    @classmethod
    def empty(cls, frames: int, people: int, width: int, height: int) -> "PoseSequence":
        return cls(
            body=np.zeros((frames, people, N_BODY, 3), np.float32),
            face=np.zeros((frames, people, N_FACE, 3), np.float32),
            hands=np.zeros((frames, people, 2, N_HAND, 3), np.float32),
            people=np.zeros((frames,), np.int64),
            width=int(width),
            height=int(height),
        )


def _points(values, count: int, width: float, height: float, what: str) -> np.ndarray:
    """One flat ``[x, y, c] * count`` list -> ``[count, 3]`` pixels; 0..1 input is detected and scaled."""
    out = np.zeros((count, 3), np.float32)
    if values is None or len(values) == 0:
        return out
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size % 3 != 0 or arr.size // 3 != count:
        raise ValueError(f"{what} must hold {count} points as [x, y, confidence] * {count} "
                         f"({count * 3} numbers), got {arr.size} numbers")
    pts = arr.reshape(count, 3)
    seen = pts[:, 2] > 0
    if seen.any() and np.abs(pts[seen, :2]).max() <= 1.0 + 1e-6:
        pts = pts * np.array([width, height, 1.0], np.float32)
    out[:] = pts
    out[~seen] = 0.0
    return out


def parse_pose_keypoint(pose_keypoint) -> PoseSequence:
    """POSE_KEYPOINT (list of frame dicts, or one dict) -> :class:`PoseSequence` in pixels."""
    frames = [pose_keypoint] if isinstance(pose_keypoint, dict) else list(pose_keypoint or [])
    if not frames:
        raise ValueError("POSE_KEYPOINT is empty: it holds no frames. Connect a Pose Extract or Pose Load node.")
    sizes = set()
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or "people" not in fr:
            raise ValueError(f"POSE_KEYPOINT frame {i} is not a pose dict with a 'people' list "
                             f"(got {type(fr).__name__}); expected the OpenPose JSON schema.")
        if "canvas_width" not in fr or "canvas_height" not in fr:
            raise ValueError(f"POSE_KEYPOINT frame {i} has no canvas_width/canvas_height.")
        sizes.add((int(fr["canvas_width"]), int(fr["canvas_height"])))
    if len(sizes) > 1:
        raise ValueError(f"POSE_KEYPOINT frames have different canvas sizes {sorted(sizes)}; "
                         "all frames of one clip must share one size.")
    width, height = sizes.pop()
    max_people = max((len(fr["people"] or []) for fr in frames), default=0)
    seq = PoseSequence.empty(len(frames), max_people, width, height)
    for f, fr in enumerate(frames):
        people = fr["people"] or []
        seq.people[f] = len(people)
        for p, person in enumerate(people):
            where = f"frame {f}, person {p}"
            seq.body[f, p] = _points(person.get(BODY_KEYS[0]), N_BODY, width, height, f"{BODY_KEYS[0]} ({where})")
            seq.face[f, p] = _points(person.get(FACE_KEYS[0]), N_FACE, width, height, f"{FACE_KEYS[0]} ({where})")
            for h, (key, n) in enumerate(HAND_KEYS):
                seq.hands[f, p, h] = _points(person.get(key), n, width, height, f"{key} ({where})")
    return seq


def _flat(points: np.ndarray) -> list[float]:
    pts = points.astype(np.float64).copy()
    pts[pts[:, 2] <= 0] = 0.0
    return [round(float(v), 3) for v in pts.reshape(-1)]


def to_pose_keypoint(seq: PoseSequence) -> list[dict]:
    """:class:`PoseSequence` -> POSE_KEYPOINT in pixel coordinates; absent people are dropped."""
    out = []
    for f in range(seq.num_frames):
        people = []
        for p in range(int(seq.people[f])):
            person = {BODY_KEYS[0]: _flat(seq.body[f, p]), FACE_KEYS[0]: _flat(seq.face[f, p])}
            for h, (key, _n) in enumerate(HAND_KEYS):
                person[key] = _flat(seq.hands[f, p, h])
            people.append(person)
        out.append({"canvas_width": int(seq.width), "canvas_height": int(seq.height), "people": people})
    return out
