"""Benchmark: peak memory of the TCAN sampler vs clip length (target: all growth is latents + frames).

Run from the repository root: ``python bench/bench_memory.py [--frames 16 64 256] [--device cpu|cuda]``.
Tiny SD1.5-layout models (``tcan_core.tiny``) with every TCAN patch (motion module v2, temporal
ControlNet, PTM), training-free appearance UNet, 64 x 64 pixels, 2 DDIM steps, guidance on,
windows of 16 frames with overlap 4. Modules are frozen (``requires_grad_(False)``) as the
loaders leave them; the CPU runs one thread (memory does not depend on it, and it keeps the run
short when other work shares the CPU).

Each clip length runs in a fresh subprocess: a warm-up call (16 frames, 1 step) takes the one-time
allocations, then the measured call. Peak is the memory above what the process held just before
the measured call (models, inputs and the warm-up's leftovers included in that base), taken
separately for the denoising phase (up to the first VAE decode) and the decoding phase (the rest
of the call, the returned frames and latents included); the table's peak is the larger:

- CPU: the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``;
  ``ru_maxrss`` where that is not possible), with glibc told to return every large block on free
  (``MALLOC_MMAP_THRESHOLD_``) so that the resident set follows live tensors. The decoded frames
  [F,H,W,3] float32 and the returned latents live here.
- CUDA: ``torch.cuda.max_memory_allocated``; the decoded frames go to the CPU, so only the
  latents count there.

``clip bytes`` is what must grow with the clip: one copy of the latents [F,4,h,w] in float32 and,
on the CPU, one copy of the decoded frames. ``remainder = peak - clip bytes`` should stay flat;
the target is that it grows by less than 10% from the shortest clip to the longest.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 64
STEPS = 2
TAU = 3.0
GROWTH_TARGET = 0.10


def resident_bytes() -> int:
    """Current resident set of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes(was_reset: bool) -> int:
    """High-water mark of the resident set: VmHWM after a reset, else ru_maxrss (KiB on Linux)."""
    if was_reset:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMeter:
    """Peak memory above a base, split into phases: CUDA allocator stats, or the resident set on the CPU."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = 0
        self.was_reset = False

    def start(self) -> None:
        """Take the current memory as the base and start the first phase."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
        else:
            self.base = resident_bytes()
        self._reset()

    def split(self) -> int:
        """Peak bytes above the base since the last start or split; starts the next phase."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            peak = self.torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_resident_bytes(self.was_reset)
        self._reset()
        return max(peak - self.base, 0)

    def _reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.was_reset = reset_peak_resident()


def worker(spec: dict) -> dict:
    """Run the sampler on a clip of ``spec["frames"]`` frames; return peak bytes above the base and clip bytes."""
    import torch

    from tcan_core.animation.controlnet_t import TemporalLayers
    from tcan_core.animation.model import TCANModel
    from tcan_core.animation.patches import ControlNetPatch, MotionPatch, PTMPatch
    from tcan_core.animation.sampler import SamplerSettings, sample_animation
    from tcan_core.animation.text import encode_empty_prompt
    from tcan_core.animation.vae import DiffusersVAE
    from tcan_core.tiny.sd15 import build_tiny_controlnet, build_tiny_motion_adapter, build_tiny_sd15

    device = torch.device(spec["device"])
    frames = spec["frames"]
    # Memory does not depend on the thread count; one thread keeps the run short on a shared CPU,
    # where competing OpenMP thread pools spin against each other.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    unet, vae, text = (m.to(device).requires_grad_(False) for m in build_tiny_sd15())
    controlnet = build_tiny_controlnet().to(device).requires_grad_(False)
    adapter = build_tiny_motion_adapter("v2").to(device).requires_grad_(False)
    model = (TCANModel(unet, vae, text, "tiny")
             .with_patch(MotionPatch(adapter, "tiny v2"))
             .with_patch(ControlNetPatch(controlnet, "tiny", TemporalLayers.from_motion_adapter(adapter)))
             .with_patch(PTMPatch(TAU)))
    context = encode_empty_prompt(text)
    reference = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    poses = torch.zeros(frames, SIZE, SIZE, 3)
    for f in range(frames):
        left = 16 + f % 24
        poses[f, 16:48, left:left + 8] = torch.tensor([1.0, 0.5, 0.0])
    meter = PeakMeter(device)
    phases: dict[str, int] = {}

    class PhaseVAE(DiffusersVAE):
        """Ends the denoising phase of the meter at the first decode."""

        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            if meter_on and "denoise" not in phases:
                phases["denoise"] = meter.split()
            return super().decode(latents)

    wrapped_vae = PhaseVAE(vae, device)

    def call(clip: torch.Tensor, steps: int):
        return sample_animation(model, reference, clip, context, context, wrapped_vae,
                                SamplerSettings(width=SIZE, height=SIZE, steps=steps), device=device)

    with torch.inference_mode():
        meter_on = False
        call(poses[:16], 1)
        gc.collect()
        meter_on = True
        meter.start()
        result = call(poses, STEPS)
        phases["decode"] = meter.split()
    latents = result.latents.numel() * 4
    decoded = result.frames.numel() * result.frames.element_size() if device.type == "cpu" else 0
    return {"denoise": phases["denoise"], "decode": phases["decode"], "latents": latents, "decoded": decoded}


def run_worker(script: str | Path, spec: dict, env: dict | None = None) -> dict:
    """``python script --worker SPEC`` in a fresh process -> the JSON on its last line. ``env`` defaults to
    this one's with ``MALLOC_MMAP_THRESHOLD_`` set, so freed tensors go back to the system and the peak
    resident memory measures the case alone."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if env is None else env
    done = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark case {spec} of {Path(script).name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(spec: dict) -> dict:
    """Run :func:`worker` for ``spec`` in a fresh Python process and return its result."""
    return run_worker(__file__, spec)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    where = "GPU memory allocated" if args.device.startswith("cuda") else "resident set"
    print(f"TCAN sampler peak memory vs clip length: tiny models, {SIZE}x{SIZE} px, {STEPS} steps, windows 16/4, "
          f"all patches; {args.device}, peak of the {where} above the base before the call")
    print()
    print("| frames | peak denoising MiB | peak decoding MiB | peak MiB | latents MiB | decoded MiB | clip bytes MiB "
          "| remainder MiB | remainder vs first |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = 2 ** 20
    first = None
    for frames in args.frames:
        r = run_case(dict(frames=frames, device=args.device))
        clip_bytes = r["latents"] + r["decoded"]
        peak = max(r["denoise"], r["decode"])
        remainder = peak - clip_bytes
        first = remainder if first is None else first
        print(f"| {frames} | {r['denoise'] / mib:.1f} | {r['decode'] / mib:.1f} | {peak / mib:.1f} | "
              f"{r['latents'] / mib:.2f} | {r['decoded'] / mib:.1f} | {clip_bytes / mib:.1f} | {remainder / mib:.1f} | "
              f"{remainder / first - 1:+.1%} |", flush=True)
    growth = remainder / first - 1
    print()
    print(f"remainder grows {growth:+.1%} from {args.frames[0]} to {args.frames[-1]} frames; target < "
          f"{GROWTH_TARGET:.0%}: {'met' if growth < GROWTH_TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
