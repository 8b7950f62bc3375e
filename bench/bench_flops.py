"""Benchmark: FLOPs per output frame of TCAN at 512 x 512, counted on the meta device (vs the authors' 87.8 TFLOP).

Run from the repository root: ``python bench/bench_flops.py [--frames 256] [--steps 25] [--size 512]``.
Nothing is computed: full-size SD1.5 modules (UNet, OpenPose-layout ControlNet, VAE from the
shipped configs; AnimateDiff v2 MotionAdapter) are built on the meta device and
``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products, convolutions and
attention they would run (one multiply-add = 2 FLOPs; elementwise work and norms are not counted).

``sample_animation`` itself cannot run on meta tensors: it makes data-dependent checks (the
reference bank copies its per-row flags to the CPU, the sampler checks the latents for NaN, DDIM
indexes its tables by the timestep, previews and frames go to the CPU). So the count is made in
two parts:

1. Call census, from the real sampler: ``sample_animation`` runs on the CPU with the tiny
   SD1.5-layout models (64 x 64 pixels, 2 steps, the clip length and windows given) with every
   patch on, and forward hooks count each top-level call and its batch: appearance UNet,
   ControlNet, denoising UNet, VAE encode and decode. Calls per step are the counts divided by
   the steps (the plan is the same at every step), so the census holds for ``--steps``.
2. FLOPs per call, at full size on meta, with the exact inputs the sampler gives each module at
   ``--size``: the appearance UNet on one reference latent (its mid/up self-attention inputs
   stored), the ControlNet on a window (batch f, temporal layers in down blocks 2 and 3, pose
   images at full resolution), the denoising UNet on ``[uncond ; cond]`` (batch 2f, motion
   modules, PTM, the ControlNet residuals, reference tokens as extra keys in the mid/up ``attn1``
   of the conditional half only), the VAE decoder per frame and the VAE encoder on the
   reference. The patches and processors are the pack's own, installed as the sampler installs
   them. The motion modules, the reference keys and the ControlNet's temporal layers are
   separated by counting again with each of them off.

Per output frame = (calls per step x FLOPs per call x steps + VAE calls x FLOPs) / frames, for a
``--frames``-frame open clip (default 256: 21 windows of 16 with overlap 4, 1.31 window frames per
output frame, close to the 4/3 of an endless clip). The text encoder (the empty prompt, once per
graph) is left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sampler import TAU, full_size_modules, walking_poses  # noqa: E402

from tcan_core.animation.controlnet_t import TemporalLayers  # noqa: E402
from tcan_core.animation.model import RunState, TCANModel  # noqa: E402
from tcan_core.animation.temporal_hooks import MotionState  # noqa: E402
from tcan_core.animation.patches import ControlNetPatch, MotionPatch, PTMPatch  # noqa: E402
from tcan_core.animation.reference import ReferenceBank, reference_attention  # noqa: E402
from tcan_core.animation.sampler import SamplerSettings, sample_animation  # noqa: E402
from tcan_core.animation.vae import DiffusersVAE  # noqa: E402
from tcan_core.models.sd15 import shipped_config  # noqa: E402
from tcan_core.tiny.sd15 import build_tiny_controlnet, build_tiny_motion_adapter, build_tiny_sd15  # noqa: E402

AUTHORS_TFLOP_PER_FRAME = 87.8
CENSUS_SIZE = 64
CENSUS_STEPS = 2
TERA = 1e12


class CountingVAE(DiffusersVAE):
    """A DiffusersVAE that counts its encode and decode calls by batch size."""

    def __init__(self, vae: torch.nn.Module, calls: Counter) -> None:
        super().__init__(vae)
        self.calls = calls

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls[("VAE encode", images.shape[0])] += 1
        return super().encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls[("VAE decode", latents.shape[0])] += 1
        return super().decode(latents)


def call_census(frames: int, context_length: int, overlap: int) -> Counter:
    """Top-level module calls of one real ``sample_animation`` run on tiny models: {(call, batch): count}."""
    unet, vae, text = (m.requires_grad_(False) for m in build_tiny_sd15())
    controlnet = build_tiny_controlnet().requires_grad_(False)
    adapter = build_tiny_motion_adapter("v2").requires_grad_(False)
    model = (TCANModel(unet, vae, text, "tiny")
             .with_patch(MotionPatch(adapter, "tiny v2"))
             .with_patch(ControlNetPatch(controlnet, "tiny", TemporalLayers.from_motion_adapter(adapter)))
             .with_patch(PTMPatch(TAU)))
    calls: Counter = Counter()

    def counter(kind):
        def hook(module, args, kwargs):
            batch = (args[0] if args else kwargs["sample"]).shape[0]
            name = kind if kind != "UNet" else ("appearance UNet" if batch == 1 else "UNet")
            calls[(name, batch)] += 1
        return hook

    handles = [unet.register_forward_pre_hook(counter("UNet"), with_kwargs=True),
               controlnet.register_forward_pre_hook(counter("ControlNet"), with_kwargs=True)]
    context = torch.zeros(1, 77, int(unet.config.cross_attention_dim))
    try:
        with torch.inference_mode():
            sample_animation(model, torch.rand(1, CENSUS_SIZE, CENSUS_SIZE, 3), walking_poses(frames, CENSUS_SIZE),
                             context, context, CountingVAE(vae, calls),
                             SamplerSettings(width=CENSUS_SIZE, height=CENSUS_SIZE, steps=CENSUS_STEPS,
                                             context_length=context_length, context_overlap=overlap))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def flops(call) -> int:
    """FLOPs ``call()`` would run, counted by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()


