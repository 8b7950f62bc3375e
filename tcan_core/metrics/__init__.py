"""Video metrics the way the pose-animation papers compute them (DisCo's ``metric_center.py``, TCAN's copy).

Per frame: L1, PSNR, SSIM, LPIPS and the face-identity cosine, with DisCo's legacy L1 and uint8
wrap-around PSNR as separately named columns; per set: FID, FID-VID and FVD. Weights are local files
(the ``tcan/metrics`` model folder or the torch hub cache), never downloaded.
"""

from .evaluate import (
    ALL_METRICS,
    PER_FRAME,
    SET_METRICS,
    EvalSettings,
    EvaluationResult,
    FaceScorer,
    VideoPair,
    clip_starts,
    evaluate_pairs,
    plan_passes,
)
from .frames import image_to_uint8, match_frames, parse_resize
from .frechet import frechet_distance
from .report import plot_curves, to_csv, to_json, to_markdown, write_reports
from .weights import NETWORKS, WeightsSearch, identify, load_i3d, load_inception, load_lpips, load_networks, load_resnet3d

__all__ = [
    "ALL_METRICS", "NETWORKS", "PER_FRAME", "SET_METRICS", "EvalSettings", "EvaluationResult", "FaceScorer",
    "VideoPair", "WeightsSearch", "clip_starts", "evaluate_pairs", "frechet_distance", "identify", "image_to_uint8",
    "load_i3d", "load_inception", "load_lpips", "load_networks", "load_resnet3d", "match_frames", "parse_resize",
    "plan_passes", "plot_curves", "to_csv", "to_json", "to_markdown", "write_reports",
]
