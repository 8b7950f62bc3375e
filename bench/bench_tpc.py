"""Benchmark: TPC calibration of 300 driving frames at 512x512 on the CPU (target: 60 frames/s or more).

Run from the repository root: ``python bench/bench_tpc.py [--frames 300] [--size 512] [--repeats 5]``.
Prints one row per stage with the median wall time and frames per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcan_core.pose_format import PoseSequence  # noqa: E402
from tcan_core.tpc import calibrate  # noqa: E402
from tcan_core.tpc.preview import preview_frames  # noqa: E402

# A standing person on a unit canvas, OpenPose-18 order.
PERSON = np.array([
    [0.50, 0.19], [0.50, 0.31], [0.41, 0.31], [0.37, 0.45], [0.35, 0.59], [0.59, 0.31], [0.63, 0.45],
    [0.65, 0.59], [0.44, 0.59], [0.44, 0.77], [0.44, 0.94], [0.56, 0.59], [0.56, 0.77], [0.56, 0.94],
    [0.47, 0.16], [0.53, 0.16], [0.44, 0.18], [0.56, 0.18],
])


def make_inputs(frames: int, size: int, seed: int = 0):
    """Reference image, its pose (a close-up: the person at twice the driving size) and a dance."""
    rng = np.random.default_rng(seed)
    reference = rng.random((size, size, 3), dtype=np.float32)
    ref_pose = PoseSequence.empty(1, 1, size, size)
    ref_pose.body[0, 0, :, :2] = (PERSON - 0.5) * 2.0 * size + size / 2
    ref_pose.body[0, 0, :, 2] = rng.uniform(0.5, 1.0, 18)
    ref_pose.people[:] = 1
    driving = PoseSequence.empty(frames, 1, size, size)
    t = np.arange(frames)
    scale = 0.5 + 0.1 * np.sin(t / 17)
    theta = 0.3 * np.sin(t / 11)
    rot = np.stack([np.stack([np.cos(theta), -np.sin(theta)], -1), np.stack([np.sin(theta), np.cos(theta)], -1)], -2)
    centre = np.stack([0.5 + 0.1 * np.sin(t / 23), 0.5 + 0.05 * np.cos(t / 13)], -1) * size
    local = (ref_pose.body[0, 0, :, :2] - size / 2)[None]
    driving.body[:, 0, :, :2] = scale[:, None, None] * np.einsum("fij,fnj->fni", rot, local) + centre[:, None]
    driving.body[:, 0, :, :2] += rng.normal(0, 1.0, (frames, 18, 2))
    driving.body[:, 0, :, 2] = rng.uniform(0.2, 1.0, (frames, 18))
    driving.people[:] = 1
    return reference, ref_pose, driving


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    reference, ref_pose, driving = make_inputs(args.frames, args.size)
    mask = np.zeros(reference.shape[:2], np.float32)
    mask[args.size // 8: -args.size // 8, args.size // 4: -args.size // 4] = 1.0

    cal = calibrate(reference, ref_pose, driving)
    rows = [
        ("calibrate, k=4, face keypoints, mask from pose", lambda: calibrate(reference, ref_pose, driving)),
        ("calibrate, k=4, body keypoints, given mask",
         lambda: calibrate(reference, ref_pose, driving, reference_mask=mask, keypoint_set="body")),
        ("calibrate, k=1 (every frame warped)", lambda: calibrate(reference, ref_pose, driving, sparsity=1)),
        ("calibrate, k=4, + per-frame IMAGE and MASK batches",
         lambda: (lambda c: (c.frame_images(), c.frame_masks()))(calibrate(reference, ref_pose, driving))),
        ("preview (skeleton render + blend) only", lambda: preview_frames(cal)),
        ("whole node: calibrate + per-frame batches + preview",
         lambda: (lambda c: (c.frame_images(), c.frame_masks(), preview_frames(c)))(calibrate(reference, ref_pose, driving))),
        ("driving-person masks from poses only", lambda: cal.driving_person_masks()),
    ]
    print(f"TPC calibration: {args.frames} frames at {args.size}x{args.size}, median of {args.repeats} runs")
    print(f"{'stage':<52} {'seconds':>9} {'frames/s':>10}")
    print("-" * 73)
    for name, fn in rows:
        seconds = timed(fn, args.repeats)
        print(f"{name:<52} {seconds:>9.3f} {args.frames / seconds:>10.1f}")


if __name__ == "__main__":
    main()