def flops_per_call(size: int, window: int) -> dict[str, int]:
    """FLOPs of one call of each module, and of the parts switched off, at ``size`` pixels and ``window`` frames."""
    from diffusers import AutoencoderKL

    meta = torch.device("meta")
    unet, controlnet, adapter = full_size_modules(meta)
    with meta:
        vae = AutoencoderKL.from_config(shipped_config("sd15_vae")).eval().requires_grad_(False)
    model = (TCANModel(unet, None, None, "SD1.5 on meta")
             .with_patch(MotionPatch(adapter, "AnimateDiff v2 on meta"))
             .with_patch(ControlNetPatch(controlnet, "ControlNet on meta", TemporalLayers.from_motion_adapter(adapter)))
             .with_patch(PTMPatch(TAU)))
    latent = size // 8
    t = torch.tensor(500, device=meta)
    context = torch.empty(1, 77, 768, device=meta)
    poses = walking_poses(window, size)
    reference_latent = torch.empty(1, 4, latent, latent, device=meta)
    x = torch.empty(window, 4, latent, latent, device=meta)
    use_reference = torch.tensor([False] * window + [True] * window)
    counts: dict[str, int] = {}
    run = RunState(device=meta, motion=MotionState(num_frames=None))
    bank = ReferenceBank()
    with torch.inference_mode(), model.patched(run), reference_attention(bank, unet):
        with bank.writing("reference"):
            counts["appearance UNet"] = flops(lambda: unet(reference_latent, t, encoder_hidden_states=context,
                                                           return_dict=False))
        cond = poses.to(meta).movedim(-1, 1)
        window_context = context.expand(window, -1, -1)
        counts["ControlNet, no temporal layers"] = flops(lambda: controlnet(
            x, t, encoder_hidden_states=window_context, controlnet_cond=cond, return_dict=False))
        run.motion.num_frames = window
        result = {}

        def control():
            result["residuals"] = controlnet(x, t, encoder_hidden_states=window_context, controlnet_cond=cond,
                                             return_dict=False)
        counts["ControlNet"] = flops(control)
        down, mid = result["residuals"]
        down, mid = [r.repeat(2, 1, 1, 1) for r in down], mid.repeat(2, 1, 1, 1)
        model_in = torch.cat([x, x])
        both_contexts = context.expand(2 * window, -1, -1)

        def denoise():
            unet(model_in, t, encoder_hidden_states=both_contexts, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid, return_dict=False)

        for hook in run.hooks:
            hook.enter_window(hook.prepare_window(poses), (latent, latent))
        bank.set_read((latent, latent), use_reference)
        counts["UNet"] = flops(denoise)
        run.motion.num_frames = None
        counts["UNet, no motion modules"] = flops(denoise)
        run.motion.num_frames = window
        bank.set_read((latent, latent), torch.zeros(2 * window, dtype=torch.bool))
        counts["UNet, no reference keys"] = flops(denoise)
        for hook in reversed(run.hooks):
            hook.exit_window()
        bank.clear()
        counts["VAE decode"] = flops(lambda: vae.decode(torch.empty(1, 4, latent, latent, device=meta)))
        counts["VAE encode"] = flops(lambda: vae.encode(torch.empty(1, 3, size, size, device=meta)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=256, help="clip length the windows are averaged over")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    args = parser.parse_args()

    started = time.perf_counter()
    census = call_census(args.frames, args.window, args.overlap)
    per_call = flops_per_call(args.size, min(args.window, args.frames))
    window = min(args.window, args.frames)

    def calls(name: str) -> tuple[float, int]:
        """(calls per step or per clip, batch) of ``name`` in the census; the VAE runs once per clip."""
        found = [(count, batch) for (kind, batch), count in census.items() if kind == name]
        if len(found) != 1:
            raise RuntimeError(f"expected one batch size for {name}, got {found}; the sampler's plan changed")
        count, batch = found[0]
        return (count if name.startswith("VAE") else count / CENSUS_STEPS), batch

    appearance, appearance_batch = calls("appearance UNet")
    windows, control_batch = calls("ControlNet")
    unet_windows, unet_batch = calls("UNet")
    decodes, decode_batch = calls("VAE decode")
    encodes, encode_batch = calls("VAE encode")
    if (appearance_batch, control_batch, unet_batch) != (1, window, 2 * window) or unet_windows != windows:
        raise RuntimeError(f"the sampler's calls differ from the counted shapes: {dict(census)}")

    frames, steps = args.frames, args.steps
    motion = per_call["UNet"] - per_call["UNet, no motion modules"]
    reference = per_call["UNet"] - per_call["UNet, no reference keys"]
    temporal = per_call["ControlNet"] - per_call["ControlNet, no temporal layers"]
    rows = [
        ("UNet, spatial layers (batch 2f)", (per_call["UNet"] - motion - reference) * windows * steps),
        ("UNet, motion modules", motion * windows * steps),
        ("UNet, reference keys in mid/up attn1", reference * windows * steps),
        ("ControlNet, spatial layers (batch f)", per_call["ControlNet, no temporal layers"] * windows * steps),
        ("ControlNet, temporal layers", temporal * windows * steps),
        ("appearance UNet (batch 1, once per step)", per_call["appearance UNet"] * appearance * steps),
        (f"VAE decode (batch {decode_batch})", per_call["VAE decode"] * decodes * decode_batch),
        ("VAE encode (reference, once per clip)", per_call["VAE encode"] * encodes * encode_batch),
    ]
    total = sum(value for _, value in rows) / frames

    print(f"TCAN FLOPs per output frame at {args.size}x{args.size}: {steps} steps, guidance, windows of {window} "
          f"with overlap {args.overlap}, averaged over a {frames}-frame open clip; counted on meta in "
          f"{time.perf_counter() - started:.0f} s")
    print(f"call plan from the real sampler (tiny models, {CENSUS_STEPS} steps): per step {windows:g} windows "
          f"(ControlNet batch {control_batch}, UNet batch {unet_batch}) and {appearance:g} appearance UNet call "
          f"(batch 1); per clip {decodes:g} VAE decode calls of {decode_batch} frames, {encodes:g} VAE encode; "
          f"{windows * window / frames:.3f} window frames per output frame")
    print()
    print("| component | TFLOP per call | TFLOP per frame | share |")
    print("|---|---:|---:|---:|")
    per_call_column = [
        per_call["UNet"] - motion - reference, motion, reference, per_call["ControlNet, no temporal layers"],
        temporal, per_call["appearance UNet"], per_call["VAE decode"] * decode_batch,
        per_call["VAE encode"] * encode_batch,
    ]
    for (name, value), one in zip(rows, per_call_column):
        print(f"| {name} | {one / TERA:.3f} | {value / frames / TERA:.2f} | {value / frames / total:.1%} |")
    print(f"| total | | {total / TERA:.2f} | 100% |")
    print()
    ratio = total / TERA / AUTHORS_TFLOP_PER_FRAME
    print(f"total {total / TERA:.1f} TFLOP per frame vs {AUTHORS_TFLOP_PER_FRAME} TFLOP for the authors' pipeline: "
          f"ratio {ratio:.3f} ({ratio - 1:+.1%}); "
          + ("within 5% of the authors' count: no work beyond theirs" if abs(ratio - 1) <= 0.05 else
             "more than 5% away from the authors' count: look at the breakdown above"))


if __name__ == "__main__":
    main()
