"""The metrics engine: per-frame and set-level numbers for pairs of generated and target videos.

Per frame (averaged per video, then over videos): L1, L1 (DisCo), PSNR, PSNR (DisCo uint8), SSIM, LPIPS
and the face-identity cosine (TIFF). Per set (all videos together): FID over all frames, FID-VID
(3D ResNet-50 features of 112x112 clips) and FVD (I3D logits of 224x224 clips), as DisCo's
``metric_center.py`` defines them. The clip settings default to TCAN's copy of that code: clips of
8 frames starting at every frame (its frame-folder path), each clip one sample of the set.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from . import pixel
from .frames import RESIZE_NONE, match_frames, parse_resize, resize_clean
from .frechet import frechet_distance
from .nets3d import KINETICS_MEAN_255
from .weights import LoadedNetwork, WeightsSearch, load_networks

log = logging.getLogger(__name__)

PER_FRAME = ("L1", "L1 (DisCo)", "PSNR", "PSNR (DisCo uint8)", "SSIM", "LPIPS", "face cosine")
SET_METRICS = ("FID", "FID-VID", "FVD")
ALL_METRICS = PER_FRAME + SET_METRICS
NETWORK_METRICS = ("LPIPS", "FID", "FID-VID", "FVD")
# Lower is better for every metric but these.
HIGHER_IS_BETTER = ("PSNR", "PSNR (DisCo uint8)", "SSIM", "face cosine")
CLIP_POOLS = ("clip", "video")
FID_VID_SIZE, FVD_SIZE, FID_SIZE = 112, 224, 299

ProgressFn = Callable[[int], None]
CancelFn = Callable[[], None]


@dataclass
class EvalSettings:
    """What to compute and how; the defaults reproduce TCAN's ``tool/metrics`` settings."""

    metrics: tuple[str, ...] = ALL_METRICS
    resize: str = RESIZE_NONE
    clip_length: int = 8
    clip_stride: int = 1
    clip_pool: str = "clip"
    batch_size: int = 8
    face_threshold: float = 0.5
    # Network input sizes (DisCo's); other values make the numbers incomparable with published ones and exist
    # for quick runs (the tests and the benchmark at small sizes).
    fid_size: int = FID_SIZE
    fid_vid_size: int = FID_VID_SIZE
    fvd_size: int = FVD_SIZE

    def check(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_METRICS)}")
        parse_resize(self.resize)
        if int(self.clip_length) < 1 or int(self.clip_stride) < 1:
            raise ValueError(f"clip length and stride must be at least 1, got {self.clip_length} and "
                             f"{self.clip_stride}")
        if self.clip_pool not in CLIP_POOLS:
            raise ValueError(f"clip pooling {self.clip_pool!r} is not one of {', '.join(CLIP_POOLS)}")
        if min(int(self.fid_size), int(self.fid_vid_size), int(self.fvd_size)) < 32:
            raise ValueError(f"network input sizes must be at least 32, got {self.fid_size}, {self.fid_vid_size}, "
                             f"{self.fvd_size}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")

    def as_dict(self) -> dict:
        return {"metrics": list(self.metrics), "resize": self.resize, "clip_length": int(self.clip_length),
                "clip_stride": int(self.clip_stride), "clip_pool": self.clip_pool,
                "frames": "8-bit RGB (IMAGE tensors rounded to 8 bits)",
                "fid": f"pytorch-fid Inception-v3 pool3 (2048-d), clean-fid PIL bicubic resize to "
                       f"{self.fid_size}x{self.fid_size}",
                "fid_vid": f"3D ResNet-50 pooled features (2048-d), PIL bicubic {self.fid_vid_size}x{self.fid_vid_size}, "
                           "0..255 minus the Kinetics mean",
                "fvd": f"I3D Kinetics logits averaged over time, PIL bicubic {self.fvd_size}x{self.fvd_size}, -1..1",
                "ssim": "grey (OpenCV BGR2GRAY), scikit-image 7x7 uniform window",
                "lpips": "v0.1, AlexNet, inputs in -1..1",
                "face_threshold": self.face_threshold}


@dataclass
class VideoPair:
    """One generated video and its target, uint8 ``[F,H,W,3]`` each (see :func:`frames.image_to_uint8`)."""

    name: str
    generated: np.ndarray
    target: np.ndarray


@dataclass
class FaceScorer:
    """The face analysis for the identity metric, and an optional reference face (``TCAN_FACE``): with one,
    each generated frame is compared with it (TIFF); without, with the target frame's face."""

    analyzer: object
    reference: object | None = None


@dataclass
class EvaluationResult:
    """Every number: per video and frame, per video means, the set metrics, and what was left out and why."""

    per_frame: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    per_video: dict[str, dict[str, float | None]] = field(default_factory=dict)
    summary: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def clip_starts(frames: int, length: int, stride: int) -> list[int]:
    """First frame of every full clip of ``length`` frames, one every ``stride`` frames."""
    return list(range(0, frames - length + 1, stride))


