"""Face analysis with an insightface model pack: detection, ArcFace alignment, identity embeddings.

A pack (``antelopev2`` or ``buffalo_l``) is a folder of ONNX files; each file's role is found by
insightface's own router (``insightface.model_zoo.get_model``, which reads the model's
signature), never by its name. Only the detector (SCRFD, with 5 landmarks) and the recognition
model (ArcFace, Deng et al. 2019) are used. insightface is imported lazily: importing this module
works without it, and :func:`require_face_tools` says what to install.

The results feed ID-Animator (He et al. 2024; faces aligned to the ArcFace template and cropped
to 224), IP-Adapter FaceID and TIFF's face pass (the 512-d embedding) and TIFF's identity metric
(:func:`face_similarity`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..onnx_session import providers_for
from .identity import CROP_SIZE, FaceIdentity, normalized

log = logging.getLogger(__name__)

# pack folder -> (detector, recognition model): the published file names, for error messages only
PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
MIN_USEFUL_FACE = 64
PACKS_HINT = "put packs in models/insightface/models/<name>/ (the .onnx files directly in that folder)"

ProgressFn = Callable[[int], None]
CancelFn = Callable[[], None]


class FaceToolsMissing(RuntimeError):
    """insightface or onnxruntime cannot be imported."""


def require_face_tools() -> None:
    """Import onnxruntime and insightface, or raise :class:`FaceToolsMissing` saying what to ``pip install``."""
    install = ("Install them into the Python that runs ComfyUI: `pip install insightface onnxruntime-gpu` "
               "(NVIDIA GPU) or `pip install insightface onnxruntime` (CPU only)")
    for module in ("onnxruntime", "insightface"):
        try:
            __import__(module)
        except ImportError as exc:
            raise FaceToolsMissing(f"{module} is not installed; face analysis needs insightface and "
                                   f"onnxruntime. {install}") from exc
        except Exception as exc:  # a broken build (e.g. compiled against another numpy) fails otherwise
            raise FaceToolsMissing(f"{module} is installed but failed to import ({type(exc).__name__}: {exc}). "
                                   f"Reinstall it: {install}") from exc


@contextlib.contextmanager
def _quiet_insightface():
    """Silence insightface 0.7.3's prints (``Applied providers: ...``, ``inswapper-shape: ...``) into the
    debug log, and scikit-image >= 0.26's FutureWarning for ``SimilarityTransform.estimate`` that
    insightface's alignment calls on every face."""
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated", category=FutureWarning)
        yield
    if out.getvalue().strip():
        log.debug("insightface: %s", out.getvalue().strip())


@contextlib.contextmanager
def quiet_alignment():
    """Only the scikit-image FutureWarning filter, for per-face alignment (stdout left alone there)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated", category=FutureWarning)
        yield


def resolve_providers(providers: Sequence[str] | None = None, device: str | None = None) -> list:
    """The onnxruntime execution providers to use: ``providers`` that are available, else those a torch ``device``
    asks for (:func:`tcan_core.onnx_session.providers_for`, the rule the pose models follow; no device: CUDA
    when available, then the CPU)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if providers is None:
        return providers_for(device, available)
    wanted = list(providers)
    usable = [p for p in wanted if p in available]
    if not usable:
        raise ValueError(f"none of the onnxruntime providers {wanted} is available here (available: {available}); "
                         "install onnxruntime-gpu for CUDA or pick CPUExecutionProvider")
    return usable


def route_model(path: str | Path, providers: Sequence[str]):
    """One ONNX file -> the insightface model class its signature routes to (or None), on ``providers``."""
    from insightface.model_zoo import get_model

    try:
        with _quiet_insightface():
            return get_model(str(path), providers=list(providers))
    except Exception as exc:  # onnxruntime's load errors (a truncated download) do not say what to do
        raise ValueError(f"onnxruntime could not open {path} ({type(exc).__name__}: {exc}); the file is damaged or "
                         "incomplete: download it again") from exc


def describe_model(model) -> str:
    """What insightface's router made of a file, for error messages."""
    kinds = {"RetinaFace": "a face detector", "SCRFD": "a face detector", "ArcFaceONNX": "a face recognition model",
             "Landmark": "a landmark model", "Attribute": "a gender/age model", "INSwapper": "a face swap model"}
    if model is None:
        return "a model insightface does not know (its input/output signature matches none of its models)"
    return kinds.get(type(model).__name__, type(model).__name__)


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if p.is_file()) if folder.is_dir() else []


