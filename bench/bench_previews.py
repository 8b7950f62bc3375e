"""What the scrubber's previews cost a node: downscale + JPEG-write N frames, and draw N skeletons.

Run: ``python bench/bench_previews.py [--frames N] [--width W] [--height H]``. Prints seconds, frames
per second and megabytes written for ``nodes/previews.py`` on frames of the given size (the frames
TPC Calibrate or Pose Render hand it) and for the skeleton previews of the pose nodes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import load_pack  # noqa: E402
from tcan_core.pose_format import PoseSequence  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=768)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TCAN_TEMP_DIR"] = tmp
        previews = __import__(f"{load_pack().__name__}.nodes.previews", fromlist=["x"])
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 255, (args.frames, args.height, args.width, 3), dtype=np.uint8)
        seq = PoseSequence.empty(args.frames, 1, args.width, args.height)
        seq.body[:, 0, :, :2] = rng.uniform(0, min(args.width, args.height), (args.frames, 18, 2))
        seq.body[:, 0, :, 2] = 1.0
        seq.people[:] = 1
        rows = []
        start = time.perf_counter()
        previews.save_preview_frames(frames, "bench_images")
        rows.append(("images -> JPEG previews", time.perf_counter() - start))
        start = time.perf_counter()
        drawn = previews.pose_frames(seq)
        previews.save_preview_frames(drawn, "bench_pose")
        rows.append(("skeletons drawn + JPEG", time.perf_counter() - start))
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.jpg")) / 2**20
    print(f"{args.frames} frames of {args.width}x{args.height}, previews at longest side {previews.PREVIEW_SIDE}")
    print(f"{'step':<26}{'seconds':>10}{'frames/s':>12}")
    for name, secs in rows:
        print(f"{name:<26}{secs:>10.2f}{args.frames / secs:>12.0f}")
    print(f"written: {size:.1f} MB in {2 * args.frames} files")


if __name__ == "__main__":
    main()
