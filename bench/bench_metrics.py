"""Benchmark: frames per second of each evaluation metric on the CPU at 256x256, and forward passes per video.

The feature networks are the real architectures with random weights (``tcan_core.tiny.metrics``) at the
real input sizes (Inception 299, 3D ResNet-50 112, I3D 224); clips of 8 frames starting at every frame
(TCAN's settings). Run from the repository root:
``python bench/bench_metrics.py [--frames 16] [--size 256] [--threads N]``.
Prints one row per metric: wall time for one video, frames per second, and the forward passes per video
(network calls on one frame, one frame pair or one clip; generated and target sides together).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcan_core.metrics import EvalSettings, VideoPair, WeightsSearch, evaluate_pairs, load_networks, plan_passes  # noqa: E402
from tcan_core.tiny.metrics import write_metric_weights  # noqa: E402

METRICS = ("L1", "L1 (DisCo)", "PSNR", "PSNR (DisCo uint8)", "SSIM", "LPIPS", "FID", "FID-VID", "FVD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    generated = np.clip(target.astype(int) + rng.integers(-20, 21, target.shape), 0, 255).astype(np.uint8)
    pair = VideoPair("bench", generated, target)
    with tempfile.TemporaryDirectory() as tmp:
        write_metric_weights(Path(tmp))
        networks, skipped = load_networks(WeightsSearch([tmp], []), ["LPIPS", "FID", "FID-VID", "FVD"])
    if skipped:
        raise RuntimeError(f"networks missing: {skipped}")
    print(f"one video of {args.frames} frames at {args.size}x{args.size}, CPU, {args.threads} thread(s), "
          f"clips of 8 frames every frame")
    print(f"{'metric':<20} {'seconds':>9} {'frames/s':>10} {'forward passes':>15}")
    for metric in METRICS:
        settings = EvalSettings(metrics=(metric,))
        # one warm-up call so the first call's one-off costs (kernel selection) are not counted
        evaluate_pairs([VideoPair("warm", generated[:9], target[:9])], settings, networks=networks)
        start = time.perf_counter()
        evaluate_pairs([pair], settings, networks=networks)
        seconds = time.perf_counter() - start
        passes = plan_passes([pair], settings, [metric]).get(metric, 0)
        print(f"{metric:<20} {seconds:>9.3f} {args.frames / seconds:>10.2f} {passes:>15d}")


if __name__ == "__main__":
    main()
