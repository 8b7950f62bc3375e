"""Benchmark: one TCAN sampler step vs the module forwards it runs, at SD1.5 size (target: glue <= 10%).

Run from the repository root: ``python bench/bench_sampler.py [--device cpu|cuda] [--latent N]
[--frames F] [--repeats R]``. Full-width SD1.5 modules with random weights, built from the shipped
configs: the denoising UNet (also the appearance UNet, training-free mode), the OpenPose-layout
ControlNet with TCAN's temporal layers shared from an AnimateDiff v2 motion module, the motion
module itself and PTM (tau 3); one window of ``--frames`` frames, guidance on (cfg 7.5), DDIM.

What is timed, ``--repeats`` times (each time one ``sample_animation`` call with 2 steps, then the
direct calls), median reported:

- ``step``: the second sampling step of the call, from the ``progress`` callback after step 1 to
  the one after step 2. It holds everything the sampler does per step: the appearance pass, the
  window's ControlNet and UNet calls, the reference bank's read plan, the residual and context
  batching, guidance, window fusion, the scheduler step and the preview. The VAE is left out by
  construction: a stub VAE (zeros) stands in for it, since encode and decode happen once per
  call, not per step (``bench_flops.py`` counts the decode).
- ``in step``: time inside the top-level module calls during that step (forward pre/post hooks
  on the UNet and the ControlNet), split into the appearance UNet (batch 1), the ControlNet
  (batch f) and the denoising UNet (batch 2f).
- ``direct``: the same three module calls made directly with the very inputs captured from that
  step (same tensors, same reference tokens, PTM map and motion-module state), outside the
  sampler, with the model's patches and reference attention installed as the sampler installs
  them.

Glue overhead is ``step / direct sum - 1`` (the target) and, measured in the same run and hence
insensitive to other load on the machine, ``step / in-step sum - 1``. On CUDA every hook and
stamp synchronises the device. The default size on the CPU is small (16 x 16 latent, 4 frames),
which makes a step take several seconds on two cores; on CUDA the default is TCAN's (64 x 64,
16 frames) in float16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tcan_core.animation.controlnet_t import TemporalLayers  # noqa: E402
from tcan_core.animation.model import RunState, TCANModel  # noqa: E402
from tcan_core.animation.temporal_hooks import MotionState  # noqa: E402
from tcan_core.animation.patches import ControlNetPatch, MotionPatch, PTMPatch  # noqa: E402
from tcan_core.animation.reference import ReferenceBank, reference_attention  # noqa: E402
from tcan_core.animation.sampler import SamplerSettings, sample_animation  # noqa: E402
from tcan_core.models.sd15 import shipped_config  # noqa: E402

GLUE_TARGET = 0.10
TAU = 3.0
CFG = 7.5
# AnimateDiff v2 (mm_sd_v15_v2) as a diffusers MotionAdapter.
MOTION_V2 = dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                 motion_mid_block_layers_per_block=1, motion_num_attention_heads=8, motion_norm_num_groups=32,
                 motion_max_seq_length=32, use_motion_mid_block=True)
PARTS = ("appearance UNet", "ControlNet", "UNet")


def full_size_modules(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(UNet, ControlNet, MotionAdapter) at SD1.5 / AnimateDiff v2 size, random weights, frozen; on "meta" none allocated."""
    from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel

    with torch.device(device):
        modules = (UNet2DConditionModel.from_config(shipped_config("sd15_unet")),
                   ControlNetModel.from_config(shipped_config("sd15_controlnet")),
                   MotionAdapter(**MOTION_V2))
    # torch's own .to: diffusers' override warns about keeping modules in float32, and SD1.5 has none.
    return tuple(torch.nn.Module.to(m, dtype=dtype).eval().requires_grad_(False) for m in modules)


def walking_poses(frames: int, size: int) -> torch.Tensor:
    """A bar figure moving right on black, [F,size,size,3]: enough for a non-trivial PTM map."""
    poses = torch.zeros(frames, size, size, 3)
    for f in range(frames):
        left = size // 3 + f * max(1, size // 64)
        poses[f, size // 4:3 * size // 4, left:left + max(2, size // 8)] = torch.tensor([1.0, 0.5, 0.0])
    return poses


class StubVAE:
    """Zeros in, zeros out, at SD1.5's 8x scale: the VAE runs once per call, not per step."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.new_zeros(images.shape[0], 4, images.shape[1] // 8, images.shape[2] // 8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.new_zeros(latents.shape[0], latents.shape[2] * 8, latents.shape[3] * 8, 3)


class ModuleClock:
    """Forward hooks timing the top-level calls of the UNet and ControlNet and keeping the last inputs of each."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.seconds = {part: 0.0 for part in PARTS}
        self.inputs: dict[str, tuple] = {}
        self._started: dict[int, tuple[str, float]] = {}
        self._handles = []
        for module, is_unet in ((unet, True), (controlnet, False)):
            self._handles.append(module.register_forward_pre_hook(self._before(is_unet), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after, with_kwargs=True))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, is_unet: bool):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            part = ("appearance UNet" if sample.shape[0] == 1 else "UNet") if is_unet else "ControlNet"
            # Kept by reference, not copied (a copy would be timed as part of the step): the sampler
            # makes fresh tensors for every call and never writes into them afterwards.
            self.inputs[part] = (args, kwargs)
            self.sync()
            self._started[id(module)] = (part, time.perf_counter())
        return hook

    def _after(self, module, args, kwargs, output):
        self.sync()
        part, start = self._started.pop(id(module))
        self.seconds[part] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = {part: 0.0 for part in PARTS}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def sampler_step(model: TCANModel, controlnet: torch.nn.Module, reference: torch.Tensor, poses: torch.Tensor,
                 context: torch.Tensor, size: int, device: torch.device) -> tuple[float, dict[str, float], dict]:
    """Seconds of the second of two sampling steps, the module seconds inside it and the inputs it gave them."""
    clock = ModuleClock(model.unet, controlnet, device)
    stamps: list[float] = []
    per_step: list[dict[str, float]] = []

    def progress(count: int, preview) -> None:
        clock.sync()
        stamps.append(time.perf_counter())
        per_step.append(clock.seconds)
        clock.reset()

    try:
        sample_animation(model, reference, poses, context, context, StubVAE(),
                         SamplerSettings(width=size, height=size, steps=2, cfg=CFG), device=device,
                         progress=progress)
    finally:
        clock.remove()
    if len(stamps) != 2:
        raise RuntimeError(f"expected one window per step (2 progress calls), got {len(stamps)}; "
                           "keep --frames at most the context length")
    return stamps[1] - stamps[0], per_step[1], clock.inputs