def plan_passes(pairs: Sequence[VideoPair], settings: EvalSettings, metrics: Sequence[str]) -> dict[str, int]:
    """Forward passes (network calls on one frame or one clip) per metric for these videos."""
    counts = {m: 0 for m in metrics if m in ("LPIPS", "face cosine", *SET_METRICS)}
    for p in pairs:
        f = p.target.shape[0]
        clips = len(clip_starts(f, settings.clip_length, settings.clip_stride))
        for m in counts:
            counts[m] += {"LPIPS": f, "face cosine": 2 * f, "FID": 2 * f}.get(m, 2 * clips)
    return counts


def _check_clips(pairs: Sequence[VideoPair], settings: EvalSettings, metric: str) -> None:
    for p in pairs:
        if p.target.shape[0] < settings.clip_length:
            raise ValueError(
                f"{metric} needs clips of {settings.clip_length} frames, but the video {p.name!r} has only "
                f"{p.target.shape[0]}; give longer videos, lower the clip length, or leave {metric} out")
    clips = sum(len(clip_starts(p.target.shape[0], settings.clip_length, settings.clip_stride)) for p in pairs)
    if settings.clip_pool == "clip" and clips < 2:
        raise ValueError(
            f"{metric} needs at least 2 clips, these videos give {clips} (clips of {settings.clip_length} frames "
            f"every {settings.clip_stride}): the Frechet distance compares the mean and covariance of two sets, and "
            "one clip has no covariance, so the number would be meaningless. Give longer or more videos, lower the "
            f"clip length or stride, or leave {metric} out")
    if settings.clip_pool == "video" and len(pairs) < 2:
        raise ValueError(
            f"{metric} with one feature per video needs at least 2 videos, got {len(pairs)}: the Frechet distance "
            "compares the mean and covariance of two sets, and one video has no covariance, so the number would be "
            "meaningless. Evaluate more videos, or use clip pooling (each clip one sample)")


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


class _Runner:
    def __init__(self, device: torch.device, batch_size: int, progress: ProgressFn | None,
                 check_cancel: CancelFn | None):
        self.device, self.batch_size = device, batch_size
        self.progress, self.check_cancel = progress, check_cancel

    def run(self, module: torch.nn.Module, inputs: torch.Tensor, fn=None) -> np.ndarray:
        """``fn(module, batch)`` (default ``module(batch)``) over ``inputs`` in batches -> stacked numpy features."""
        module.to(self.device)
        out = []
        with torch.inference_mode():
            for sl in _batches(inputs.shape[0], self.batch_size):
                if self.check_cancel is not None:
                    self.check_cancel()
                batch = inputs[sl].to(self.device, torch.float32)
                out.append((fn(module, batch) if fn else module(batch)).float().cpu().numpy())
                if self.progress is not None:
                    self.progress(batch.shape[0])
        return np.concatenate(out) if out else np.zeros((0, 0))


def _clips(frames: torch.Tensor, starts: list[int], length: int) -> torch.Tensor:
    """``[F,3,H,W]`` -> ``[N,3,length,H,W]`` clips starting at ``starts``."""
    return torch.stack([frames[s:s + length] for s in starts]).permute(0, 2, 1, 3, 4).contiguous()


def _video_features(runner: _Runner, net: LoadedNetwork, frames: np.ndarray, size: int, settings: EvalSettings,
                    kind: str) -> np.ndarray:
    """Clip features of one video ``[N,D]`` (or ``[1,D]``, their mean, for video pooling)."""
    resized = resize_clean(frames, size)
    if kind == "FID-VID":
        resized = resized - torch.tensor(KINETICS_MEAN_255).view(1, 3, 1, 1)
    else:
        resized = resized / 127.5 - 1.0
    starts = clip_starts(frames.shape[0], settings.clip_length, settings.clip_stride)
    feats = []
    for sl in _batches(len(starts), runner.batch_size):
        feats.append(runner.run(net.module, _clips(resized, starts[sl], settings.clip_length),
                                lambda m, x: m.features(x)))
    feats = np.concatenate(feats)
    return feats.mean(0, keepdims=True) if settings.clip_pool == "video" else feats


