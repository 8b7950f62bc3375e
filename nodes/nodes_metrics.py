"""TCAN Video Metrics: the evaluation metrics of the papers on a generated and a target video in the graph.

Thin over ``tcan_core.metrics``: weights from the ``tcan/metrics`` model folder or the torch hub cache;
a metric whose weights are missing is left out and the report says why.
"""

from __future__ import annotations

import logging

from tcan_core.metrics import EvalSettings, FaceScorer, VideoPair, evaluate_pairs, image_to_uint8, plan_passes
from tcan_core.metrics.evaluate import ALL_METRICS, NETWORK_METRICS
from tcan_core.metrics.report import plot_curves, to_json, to_markdown
from tcan_core.metrics.weights import METRICS_FOLDER, WeightsSearch, load_networks

from . import host
from .common import CATEGORY, with_report

log = logging.getLogger(__name__)

NONE = "none"
RESIZE_CHOICES = ("none", "target", "256x256", "512x512")


class TCANVideoMetrics:
    DESCRIPTION = (
        "Scores a generated video against its target the way the pose-animation papers do (DisCo's metric code, "
        "as TCAN uses it): per frame L1, PSNR, SSIM, LPIPS and the face-identity cosine (TIFF), with DisCo's legacy "
        "L1 and uint8 wrap-around PSNR as their own columns; for the video FID, FID-VID and FVD over its clips. "
        "Weights from models/tcan/metrics or the torch hub cache; a metric without its file is left out, with the "
        "reason in the report."
    )
    CATEGORY = f"{CATEGORY}/evaluation"
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("report", "plot", "json")
    OUTPUT_TOOLTIPS = ("the table as Markdown, with the metrics left out and why",
                       "the per-frame metrics over the frames, one panel each",
                       "every number (per frame, summary) and the settings, weights by SHA-256, as JSON")

    @classmethod
    def INPUT_TYPES(cls):
        from .nodes_face import face_packs

        return {
            "required": {
                "generated": ("IMAGE", {"tooltip": "The generated frames (the TCAN Sampler's output)."}),
                "target": ("IMAGE", {"tooltip": "The ground-truth frames, as many as generated."}),
                "metrics": ("STRING", {"default": ", ".join(ALL_METRICS),
                                       "tooltip": "Comma-separated metrics to compute: " + ", ".join(ALL_METRICS)}),
                "resize": (list(RESIZE_CHOICES), {"default": "none", "tooltip": (
                    "none: sizes must match; target: resize the generated frames to the target's size (as DisCo); "
                    "WxH: resize both (DisCo's TikTok test set is 256x256).")}),
                "clip_length": ("INT", {"default": 8, "min": 1, "max": 256,
                                        "tooltip": "Frames per clip for FID-VID and FVD (TCAN: 8)."}),
                "clip_stride": ("INT", {"default": 1, "min": 1, "max": 256,
                                        "tooltip": "Frames between clip starts (TCAN: 1, a clip at every frame)."}),
                "face_pack": ([NONE, *face_packs()], {"default": NONE, "tooltip": (
                    "insightface pack for the face-identity cosine (models/insightface/models); none leaves it out.")}),
            },
            "optional": {
                "reference_face": ("TCAN_FACE", {"tooltip": (
                    "Compare each generated face with this identity (TIFF) instead of the target frame's face.")}),
            },
        }

    def measure(self, generated, target, metrics: str, resize: str, clip_length: int, clip_stride: int,
                face_pack: str, reference_face=None):
        settings = EvalSettings(metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()), resize=resize,
                                clip_length=clip_length, clip_stride=clip_stride)
        settings.check()
        pair = VideoPair("video", image_to_uint8(generated, "generated"), image_to_uint8(target, "target"))
        skipped: dict[str, str] = {}
        face = None
        if "face cosine" in settings.metrics:
            if face_pack == NONE:
                if reference_face is not None:
                    raise ValueError("a reference_face is connected but face_pack is 'none': choose the insightface "
                                     "pack the reference face was analysed with")
                skipped["face cosine"] = "face_pack is 'none'"
            else:
                from .nodes_face import load_analyzer

                face = FaceScorer(load_analyzer(face_pack)[1], reference_face)
        search = WeightsSearch(host.folder_paths_for(METRICS_FOLDER))
        networks, missing = load_networks(search, [m for m in settings.metrics if m in NETWORK_METRICS])
        skipped.update(missing)
        active = [m for m in settings.metrics if m not in skipped]
        total = sum(plan_passes([pair], settings, active).values())
        with host.Progress(total, "TCAN Video Metrics") as bar:
            result = evaluate_pairs([pair], settings, networks=networks, skipped=skipped, face=face,
                                    device=host.torch_device(), progress=bar.update,
                                    check_cancel=host.check_interrupt)
        report = to_markdown(result)
        return with_report(report, (report, plot_curves(result.per_frame["video"]), to_json(result)))


NODE_CLASS_MAPPINGS = {"TCANVideoMetrics": TCANVideoMetrics}
NODE_DISPLAY_NAME_MAPPINGS = {"TCANVideoMetrics": "TCAN Video Metrics"}
