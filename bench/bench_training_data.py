"""Benchmark: time to load one training item of each stage (PNG decode, one crop, resize) on the CPU.

Run from the repository root: ``python bench/bench_training_data.py [--size 512] [--frames 16] [--items 10]``.
Two synthetic clips of 24 frames are written as PNG into a temporary folder in the authors'
layout: "smooth" frames (gradients and a moving figure, which compress like real video frames)
and "noise" frames (uniform noise, the worst case for PNG decoding). For each, stage 1 items
(reference + target + target pose) and stage 2 items (reference + ``--frames`` frames + poses)
are read ``--items`` times in one process; the table gives the mean and the slowest item.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tcan_core.training.data import ClipDataset, PairDataset, load_clips  # noqa: E402

CLIP_FRAMES = 24


def _frames(kind: str, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "noise":
        return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(CLIP_FRAMES)]
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(CLIP_FRAMES):
        frame = np.stack([x * 200, y * 180, (x + y) * 60 + i], -1)
        left = size // 4 + i * size // 100
        frame[size // 6:size * 5 // 6, left:left + size // 5] = (230, 200, 170)
        out.append(frame.clip(0, 255).astype(np.uint8))
    return out


def _write_set(root: Path, kind: str, size: int) -> None:
    rng = np.random.default_rng(0)
    for v in range(2):
        for sub in ("images", "dwpose"):
            folder = root / "train" / f"{kind}{v}" / sub
            folder.mkdir(parents=True)
            for i, frame in enumerate(_frames(kind, size, rng)):
                Image.fromarray(frame).save(folder / f"{i:05d}.png")


def _time(dataset, items: int) -> tuple[float, float]:
    dataset[0]  # the first read warms the file cache and torchvision's imports
    times = []
    for n in range(1, items + 1):
        start = time.perf_counter()
        dataset[n]
        times.append(time.perf_counter() - start)
    return float(np.mean(times)), float(np.max(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="frame and output size (square)")
    parser.add_argument("--frames", type=int, default=16, help="frames per stage-2 item")
    parser.add_argument("--items", type=int, default=10, help="items timed per row")
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}; frames {args.size}x{args.size}, output "
          f"{args.size}x{args.size}, stage 2 with {args.frames} frames\n")
    print("| frames | stage | images read per item | mean s/item | slowest s |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("smooth", "noise"):
            root = Path(tmp) / kind
            _write_set(root, kind, args.size)
            clips = load_clips(root).clips
            rows = (("1 (pairs)", PairDataset(clips, args.size, args.size), 3),
                    ("2 (clips)", ClipDataset(clips, args.size, args.size, frames=args.frames), 1 + 2 * args.frames))
            for stage, dataset, images in rows:
                mean, worst = _time(dataset, args.items)
                print(f"| {kind} | {stage} | {images} | {mean:.3f} | {worst:.3f} |")


if __name__ == "__main__":
    main()
