"""OpenPose body, hand and face networks through ``controlnet_aux``, from local ``.pth`` files only.

``controlnet_aux.open_pose.OpenposeDetector.from_pretrained`` downloads from the Hugging Face hub
unless it is given one folder holding all three files; here the three networks are built from
wherever the files were found (``Body``, ``Hand``, ``Face`` each take a file path) and handed to
``OpenposeDetector``, so nothing is ever downloaded. Each file is first read with
``torch.load(weights_only=True)`` and its keys are checked against the network, so an unsafe
pickle is refused before controlnet_aux loads it and a wrong file gets an error naming its
missing and unexpected keys (the price: each file is read twice, once per check and once to load).

The body network (CMU OpenPose, Cao et al., CVPR 2017) gives OpenPose-18 directly; hands are
found in boxes around the wrists (``detect_hands``); the face heatmaps are decoded here, one peak
per landmark, because ``controlnet_aux``'s own face decoding drops landmarks without a peak and
so shifts the indices of the ones after them.
"""

from __future__ import annotations

import importlib
import logging
import os

import numpy as np
import torch

from tcan_core.pose.types import FramePeople
from tcan_core.pose_format import N_BODY, N_FACE, N_HAND

log = logging.getLogger(__name__)

PUBLISHED = "https://huggingface.co/lllyasviel/Annotators"
FACE_PEAK_THRESHOLD = 0.05  # controlnet_aux's face heatmap threshold


def _controlnet_aux_open_pose():
    try:
        return importlib.import_module("controlnet_aux.open_pose")
    except ImportError as exc:
        raise ImportError(f"the OpenPose backend needs the Python package controlnet_aux ({exc}); "
                          "install it with: pip install controlnet_aux") from exc


def _check_keys(path: str, network: torch.nn.Module, strip_prefix: bool) -> None:
    """Compare a ``.pth`` file's keys with ``network``'s; raise ValueError naming the differences."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OpenPose model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises pickle, zip and runtime errors alike
        raise ValueError(f"{path} could not be read as a PyTorch state dict ({exc}); "
                         f"download it again from {PUBLISHED}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; "
                         f"use the OpenPose .pth files from {PUBLISHED}")
    # controlnet_aux's body and hand networks nest each stage in a sub-module whose name the
    # published files leave out (model0.conv1_1.weight is stored as conv1_1.weight).
    expected = {k.split(".", 1)[1] if strip_prefix else k for k in network.state_dict()}
    found = set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{os.path.basename(path)} does not fit the OpenPose {type(network).__name__}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}. Use the matching file from {PUBLISHED}."
        )


class OpenPose:
    """OpenPose through controlnet_aux: RGB uint8 ``[H,W,3]`` -> :class:`FramePeople` in its pixels."""

    def __init__(self, body_path: str, hand_path: str | None = None, face_path: str | None = None,
                 device: str = "cpu"):
        op = _controlnet_aux_open_pose()
        model_mod = importlib.import_module("controlnet_aux.open_pose.model")
        face_mod = importlib.import_module("controlnet_aux.open_pose.face")
        with torch.device("meta"):
            _check_keys(body_path, model_mod.bodypose_model(), strip_prefix=True)
            if hand_path:
                _check_keys(hand_path, model_mod.handpose_model(), strip_prefix=True)
            if face_path:
                _check_keys(face_path, face_mod.FaceNet(), strip_prefix=False)
        body = op.Body(body_path).to(device)
        hand = op.Hand(hand_path).to(device) if hand_path else None
        face = op.Face(face_path).to(device) if face_path else None
        self.detector = op.OpenposeDetector(body, hand, face)
        self._util = importlib.import_module("controlnet_aux.open_pose.util")
        self.provider = f"torch {device}"
        log.info("OpenPose: %s (hands: %s, face: %s) on %s", body_path, hand_path, face_path, device)

    def __call__(self, image: np.ndarray) -> FramePeople:
        det = self.detector
        bgr = np.ascontiguousarray(image[..., ::-1])
        h, w = bgr.shape[:2]
        with torch.no_grad():
            candidate, subset = det.body_estimation(bgr)
        bodies = det.body_estimation.format_body_result(candidate, subset)
        count = len(bodies)
        out = FramePeople(np.zeros((count, N_BODY, 3), np.float32), np.zeros((count, N_FACE, 3), np.float32),
                          np.zeros((count, 2, N_HAND, 3), np.float32))
        for p, person in enumerate(bodies):
            for k, kp in enumerate(person.keypoints[:N_BODY]):
                if kp is not None:
                    out.body[p, k] = (kp.x, kp.y, float(np.clip(kp.score, 1e-3, 1.0)))
            if det.hand_estimation is not None:
                left, right = det.detect_hands(person, bgr)
                for side, hand in enumerate((left, right)):
                    if hand is not None:
                        out.hands[p, side] = self._hand_points(hand, w, h)
            if det.face_estimation is not None:
                out.face[p] = self._face_points(person, bgr)
        return out

    @staticmethod
    def _hand_points(hand, width: int, height: int) -> np.ndarray:
        """controlnet_aux hand keypoints (0..1, negative when missing) -> ``[21,3]`` pixels."""
        xy = np.array([(kp.x, kp.y) for kp in hand[:N_HAND]], np.float32).reshape(-1, 2)
        seen = (xy >= 0).all(1)
        pts = np.zeros((N_HAND, 3), np.float32)
        pts[: len(xy), :2] = np.where(seen[:, None], xy * np.array([width, height], np.float32), 0.0)
        pts[: len(xy), 2] = seen
        return pts

    def _face_points(self, person, bgr: np.ndarray) -> np.ndarray:
        """70 face landmarks ``[70,3]`` in pixels: one heatmap peak per landmark in the face box."""
        pts = np.zeros((N_FACE, 3), np.float32)
        box = self._util.faceDetect(person, bgr)
        if box is None:
            return pts
        x, y, size = box
        heatmaps = self.detector.face_estimation(bgr[y : y + size, x : x + size])[:N_FACE]
        flat = heatmaps.reshape(heatmaps.shape[0], -1)
        peak = flat.argmax(1)
        value = flat[np.arange(flat.shape[0]), peak]
        seen = value > FACE_PEAK_THRESHOLD
        rows, cols = np.divmod(peak, heatmaps.shape[2])
        n = heatmaps.shape[0]
        pts[:n, 0] = np.where(seen, cols + x, 0)
        pts[:n, 1] = np.where(seen, rows + y, 0)
        pts[:n, 2] = np.where(seen, np.clip(value, 1e-3, 1.0), 0)
        return pts