def face_cosines(scorer: FaceScorer, generated: np.ndarray, target: np.ndarray, threshold: float,
                 progress: ProgressFn | None = None, check_cancel: CancelFn | None = None) -> list[float | None]:
    """Per frame: cosine of the largest generated face's identity with the reference's (or the target frame's
    largest face's); ``None`` where a face is missing."""
    from ..face.identity import normalized

    analyzer = scorer.analyzer
    ref = None
    if scorer.reference is not None:
        ref = normalized(scorer.reference.embedding).cpu().numpy()
    out: list[float | None] = []
    for g, t in zip(generated, target):
        if check_cancel is not None:
            check_cancel()
        gen_faces = analyzer.detect(g, threshold=threshold)
        other = ref
        if ref is None:
            tgt_faces = analyzer.detect(t, threshold=threshold)
            other = analyzer.embedding(t, tgt_faces[0]) if tgt_faces else None
        if gen_faces and other is not None:
            out.append(float(np.dot(analyzer.embedding(g, gen_faces[0]), other)))
        else:
            out.append(None)
        if progress is not None:
            progress(2)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def evaluate_pairs(pairs: Sequence[VideoPair], settings: EvalSettings = EvalSettings(),
                   search: WeightsSearch | None = None, networks: dict[str, LoadedNetwork] | None = None,
                   skipped: dict[str, str] | None = None, face: FaceScorer | None = None,
                   device: torch.device | str = "cpu", progress: ProgressFn | None = None,
                   check_cancel: CancelFn | None = None) -> EvaluationResult:
    """All requested metrics for ``pairs``; a metric whose weights are missing is left out with the reason.

    Networks come from ``networks`` (metric -> loaded network) or are loaded through ``search``.
    """
    settings.check()
    if not pairs:
        raise ValueError("there are no videos to evaluate")
    resize = parse_resize(settings.resize)
    matched = []
    for p in pairs:
        g, t = match_frames(p.generated, p.target, resize, p.name)
        matched.append(VideoPair(p.name, g, t))
    pairs = matched
    wanted = list(settings.metrics)
    result = EvaluationResult(skipped=dict(skipped or {}))
    if networks is None:
        needed = [m for m in wanted if m in NETWORK_METRICS]
        networks, missing = load_networks(search or WeightsSearch(), needed)
        result.skipped.update(missing)
    for m in wanted:
        if m in NETWORK_METRICS and m not in networks and m not in result.skipped:
            result.skipped[m] = "its network was not given"
    if "face cosine" in wanted and face is None and "face cosine" not in result.skipped:
        result.skipped["face cosine"] = ("no face analysis: put an insightface pack (antelopev2 or buffalo_l) into "
                                         "models/insightface/models and install insightface and onnxruntime")
    if "SSIM" in wanted and importlib.util.find_spec("skimage") is None:
        result.skipped["SSIM"] = "the Python package 'scikit-image' is not installed (pip install scikit-image)"
    active = [m for m in wanted if m not in result.skipped]
    for m in ("FID-VID", "FVD"):
        if m in active:
            _check_clips(pairs, settings, m)
    if "FID" in active and sum(p.target.shape[0] for p in pairs) < 2:
        raise ValueError("FID needs at least 2 frames on each side, got 1: the Frechet distance compares the mean "
                         "and covariance of two sets, and one frame has no covariance, so the number would be "
                         "meaningless. Give more frames, or leave FID out")
    result.counts = plan_passes(pairs, settings, active)
    device = torch.device(device)
    runner = _Runner(device, int(settings.batch_size), progress, check_cancel)

    set_feats: dict[str, tuple[list, list]] = {m: ([], []) for m in SET_METRICS if m in active}
    for p in pairs:
        if check_cancel is not None:
            check_cancel()
        g, t = p.generated, p.target
        frame_values: dict[str, list[float | None]] = {}
        simple = {"L1": pixel.l1, "L1 (DisCo)": pixel.l1_disco, "PSNR": pixel.psnr,
                  "PSNR (DisCo uint8)": pixel.psnr_disco, "SSIM": pixel.ssim}
        for m, fn in simple.items():
            if m in active:
                frame_values[m] = [float(v) for v in fn(g, t)]
        if "LPIPS" in active:
            gt = torch.from_numpy(g).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            tt = torch.from_numpy(t).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            both = torch.stack([gt, tt], dim=1)
            values = runner.run(networks["LPIPS"].module, both, lambda m, x: m(x[:, 0], x[:, 1]).flatten())
            frame_values["LPIPS"] = [float(v) for v in values]
        if "face cosine" in active:
            frame_values["face cosine"] = face_cosines(face, g, t, settings.face_threshold, progress, check_cancel)
        if "FID" in active:
            for side, frames in ((0, g), (1, t)):
                x = resize_clean(frames, settings.fid_size) / 255.0
                set_feats["FID"][side].append(runner.run(networks["FID"].module, x))
        for m, size in (("FID-VID", settings.fid_vid_size), ("FVD", settings.fvd_size)):
            if m in active:
                for side, frames in ((0, g), (1, t)):
                    set_feats[m][side].append(_video_features(runner, networks[m], frames, size, settings, m))
        result.per_frame[p.name] = frame_values
        result.per_video[p.name] = {m: _mean(v) for m, v in frame_values.items()}

    for m in PER_FRAME:
        if m in active:
            # over all frames of all videos, as DisCo averages its per-image scores
            result.summary[m] = _mean([v for p in pairs for v in result.per_frame[p.name][m]])
    if "face cosine" in result.summary and result.summary["face cosine"] is not None:
        result.summary["face distance"] = 1.0 - result.summary["face cosine"]
    for m, (gen, tgt) in set_feats.items():
        result.summary[m] = frechet_distance(np.concatenate(gen), np.concatenate(tgt), m)
    result.settings = settings.as_dict()
    result.settings["videos"] = {p.name: {"frames": int(p.target.shape[0]),
                                          "size": f"{p.target.shape[2]}x{p.target.shape[1]}"} for p in pairs}
    result.settings["weights"] = {m: net.settings() for m, net in networks.items() if m in active}
    result.settings["forward_passes"] = result.counts
    return result
