"""The pose package's shared types and its backend registry: what a detector returns, and which detectors exist.

A backend is any callable ``RGB uint8 [H,W,3] -> FramePeople``. :data:`REGISTRY` names each one
with its model-folder slot (:data:`tcan_core.model_folders.SLOTS` key), the Python package it
needs and where its class lives; the Pose Extract node, the doctor and :func:`~.extract.load_backend`
read it. A new detector is one more module with a class taking its model paths and ``device``,
and one more :class:`BackendSpec` here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from tcan_core.pose_format import N_BODY, N_FACE, N_HAND

BACKEND_DWPOSE = "dwpose"
BACKEND_OPENPOSE = "openpose"


@dataclass
class FramePeople:
    """People a backend found in one image, in that image's pixels.

    body ``[P,18,3]``, face ``[P,70,3]``, hands ``[P,2,21,3]`` (left, right) as (x, y, confidence);
    boxes ``[P,4]`` xyxy from the detector, or None to derive them from the keypoints.
    """

    body: np.ndarray
    face: np.ndarray
    hands: np.ndarray
    boxes: np.ndarray | None = None

    @classmethod
    def empty(cls) -> "FramePeople":
        return cls(np.zeros((0, N_BODY, 3), np.float32), np.zeros((0, N_FACE, 3), np.float32),
                   np.zeros((0, 2, N_HAND, 3), np.float32), np.zeros((0, 4), np.float32))

    @property
    def count(self) -> int:
        return int(self.body.shape[0])

    def person_boxes(self) -> np.ndarray:
        """``[P,4]`` xyxy: the detector's boxes, else the extent of each person's seen points."""
        if self.boxes is not None:
            return np.asarray(self.boxes, np.float32).reshape(-1, 4)
        pts = np.concatenate([self.body, self.face, self.hands.reshape(self.count, -1, 3)], axis=1)
        seen = pts[..., 2] > 0
        lo = np.where(seen[..., None], pts[..., :2], np.inf).min(1)
        hi = np.where(seen[..., None], pts[..., :2], -np.inf).max(1)
        boxes = np.concatenate([lo, hi], axis=1)
        boxes[~seen.any(1)] = 0.0
        return boxes.astype(np.float32)

    def scaled(self, sx: float, sy: float) -> "FramePeople":
        """The same people with x scaled by ``sx`` and y by ``sy`` (confidence kept)."""
        factor = np.array([sx, sy, 1.0], np.float32)
        boxes = None if self.boxes is None else np.asarray(self.boxes, np.float32) * np.array([sx, sy, sx, sy], np.float32)
        return FramePeople(self.body * factor, self.face * factor, self.hands * factor, boxes)


class PoseBackend(Protocol):
    """A loaded pose detector: ``provider`` says where it runs."""

    provider: str

    def __call__(self, image: np.ndarray) -> FramePeople: ...


@dataclass(frozen=True)
class BackendSpec:
    """A pose detector: its name (the widget value), model slot, the package it needs and its class."""

    name: str
    slot: str
    package: str
    target: str  # "module:Class", imported when the backend is first loaded

    def factory(self) -> Callable[..., PoseBackend]:
        """The backend's class (its module imported now)."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, BackendSpec] = {
    BACKEND_DWPOSE: BackendSpec(BACKEND_DWPOSE, "dwpose", "onnxruntime", "tcan_core.pose.dwpose:DWPose"),
    BACKEND_OPENPOSE: BackendSpec(BACKEND_OPENPOSE, "openpose", "controlnet_aux", "tcan_core.pose.openpose:OpenPose"),
}
BACKENDS = tuple(REGISTRY)


def backend_spec(name: str) -> BackendSpec:
    """The registered backend name; ValueError listing the choices otherwise."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown pose backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return spec