def _check_pack_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or ".." in name or Path(name).is_absolute():
        raise ValueError(f"face pack name {name!r} must be a plain folder name such as 'antelopev2' or "
                         "'buffalo_l' (no path separators, no '..')")


def _nested_pack(folder: Path) -> Path | None:
    """``folder/<sub>/`` holding the .onnx files when a pack was unpacked one folder too deep."""
    if not folder.is_dir():
        return None
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if _onnx_files(sub):
            return sub
    return None


def list_face_packs(insightface_dirs: Sequence[str]) -> list[str]:
    """Names of the pack folders ``<dir>/models/<name>/`` holding .onnx files (also those nested one level deeper)."""
    names: list[str] = []
    for d in insightface_dirs:
        models = Path(d) / "models"
        if not models.is_dir():
            continue
        for folder in sorted(p for p in models.iterdir() if p.is_dir()):
            if (_onnx_files(folder) or _nested_pack(folder)) and folder.name not in names:
                names.append(folder.name)
    return names


def resolve_face_pack(insightface_dirs: Sequence[str], name: str) -> Path:
    """The folder of pack ``name`` under ``<dir>/models/``; a clear error when it is missing or misplaced."""
    _check_pack_name(name)
    searched = [Path(d) / "models" for d in insightface_dirs]
    for models in searched:
        if _onnx_files(models / name):
            return models / name
    for models in searched:
        inner = _nested_pack(models / name)
        if inner is not None:
            raise FileNotFoundError(f"the face pack {name!r} is one folder too deep: move the .onnx files from "
                                    f"{inner}{os.sep} up to {models / name}{os.sep} (unzipping often adds the "
                                    "extra folder)")
    available = list_face_packs(insightface_dirs)
    where = ", ".join(str(s) for s in searched) or "(no insightface folder is configured)"
    found = f"found: {', '.join(available)}" if available else "no packs found"
    raise FileNotFoundError(f"face pack {name!r} not found in {where} ({found}); {PACKS_HINT}")


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detected face in image pixels: ``bbox`` [4] x1, y1, x2, y2, ``kps`` [5,2] (eyes, nose, mouth corners)."""

    bbox: np.ndarray
    kps: np.ndarray
    score: float

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def _check_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"face analysis takes an RGB uint8 image [H,W,3], got {got}")
    return image


def _check_det_size(det_size: int) -> int:
    if int(det_size) != det_size or det_size < 32 or det_size % 32:
        raise ValueError(f"the detection size must be a multiple of 32 (640 is insightface's default), got {det_size}")
    return int(det_size)


def check_threshold(threshold: float) -> float:
    """A detection threshold in (0, 1], or a ValueError repeating it."""
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"the detection threshold must be in (0, 1], got {threshold}")
    return float(threshold)


_ANALYZERS: dict[tuple, FaceAnalyzer] = {}


def clear_analyzer_cache() -> None:
    """Drop the cached face analyzers; their ONNX sessions are freed with them."""
    _ANALYZERS.clear()


def analyzer_cache_bytes() -> int:
    """Bytes of the ONNX files behind the cached face analyzers (0 when none is cached)."""
    return sum(size for key in _ANALYZERS for _name, _mtime, size in key[2])


def files_fingerprint(files: Sequence[Path]) -> tuple:
    """Name, mtime and size of each file: a cache key part that changes when a model file is replaced."""
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)


class FaceAnalyzer:
    """A loaded pack: its SCRFD detector and ArcFace recognition model (insightface classes)."""

    def __init__(self, pack_dir: Path, detector, recognizer, providers: Sequence[str]):
        self.pack_dir = Path(pack_dir)
        self.detector = detector
        self.recognizer = recognizer
        self.providers = list(providers)
        self.detector_file = Path(detector.model_file).name
        self.recognizer_file = Path(recognizer.model_file).name
        self.provider = detector.session.get_providers()[0]
        self.embedding_dim = self._embedding_dim()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"FaceAnalyzer({self.pack_dir.name}: {self.detector_file} + {self.recognizer_file}, "
                f"{self.embedding_dim}-d, {self.provider})")

    @property
    def name(self) -> str:
        return self.pack_dir.name

    @classmethod
    def load(cls, pack_dir: str | Path, providers: Sequence[str] | None = None,
             device: str | None = None) -> FaceAnalyzer:
        """Route each .onnx of ``pack_dir`` through insightface and keep the detector and recognition model (cached);
        ``providers`` or else ``device`` choose where they run (:func:`resolve_providers`)."""
        require_face_tools()
        folder = Path(pack_dir).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"face pack folder {folder} does not exist; {PACKS_HINT}")
        files = _onnx_files(folder)
        providers = resolve_providers(providers, device)
        key = (str(folder), tuple(map(str, providers)), files_fingerprint(files))
        if key in _ANALYZERS:
            return _ANALYZERS[key]
        expected = PACK_FILES.get(folder.name)
        # the published names are tried first only so a full pack (5 files, ~300 MB) need not open
        # its landmark models; each file's role still comes from insightface's router
        hinted = [folder / n for n in expected or () if (folder / n) in files]
        found: dict[str, object] = {}
        skipped = []
        for path in hinted + [p for p in files if p not in hinted]:
            if "detection" in found and "recognition" in found:
                break
            model = route_model(path, providers)
            task = getattr(model, "taskname", None)
            if task in ("detection", "recognition") and task not in found:
                found[task] = model
            else:
                skipped.append(f"{path.name} ({describe_model(model)})")
        for task, role, index in (("detection", "face detector", 0), ("recognition", "face recognition model", 1)):
            if task not in found:
                want = (f"{expected[index]} ({folder.name}'s {role})" if expected else
                        f"an insightface {role} such as {PACK_FILES['buffalo_l'][index]} or "
                        f"{PACK_FILES['antelopev2'][index]}")
                have = ", ".join(p.name for p in files) or "no .onnx files"
                raise FileNotFoundError(f"the face pack folder {folder} has no {role}: expected {want} there "
                                        f"(found: {have})")
        detector = found["detection"]
        if not getattr(detector, "use_kps", False):
            raise ValueError(f"the detector {Path(detector.model_file).name} in {folder} gives no facial landmarks; "
                             "alignment needs a 5-point SCRFD model such as det_10g.onnx or scrfd_10g_bnkps.onnx")
        if skipped:
            log.debug("face pack %s: not used: %s", folder.name, "; ".join(skipped))
        analyzer = cls(folder, detector, found["recognition"], providers)
        log.info("loaded %r", analyzer)
        _ANALYZERS[key] = analyzer
        return analyzer

    def _embedding_dim(self) -> int:
        dim = self.recognizer.output_shape[-1]
        if isinstance(dim, int):
            return dim
        size = self.recognizer.input_size
        return int(self.recognizer.get_feat(np.zeros((size[1], size[0], 3), np.uint8)).shape[-1])

    def detect(self, image: np.ndarray, threshold: float = 0.5, det_size: int = 640) -> list[DetectedFace]:
        """Faces in an RGB uint8 ``[H,W,3]`` image, largest box first (the image is letterboxed to ``det_size``)."""
        image = _check_rgb_uint8(image)
        threshold, det_size = check_threshold(threshold), _check_det_size(det_size)
        bgr = np.ascontiguousarray(image[..., ::-1])  # insightface models take OpenCV's BGR
        with self._lock:
            self.detector.det_thresh = threshold
            boxes, kpss = self.detector.detect(bgr, input_size=(det_size, det_size))
        faces = [DetectedFace(bbox=b[:4].astype(np.float32), kps=k.astype(np.float32), score=float(b[4]))
                 for b, k in zip(boxes, kpss)]
        return sorted(faces, key=lambda f: -f.area)

    def embedding(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        """The unit-norm ArcFace embedding ``[D]`` of ``face`` in an RGB uint8 image (aligned to 112 first)."""
        from insightface.app.common import Face

        bgr = np.ascontiguousarray(_check_rgb_uint8(image)[..., ::-1])
        with quiet_alignment():
            raw = self.recognizer.get(bgr, Face(bbox=face.bbox, kps=face.kps, det_score=face.score))
        raw = np.asarray(raw, np.float32).reshape(-1)
        norm = float(np.linalg.norm(raw))
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError(f"the recognition model {self.recognizer_file} gave an empty embedding for the face at "
                             f"{np.round(face.bbox).astype(int).tolist()}")
        return raw / norm


def aligned_crop(image: np.ndarray, kps: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """RGB uint8 ``[size,size,3]``: the face warped onto the ArcFace 5-point template (ID-Animator's 224 crop)."""
    from insightface.utils.face_align import norm_crop

    if size <= 0 or (size % 112 and size % 128):
        raise ValueError(f"an aligned crop size must be a multiple of 112 or 128 (ArcFace template), got {size}")
    kps = np.asarray(kps, np.float32)
    if kps.shape != (5, 2):
        raise ValueError(f"alignment needs 5 landmarks [5,2], got {list(kps.shape)}")
    with quiet_alignment():
        return norm_crop(_check_rgb_uint8(image), landmark=kps, image_size=size)


def check_images(images: torch.Tensor, what: str = "image") -> None:
    """Raise a clear ValueError unless ``images`` is a ComfyUI IMAGE ``[B,H,W,3]``."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"the {what} input must be an IMAGE tensor [B,H,W,3], got {type(images).__name__}")
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[0] == 0:
        raise ValueError(f"the {what} input is an empty batch (0 images, shape {list(images.shape)}); connect "
                         "a node that outputs at least one image (check the frame range of a video loader)")
    if images.ndim == 4 and images.shape[-1] == 3 and min(images.shape[1:3]) < 1:
        raise ValueError(f"the {what} input has images of size {images.shape[2]}x{images.shape[1]} (empty); "
                         "connect images with at least one pixel")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (drop the alpha channel)" if images.ndim == 4 and images.shape[-1] == 4 else ""
        raise ValueError(f"the {what} input must be an IMAGE [B,H,W,3], got shape {list(images.shape)}{hint}")


def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """One IMAGE frame ``[H,W,3]`` float 0..1 -> numpy uint8 RGB."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@dataclass
class FaceAnalysisResult:
    """``identity``: the TCAN_FACE; ``detections`` / ``chosen``: every face per image and the one used; ``notes``."""

    identity: FaceIdentity
    detections: list[list[DetectedFace]]
    chosen: list[int]
    notes: list[str] = field(default_factory=list)


def _no_face(i: int, count: int, threshold: float) -> ValueError:
    return ValueError(f"no face found in image {i + 1} (of {count}) at detection threshold {threshold:g}; use a "
                      "closer crop of the face or lower the detection threshold")


def analyze_images(analyzer: FaceAnalyzer, images: torch.Tensor, threshold: float = 0.5, index: int = -1,
                   det_size: int = 640) -> FaceAnalysisResult:
    """IMAGE ``[B,H,W,3]`` -> one identity: per image the largest face (or face ``index``, 0 = largest),
    its 224 aligned crop (ID-Animator) and unit ArcFace embedding; the identity's embedding is the
    renormalised mean of the images' embeddings."""
    check_images(images, "face image")
    if int(index) != index or index < -1:
        raise ValueError(f"face index must be -1 (the largest face) or 0, 1, ... (by size, 0 = largest), got {index}")
    count = int(images.shape[0])
    detections, chosen, notes, crops, embeddings = [], [], [], [], []
    for i in range(count):
        image = to_uint8_rgb(images[i])
        faces = analyzer.detect(image, threshold=threshold, det_size=det_size)
        if not faces:
            raise _no_face(i, count, threshold)
        if index >= len(faces):
            raise ValueError(f"face index {index} asked for, but image {i + 1} (of {count}) has {len(faces)} "
                             f"face{'s' if len(faces) > 1 else ''} (indices 0 to {len(faces) - 1}, 0 = largest)")
        pick = max(index, 0)
        face = faces[pick]
        if len(faces) > 1:
            used = "the largest (index 0)" if pick == 0 else f"index {pick}"
            notes.append(f"image {i + 1}: {len(faces)} faces, used {used}")
        if min(face.width, face.height) < MIN_USEFUL_FACE:
            notes.append(f"image {i + 1}: the face is {round(face.width)}x{round(face.height)} px, smaller than the "
                         f"{MIN_USEFUL_FACE} px the detector and ID-Animator's {CROP_SIZE} crop work well with; "
                         "use a closer crop")
        detections.append(faces)
        chosen.append(pick)
        crops.append(torch.from_numpy(aligned_crop(image, face.kps, CROP_SIZE)).float() / 255.0)
        embeddings.append(torch.from_numpy(analyzer.embedding(image, face)))
    notes.append(f"face analysis ran on {analyzer.provider}")
    for note in notes:
        log.info("%s", note)
    first = detections[0][chosen[0]]
    n_faces = len(detections[0])
    if count > 1:
        source = f"{analyzer.name}, {count} images"
    elif n_faces > 1:
        source = (f"{analyzer.name}, largest of {n_faces} faces" if chosen[0] == 0 else
                  f"{analyzer.name}, face {chosen[0]} of {n_faces}")
    else:
        source = analyzer.name
    identity = FaceIdentity(
        crops=torch.stack(crops), weights=torch.full((count,), 1.0 / count),
        embedding=normalized(torch.stack(embeddings).mean(0)),
        kps=torch.from_numpy(first.kps.copy()), bbox=torch.from_numpy(first.bbox.copy()),
        image_size=(int(images.shape[2]), int(images.shape[1])), det_score=first.score, source=source,
    )
    return FaceAnalysisResult(identity=identity, detections=detections, chosen=chosen, notes=notes)


CHOSEN_COLOR = (40, 220, 60)
OTHER_COLOR = (150, 150, 150)
LANDMARK_COLORS = ((255, 60, 60), (60, 120, 255), (255, 220, 40), (255, 60, 200), (60, 230, 230))


def draw_faces(images: torch.Tensor, detections: Sequence[Sequence[DetectedFace]],
               chosen: Sequence[int]) -> torch.Tensor:
    """IMAGE ``[B,H,W,3]`` with each face's box (the chosen one green, others gray), index and 5 landmarks."""
    import cv2

    check_images(images, "preview image")
    if len(detections) != images.shape[0] or len(chosen) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(detections)} detection lists and {len(chosen)} choices")
    out = []
    for image, faces, pick in zip(images, detections, chosen):
        canvas = np.ascontiguousarray(to_uint8_rgb(image))
        h, w = canvas.shape[:2]
        thick = max(1, round(min(h, w) / 300))
        order = [j for j in range(len(faces)) if j != pick] + ([pick] if 0 <= pick < len(faces) else [])
        for j in order:
            face = faces[j]
            color = CHOSEN_COLOR if j == pick else OTHER_COLOR
            x1, y1, x2, y2 = (int(round(float(v))) for v in face.bbox)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thick, cv2.LINE_AA)
            cv2.putText(canvas, str(j), (x1 + 2 * thick, max(y1 - 3 * thick, 10 * thick)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * thick, color, thick, cv2.LINE_AA)
            radius = max(2, round(max(face.width, face.height) / 40))
            for (px, py), c in zip(face.kps, LANDMARK_COLORS):
                cv2.circle(canvas, (int(round(float(px))), int(round(float(py)))), radius, c, -1, cv2.LINE_AA)
        out.append(torch.from_numpy(canvas).float() / 255.0)
    return torch.stack(out)


@dataclass
class SimilarityResult:
    """Per-frame cosine to the reference (``None``: no face), their mean, the faceless frames and a plot."""

    scores: list[float | None]
    mean: float | None
    faceless: list[int]
    plot: torch.Tensor

    def report(self) -> str:
        """One line: mean, lowest frame, faceless frames (frame numbers are 0-based indices)."""
        total = len(self.scores)
        if self.mean is None:
            return f"face similarity: no face found in any of the {total} frames"
        scored = [(s, i) for i, s in enumerate(self.scores) if s is not None]
        low, low_i = min(scored)
        text = f"face similarity (ArcFace cosine): mean {self.mean:.3f} over {len(scored)} of {total} frames, " \
               f"min {low:.3f} at frame {low_i}"
        if self.faceless:
            text += f"; no face in frame{'s' if len(self.faceless) > 1 else ''} {_frame_list(self.faceless)}"
        return text


def _frame_list(frames: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in frames[:limit])
    return shown + (f" and {len(frames) - limit} more" if len(frames) > limit else "")


def face_similarity(analyzer: FaceAnalyzer, reference: FaceIdentity, frames: torch.Tensor, threshold: float = 0.5,
                    det_size: int = 640, progress: ProgressFn | None = None,
                    check_cancel: CancelFn | None = None) -> SimilarityResult:
    """Cosine of the reference embedding with the largest face's ArcFace embedding in each frame ``[F,H,W,3]``
    (TIFF, identity metric: face-embedding cosine against the reference); frames without a face
    score ``None`` and are left out of the mean.

    Compare within one pack: embeddings of different recognition models live in different spaces.
    """
    check_images(frames, "frames")
    if not isinstance(reference, FaceIdentity):
        raise ValueError(f"the reference must be a TCAN_FACE, got {type(reference).__name__}")
    dim = int(reference.embedding.shape[0])
    if dim != analyzer.embedding_dim:
        raise ValueError(f"the reference face has a {dim}-d embedding but the pack {analyzer.name} gives "
                         f"{analyzer.embedding_dim}-d; analyse the reference and the frames with the same face pack")
    ref = normalized(reference.embedding).cpu().numpy()
    scores: list[float | None] = []
    faceless: list[int] = []
    for i in range(frames.shape[0]):
        if check_cancel is not None:
            check_cancel()
        image = to_uint8_rgb(frames[i])
        faces = analyzer.detect(image, threshold=threshold, det_size=det_size)
        if faces:
            scores.append(float(np.dot(ref, analyzer.embedding(image, faces[0]))))
        else:
            scores.append(None)
            faceless.append(i)
        if progress is not None:
            progress(1)
    scored = [s for s in scores if s is not None]
    mean = float(np.mean(scored)) if scored else None
    result = SimilarityResult(scores=scores, mean=mean, faceless=faceless, plot=plot_similarity(scores, mean))
    log.info("%s", result.report())
    return result


PLOT_SIZE = (384, 768)  # height, width


def plot_similarity(scores: Sequence[float | None], mean: float | None,
                    size: tuple[int, int] = PLOT_SIZE) -> torch.Tensor:
    """IMAGE ``[1,H,W,3]``: similarity per frame (line and points, y from -1 to 1), faceless frames as red
    crosses on the bottom axis, the mean as a dashed line."""
    import cv2

    h, w = size
    left, right, top, bottom = 56, 20, 44, 44
    canvas = np.full((h, w, 3), 255, np.uint8)
    font, aa = cv2.FONT_HERSHEY_SIMPLEX, cv2.LINE_AA
    n = len(scores)

    def x_of(i: float) -> int:
        return int(round(left + (w - left - right) * ((i + 0.5) / max(n, 1))))

    def y_of(v: float) -> int:
        return int(round(top + (h - top - bottom) * (1.0 - (v + 1.0) / 2.0)))

    for v in (-1.0, -0.5, 0.0, 0.5, 1.0):
        cv2.line(canvas, (left, y_of(v)), (w - right, y_of(v)), (200, 200, 200) if v else (140, 140, 140), 1, aa)
        cv2.putText(canvas, f"{v:+.1f}" if v else "0", (6, y_of(v) + 4), font, 0.4, (60, 60, 60), 1, aa)
    step = max(1, math.ceil(n / 12))
    for i in range(0, n, step):
        cv2.line(canvas, (x_of(i), h - bottom), (x_of(i), h - bottom + 4), (60, 60, 60), 1, aa)
        cv2.putText(canvas, str(i), (x_of(i) - 4 * len(str(i)), h - bottom + 18), font, 0.4, (60, 60, 60), 1, aa)
    cv2.putText(canvas, "frame", (w - right - 44, h - 8), font, 0.4, (60, 60, 60), 1, aa)
    line = (40, 90, 220)
    for i in range(n - 1):
        if scores[i] is not None and scores[i + 1] is not None:
            cv2.line(canvas, (x_of(i), y_of(scores[i])), (x_of(i + 1), y_of(scores[i + 1])), line, 2, aa)
    for i, s in enumerate(scores):
        if s is None:
            x, y, r = x_of(i), h - bottom - 6, 5
            cv2.line(canvas, (x - r, y - r), (x + r, y + r), (220, 30, 30), 2, aa)
            cv2.line(canvas, (x - r, y + r), (x + r, y - r), (220, 30, 30), 2, aa)
        else:
            cv2.circle(canvas, (x_of(i), y_of(s)), 3, line, -1, aa)
    if mean is not None:
        y = y_of(mean)
        for x in range(left, w - right, 12):
            cv2.line(canvas, (x, y), (min(x + 6, w - right), y), (240, 140, 0), 2, aa)
        title = f"face similarity to the reference (ArcFace cosine): mean {mean:.3f}"
    else:
        title = "face similarity to the reference: no face found in any frame"
    faceless = sum(s is None for s in scores)
    if faceless:
        title += f", {faceless} frame{'s' if faceless > 1 else ''} without a face (x)"
    cv2.putText(canvas, title, (left, 26), font, 0.5, (20, 20, 20), 1, aa)
    return torch.from_numpy(canvas).float().div(255.0).unsqueeze(0)
