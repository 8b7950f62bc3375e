"""TIFF's face pass: after animation, put the reference identity on the largest face of every frame.

Per frame: detect faces with the pack's SCRFD detector, run an insightface swap model
(``inswapper_128.onnx``) on the largest face's 128 aligned crop with the reference's ArcFace
embedding, and blend the result back through the inverse alignment with a feathered square mask.
Frames without a face pass through bit-identical. The swap model expects the embedding of
buffalo_l's recognition model (``w600k_r50.onnx``); analyse the reference with that pack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .analysis import (
    CancelFn,
    FaceAnalyzer,
    ProgressFn,
    check_images,
    check_threshold,
    describe_model,
    files_fingerprint,
    quiet_alignment,
    require_face_tools,
    resolve_providers,
    route_model,
    to_uint8_rgb,
)
from .identity import FaceIdentity, normalized

log = logging.getLogger(__name__)

SWAPPER_HINT = ("an insightface swap model such as inswapper_128.onnx (inputs target [1,3,128,128] and "
                "source [1,512])")

_SWAPPERS: dict[tuple, FaceSwapper] = {}


class FaceSwapper:
    """A loaded insightface swap model (``INSwapper``): aligned crop + identity latent -> swapped crop."""

    def __init__(self, path: Path, model, providers: Sequence[str]):
        self.path = Path(path)
        self.model = model
        self.providers = list(providers)
        self.provider = model.session.get_providers()[0]
        self.crop_size = int(model.input_size[0])
        self.embedding_dim = int(model.emap.shape[0])

    def __repr__(self) -> str:
        return f"FaceSwapper({self.path.name}, {self.crop_size} crop, {self.embedding_dim}-d, {self.provider})"

    @classmethod
    def load(cls, path: str | Path, providers: Sequence[str] | None = None) -> FaceSwapper:
        """Route ``path`` through insightface; it must be a swap model (cached per file and providers)."""
        require_face_tools()
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"face swap model {path} not found; expected {SWAPPER_HINT} in models/insightface/")
        providers = resolve_providers(providers)
        key = (str(path), tuple(providers), files_fingerprint([path]))
        if key in _SWAPPERS:
            return _SWAPPERS[key]
        from insightface.model_zoo.inswapper import INSwapper

        model = route_model(path, providers)
        if not isinstance(model, INSwapper):
            raise ValueError(f"{path.name} is {describe_model(model)}, not a face swap model; the face pass needs "
                             f"{SWAPPER_HINT}")
        emap = np.asarray(model.emap)
        if emap.ndim != 2 or emap.shape[0] != emap.shape[1]:
            raise ValueError(f"{path.name} looks like a swap model but its last initializer (the identity map "
                             f"insightface reads) is {list(emap.shape)}, not square; expected {SWAPPER_HINT}")
        swapper = cls(path, model, providers)
        log.info("loaded %r", swapper)
        _SWAPPERS[key] = swapper
        return swapper

    def swap(self, bgr: np.ndarray, kps: np.ndarray, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BGR uint8 frame, target landmarks [5,2], source embedding [D] -> swapped crop (BGR uint8) and its
        alignment ``M`` [2,3] (frame -> crop)."""
        from insightface.app.common import Face

        target = Face(kps=np.asarray(kps, np.float32))
        source = Face(embedding=np.asarray(embedding, np.float32))
        with quiet_alignment():
            return self.model.get(bgr, target, source, paste_back=False)


def feather_mask(size: int, feather: float) -> np.ndarray:
    """``[size,size]`` float32: 1 inside, falling smoothly to 0 over ``feather * size`` pixels at each edge."""
    if feather <= 0:
        return np.ones((size, size), np.float32)
    edge = np.minimum(np.arange(size) + 0.5, size - np.arange(size) - 0.5)
    ramp = np.clip(edge / (feather * size), 0.0, 1.0)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: no visible seam where the ramp ends
    return np.outer(ramp, ramp).astype(np.float32)


@dataclass
class FacePassResult:
    """``frames`` IMAGE [F,H,W,3] float32; the frame indices swapped and without a face; a one-line report."""

    frames: torch.Tensor
    swapped: list[int]
    faceless: list[int]
    report: str


def _blend(frame: np.ndarray, fake_rgb: np.ndarray, M: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paste the swapped crop into the float ``[H,W,3]`` frame through the inverse alignment, weighted by ``mask``."""
    import cv2

    h, w = frame.shape[:2]
    inverse = cv2.invertAffineTransform(M)
    fake = cv2.warpAffine(fake_rgb.astype(np.float32) / 255.0, inverse, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    weight = cv2.warpAffine(mask, inverse, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0.0)[..., None]
    # frame + weight * (fake - frame): exactly the frame wherever the warped mask is 0
    blended = frame + weight * (fake - frame)
    np.clip(blended, 0.0, 1.0, out=blended, where=np.broadcast_to(weight > 0, blended.shape))
    return blended


def face_pass(analyzer: FaceAnalyzer, swapper: FaceSwapper, reference: FaceIdentity, frames: torch.Tensor,
              threshold: float = 0.5, feather: float = 0.1, det_size: int = 640, progress: ProgressFn | None = None,
              check_cancel: CancelFn | None = None) -> FacePassResult:
    """TIFF's face module on IMAGE ``[F,H,W,3]``: the largest face of each frame swapped to ``reference`` with an
    insightface swap model and blended back with a feathered mask; faceless frames unchanged."""
    check_images(frames, "frames")
    if not isinstance(reference, FaceIdentity):
        raise ValueError(f"the reference must be a TCAN_FACE, got {type(reference).__name__}")
    check_threshold(threshold)
    if not 0.0 <= float(feather) <= 0.5:
        raise ValueError(f"feather must be between 0 (hard edge) and 0.5 (fade over the whole crop), got {feather}")
    dim = int(reference.embedding.shape[0])
    if dim != swapper.embedding_dim:
        raise ValueError(f"the reference face has a {dim}-d embedding but {swapper.path.name} takes "
                         f"{swapper.embedding_dim}-d identities; analyse the reference with the buffalo_l pack")
    embedding = normalized(reference.embedding).cpu().numpy()
    mask = feather_mask(swapper.crop_size, float(feather))
    out = frames.detach().to(torch.float32, copy=True)
    swapped: list[int] = []
    faceless: list[int] = []
    for i in range(frames.shape[0]):
        if check_cancel is not None:
            check_cancel()
        image = to_uint8_rgb(frames[i])
        faces = analyzer.detect(image, threshold=threshold, det_size=det_size)
        if faces:
            fake_bgr, M = swapper.swap(np.ascontiguousarray(image[..., ::-1]), faces[0].kps, embedding)
            frame = out[i].cpu().numpy()
            blended = _blend(frame, np.ascontiguousarray(fake_bgr[..., ::-1]), M, mask)
            out[i] = torch.from_numpy(blended).to(out.device)
            swapped.append(i)
        else:
            faceless.append(i)
        if progress is not None:
            progress(1)
    total = int(frames.shape[0])
    report = f"face pass: swapped the largest face in {len(swapped)} of {total} frames"
    if faceless:
        shown = ", ".join(str(i) for i in faceless[:12]) + (" ..." if len(faceless) > 12 else "")
        report += f"; no face in frame{'s' if len(faceless) > 1 else ''} {shown} (left unchanged)"
    log.info("%s", report)
    return FacePassResult(frames=out, swapped=swapped, faceless=faceless, report=report)