def direct_calls(model: TCANModel, controlnet: torch.nn.Module, inputs: dict, poses: torch.Tensor,
                 latent: int, device: torch.device) -> dict[str, float]:
    """Seconds of the appearance UNet, ControlNet and UNet called directly with a step's captured inputs."""
    frames = poses.shape[0]
    unet = model.unet
    run = RunState(device=device, motion=MotionState(num_frames=None))
    bank = ReferenceBank()
    use_reference = torch.tensor([False] * frames + [True] * frames, device=device)
    seconds = {}

    def timed(part: str, call) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[part] = time.perf_counter() - start

    with model.patched(run), reference_attention(bank, unet):
        bank.set_read((latent, latent), use_reference)
        args, kwargs = inputs["appearance UNet"]
        run.motion.num_frames = None
        with bank.writing("reference"):
            timed("appearance UNet", lambda: unet(*args, **kwargs))
        args, kwargs = inputs["ControlNet"]
        run.motion.num_frames = frames
        timed("ControlNet", lambda: controlnet(*args, **kwargs))
        args, kwargs = inputs["UNet"]
        for hook in run.hooks:
            hook.enter_window(hook.prepare_window(poses.to(device)), (latent, latent))
        try:
            timed("UNet", lambda: unet(*args, **kwargs))
        finally:
            for hook in reversed(run.hooks):
                hook.exit_window()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", type=int, help="latent height = width (default: 16 on the CPU, 64 on CUDA)")
    parser.add_argument("--frames", type=int, help="frames in the window (default: 4 on the CPU, 16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    latent = args.latent or (64 if cuda else 16)
    frames = args.frames or (16 if cuda else 4)
    dtype = torch.float16 if cuda else torch.float32
    size = latent * 8
    torch.set_flush_denormal(True)

    built = time.perf_counter()
    unet, controlnet, adapter = full_size_modules(device, dtype)
    built = time.perf_counter() - built
    model = (TCANModel(unet, None, None, "random SD1.5")
             .with_patch(MotionPatch(adapter, "random AnimateDiff v2"))
             .with_patch(ControlNetPatch(controlnet, "random ControlNet", TemporalLayers.from_motion_adapter(adapter)))
             .with_patch(PTMPatch(TAU)))
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(1, size, size, 3, generator=generator)
    poses = walking_poses(frames, size)
    context = torch.randn(1, 77, 768, generator=generator).to(device, dtype)

    threads = f" ({torch.get_num_threads()} threads)" if not cuda else ""
    print(f"TCAN sampler step at SD1.5 size: latent {latent}x{latent} ({size}x{size} px), window of {frames} "
          f"frames, cfg {CFG}, PTM, temporal ControlNet, training-free appearance UNet; {device}{threads}, "
          f"{dtype}; modules built in {built:.0f} s; median of {args.repeats}")
    steps, inside, direct = [], {p: [] for p in PARTS}, {p: [] for p in PARTS}
    with torch.inference_mode():
        for _ in range(args.repeats):
            step, seconds, inputs = sampler_step(model, controlnet, reference, poses, context, size, device)
            steps.append(step)
            for part in PARTS:
                inside[part].append(seconds[part])
            seconds = direct_calls(model, controlnet, inputs, poses, latent, device)
            for part in PARTS:
                direct[part].append(seconds[part])
            del inputs

    med = statistics.median
    in_sum = med([sum(inside[p][i] for p in PARTS) for i in range(args.repeats)])
    direct_sum = med([sum(direct[p][i] for p in PARTS) for i in range(args.repeats)])
    step = med(steps)
    batch = {"appearance UNet": 1, "ControlNet": frames, "UNet": 2 * frames}
    print()
    print("| call | batch | in step (s) | direct (s) |")
    print("|---|---:|---:|---:|")
    for part in PARTS:
        print(f"| {part} | {batch[part]} | {med(inside[part]):.3f} | {med(direct[part]):.3f} |")
    print(f"| sum of module forwards | | {in_sum:.3f} | {direct_sum:.3f} |")
    print(f"| whole sampler step | | {step:.3f} | |")
    print(f"| glue (step - in-step sum) | | {med([s - sum(inside[p][i] for p in PARTS) for i, s in enumerate(steps)]):.3f} | |")
    overhead = step / direct_sum - 1
    in_run = med([s / sum(inside[p][i] for p in PARTS) - 1 for i, s in enumerate(steps)])
    print()
    print(f"glue overhead: step / direct sum - 1 = {overhead * 100:+.1f}%, step / in-step sum - 1 = "
          f"{in_run * 100:+.1f}%; target <= {GLUE_TARGET * 100:.0f}%: "
          f"{'met' if overhead <= GLUE_TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
