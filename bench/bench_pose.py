"""Pose stage speed on this machine: retarget, smooth and render 1,000 frames at 512 x 512.

Run: ``python bench/bench_pose.py [--frames N] [--size S]``. Prints frames per second for each
step next to its target from issue 3 (retarget and smoothing >= 1,000 fps, rendering >= 100 fps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcan_core.pose.render import render_poses  # noqa: E402
from tcan_core.pose.retarget import retarget_poses  # noqa: E402
from tcan_core.pose.smooth import smooth_poses  # noqa: E402
from tcan_core.pose_format import PoseSequence  # noqa: E402

FIGURE = np.array([(256, 110), (256, 170), (196, 170), (170, 250), (160, 330), (316, 170), (342, 250),
                   (352, 330), (226, 320), (220, 400), (215, 480), (286, 320), (292, 400), (297, 480),
                   (236, 95), (276, 95), (216, 105), (296, 105)], np.float32)


def clip(frames: int, size: int, rng: np.random.Generator) -> PoseSequence:
    """A walking-like clip with jitter, hands and face, and a few dropped points."""
    seq = PoseSequence.empty(frames, 1, size, size)
    t = np.arange(frames, dtype=np.float32)[:, None, None] / 30.0
    scale = size / 512
    sway = np.concatenate([20 * np.sin(2 * t), 5 * np.cos(3 * t)], -1)
    seq.body[:, 0, :, :2] = (FIGURE * 0.8 + 40) * scale + sway + rng.normal(0, 2, (frames, 18, 2))
    seq.body[:, 0, :, 2] = rng.uniform(0.3, 1.0, (frames, 18)) * (rng.random((frames, 18)) > 0.03)
    wrists = seq.body[:, 0, [7, 4], None, :2]
    seq.hands[:, 0, :, :, :2] = wrists + rng.uniform(-15, 15, (frames, 2, 21, 2)) * scale
    seq.hands[:, 0, :, :, 2] = 1.0
    seq.face[:, 0, :, :2] = seq.body[:, 0, 0, None, :2] + rng.uniform(-12, 12, (frames, 70, 2)) * scale
    seq.face[:, 0, :, 2] = 1.0
    seq.people[:] = 1
    return seq


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs, in seconds (the least disturbed by other work on the CPU)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    driving = clip(args.frames, args.size, rng)
    reference = clip(1, args.size, rng)
    reference.body[0, 0, :, :2] = FIGURE * args.size / 512
    reference.body[0, 0, :, 2] = 1.0
    retargeted = retarget_poses(reference, driving).poses
    smoothed = smooth_poses(retargeted).poses

    rows = [
        ("retarget", retarget_poses, (reference, driving), 1000),
        ("smooth (gap fill + One-Euro)", smooth_poses, (retargeted,), 1000),
        ("render body", lambda s: render_poses(s, hands=False, face=False), (smoothed,), 100),
        ("render body + hands + face", render_poses, (smoothed,), 100),
    ]
    print(f"pose stage, {args.frames} frames at {args.size}x{args.size}, best of {args.repeats}")
    print(f"{'step':<30} {'seconds':>9} {'frames/s':>10} {'target':>8}  ok")
    for name, fn, fn_args, target in rows:
        seconds = best_of(lambda: fn(*fn_args), args.repeats)
        fps = args.frames / seconds
        print(f"{name:<30} {seconds:>9.4f} {fps:>10.0f} {target:>8}  {'yes' if fps >= target else 'NO'}")


if __name__ == "__main__":
    main()
