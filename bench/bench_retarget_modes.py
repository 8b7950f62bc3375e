"""How far the two retargeting modes put the body joints apart on the pack's demo clip.

Run: ``python bench/bench_retarget_modes.py [--frames N]``. Retargets the demo's driving dance
(``tcan_core.demo_scene``, smoothed as ``python -m tcan_core demo`` does) to the demo character
in ``authors_code`` and ``algorithm_1`` mode, and prints the distance between the two results'
body joints (pixels on the reference canvas): median, 90th percentile and maximum, over all
joints and per group, plus what each mode's scale and clip did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcan_core.demo_scene import character_pose, driving_dance  # noqa: E402
from tcan_core.pose.retarget import MODE_ALGORITHM_1, MODE_AUTHORS, retarget_poses  # noqa: E402
from tcan_core.pose.smooth import smooth_poses  # noqa: E402

GROUPS = {
    "all body joints": list(range(18)),
    "head (nose, eyes, ears)": [0, 14, 15, 16, 17],
    "neck": [1],
    "arms": [2, 3, 4, 5, 6, 7],
    "legs": [8, 9, 10, 11, 12, 13],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24, help="frames of the demo dance (the demo uses 24)")
    args = parser.parse_args()

    character = character_pose()
    driving = smooth_poses(driving_dance(frames=args.frames)).poses
    authors = retarget_poses(character, driving, mode=MODE_AUTHORS)
    paper = retarget_poses(character, driving, mode=MODE_ALGORITHM_1)
    a, b = authors.poses.body[:, 0], paper.poses.body[:, 0]
    both = (a[..., 2] > 0) & (b[..., 2] > 0)
    dist = np.hypot(*(a[..., :2] - b[..., :2]).transpose(2, 0, 1))

    print(f"demo clip: {args.frames} frames, character {character.width}x{character.height}; "
          f"body scale s {paper.body_scale:.3f}, neck-nose ratio {authors.head_ratio:.3f}, "
          f"{authors.clipped_bones} bone-frames held at the 1.1 clip")
    print(f"{'joints (authors_code vs algorithm_1)':<38} {'median px':>10} {'p90 px':>8} {'max px':>8}")
    for name, joints in GROUPS.items():
        d = dist[:, joints][both[:, joints]]
        print(f"{name:<38} {np.median(d):>10.2f} {np.percentile(d, 90):>8.2f} {d.max():>8.2f}")


if __name__ == "__main__":
    main()
