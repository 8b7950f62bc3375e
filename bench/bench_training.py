"""Benchmark: TCAN training steps, stages 1 and 2: CPU time and memory (tiny), FLOPs and memory at 512 x 512 (meta).

Run from the repository root: ``python bench/bench_training.py [--steps 6] [--size 512] [--frames 16]
[--skip-cpu] [--markdown PATH]``; on a GPU: ``python bench/bench_training.py --device cuda``.

Sections (the default run, on the CPU, takes a few minutes on two cores):

1. **Tiny models on the CPU**: the real trainer (:func:`tcan_core.training.trainer.train`, the
   step that ``python -m tcan_core train`` runs: data loading, VAE encoding, the sampler's window
   forward, backward, AdamW) on the tiny SD1.5-layout models of ``tcan_core.tiny`` written to a
   temporary model tree, with a small synthetic set of clip folders, 64 x 64 pixels, stage 2 with
   16 frames, float32, one CPU thread. Each stage runs in a fresh subprocess: seconds per step is
   the median of the steps after the first (the warm-up), peak memory is the resident-set
   high-water mark (``VmHWM`` after a reset through ``/proc/self/clear_refs``, with glibc told to
   return large blocks on free) above the resident set after the trainer was built, over all
   steps. The resident set is used rather than tracemalloc (which does not see torch's tensor
   allocations) or a torch allocator statistic (the CPU allocator keeps none by default); it is an
   upper bound that includes the data loader's and the optimizer's allocations.
2. **FLOPs per training step at full size**, counted on the meta device with
   ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add = 2 FLOPs; elementwise work and
   norms are not counted) for random-weight SD1.5 modules built from the shipped configs (as in
   ``bench_flops.py``): stage 1 with batch 1 (the appearance UNet forward and backward on the
   reference latent, the frozen ControlNet forward, the denoising UNet with the APPA LoRA (peft,
   rank 16 on ``attn1``/``attn2`` ``to_q/to_k/to_v``) forward and backward), stage 2 with one clip
   of ``--frames`` frames (the motion modules and the ControlNet's temporal layers trained,
   backward through the UNet and the ControlNet), plus the VAE encoding of the target frames and the
   reference that the trainer runs at every step (no grad). The forward and the backward
   (``loss.backward()`` inside the counter; autograd runs on meta tensors) are counted separately;
   the forward is split per module by the counter's module tracker, the backward by counting it
   again with one trained part frozen (see :func:`training_flops`). The implied time is the total over 40%
   of the H100 SXM's dense BF16 peak (989 TFLOP/s: 1,979 TFLOP/s "with sparsity" in NVIDIA's H100
   Tensor Core GPU datasheet, halved for dense).
3. **Memory per stage at full size, batch 1**, computed: weights from parameter counts (frozen
   parts in bf16, or fp32 without mixed precision; trained parts in fp32), gradients of the trained
   parts in fp32, AdamW's two fp32 moments or bitsandbytes' AdamW8bit (two 8-bit moments plus one
   fp32 scale per 256-value block, fp32 moments for tensors under 4096 values, as bitsandbytes
   does), and the activations the backward needs: the bytes of the distinct tensors saved for
   backward (``torch.autograd.graph.saved_tensors_hooks`` on meta, parameters left out), with all
   modules in bf16 (or fp32). Meta tensors have neither autocast nor fused attention (they would
   keep every [B,H,L,S] attention probability, in fp32), so while counting, attention runs as the
   memory-efficient fused kernel a GPU uses (it keeps the output and the log-sum-exp) and, for
   bf16, linear and convolution inputs are cast to bf16 and group and layer norms run in fp32,
   as bf16 autocast does. With gradient checkpointing (diffusers'
   ``enable_gradient_checkpointing`` on the UNets and the ControlNet, as ``--gradient-checkpointing``
   does; non-reentrant ``torch.utils.checkpoint``), the activations are the tensors saved outside
   the checkpointed blocks, plus the largest block's own saved tensors (recomputed during the
   backward, one block at a time; measured in the run without checkpointing); non-reentrant
   checkpointing saves the blocks' inputs through the hooks in force outside them, so they are
   counted with the rest. Under autocast the trained fp32 weights are also cast to bf16 once per
   step and the copies kept for the backward; that is counted with the trained weights (6 bytes
   per trained parameter in the bf16 variants). Not counted: temporaries of a single operation,
   the gradients of activations in flight during the backward, the VAE encoding of the batch
   (under ``no_grad``, before the forward) and the CUDA context and allocator fragmentation.
   The motion modules and the temporal ControlNet layers run from forward hooks on the attention
   modules, outside the blocks diffusers checkpoints, so the trainer checkpoints them itself
   (``MotionState.checkpoint``): their inputs are kept and one layer is recomputed at a time.

Both meta sections cannot call :meth:`TrainingModel.forward` as it is: it copies the pose images to
the CPU for the hooks and hands the reference bank per-row flags that the bank checks on the CPU,
neither of which a meta tensor allows. They call the same pieces in the same order
(:func:`~tcan_core.animation.forward.appearance_pass`, then
:func:`~tcan_core.animation.forward.window_forward` under the model's own patches and reference
attention, then the epsilon MSE) with the pose images for the hooks made on the CPU and a bank
that reads the one video's reference for every row, which is what ``TrainingModel.forward``
passes for batch 1 when the reference is not dropped.

4. ``--device cuda``: the same two steps at full size with random weights, batch 1, 512 x 512,
   through :class:`~tcan_core.training.step.TrainingModel` itself (its forward, then backward,
   gradient clipping to 1.0 and an AdamW step, as the trainer's ``_step``), with bf16 autocast,
   frozen parts in bf16 and trained parts in fp32, with and without gradient checkpointing (and
   bitsandbytes' AdamW8bit when it is installed); it reports the median step time after a
   warm-up and ``torch.cuda.max_memory_allocated``. This path cannot be run on the machine the
   pack is developed on (no GPU); it is written to be run where one is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_memory import PeakMeter, run_worker  # noqa: E402
from bench_flops import flops  # noqa: E402
from bench_sampler import full_size_modules, walking_poses  # noqa: E402

from tcan_core.animation.controlnet_t import TCAN_BLOCKS, TemporalLayers  # noqa: E402
from tcan_core.animation.forward import WindowCall, WindowInput, appearance_pass, window_forward  # noqa: E402
from tcan_core.animation.model import RunState  # noqa: E402
from tcan_core.animation.reference import ReferenceBank, reference_attention  # noqa: E402
from tcan_core.animation.temporal_hooks import MotionState  # noqa: E402
from tcan_core.models.sd15 import shipped_config  # noqa: E402
from tcan_core.models.tcan_ckpt import appearance_pruned_keys  # noqa: E402
from tcan_core.training.step import TrainBatch, TrainingModel  # noqa: E402
from tcan_core.training.trainer import APPA_TARGETS  # noqa: E402

TERA = 1e12
GIB = 2**30
MIB = 2**20
# H100 SXM5, dense BF16 tensor-core peak: NVIDIA H100 Tensor Core GPU datasheet lists 1,979 TFLOP/s
# "with sparsity"; dense is half.
H100_BF16_DENSE = 989e12
UTILISATION = 0.40
# bitsandbytes' AdamW8bit: block-wise quantised states (one fp32 absmax per block of 256 values),
# 32-bit states for tensors with fewer than min_8bit_size = 4096 values.
BNB_BLOCK = 256
BNB_MIN_8BIT = 4096
VAE_ROW = "VAE encode of the targets and the reference (no grad)"
CPU_SIZE = 64
CPU_FRAMES = 16


# --- the stage's modules ------------------------------------------------------------------------


def stage_modules(stage: int, device: torch.device | str, tiny: bool = False) -> dict[str, Any]:
    """The modules of one training stage with random weights, set up as the trainer sets them up.

    Stage 1: the appearance UNet is a copy of the base UNet (trained except the layers the
    authors prune), the denoising UNet gets the APPA LoRA (peft; only the LoRA trains), the
    ControlNet is frozen. Stage 2: the motion modules and the ControlNet's temporal layers (a copy
    of the motion modules of down blocks 2 and 3) train; the appearance UNet is a frozen module of
    its own (the stage-1 file), the rest is frozen. -> {"unet", "appearance", "controlnet", "vae",
    "motion", "temporal", "text" [1,77,C]}.
    """
    from diffusers import AutoencoderKL
    from peft import LoraConfig

    device = torch.device(device)
    if tiny:
        from tcan_core.tiny.sd15 import build_tiny_controlnet, build_tiny_motion_adapter, build_tiny_sd15

        unet, vae, _ = build_tiny_sd15()
        controlnet, adapter = build_tiny_controlnet(), build_tiny_motion_adapter("v2")
        unet, vae, controlnet, adapter = (m.to(device) for m in (unet, vae, controlnet, adapter))
    else:
        unet, controlnet, adapter = full_size_modules(device)
        with torch.device(device):
            vae = AutoencoderKL.from_config(shipped_config("sd15_vae"))
    for module in (unet, vae, controlnet, adapter):
        module.requires_grad_(False)
    appearance = copy.deepcopy(unet)
    motion = temporal = None
    if stage == 1:
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=list(APPA_TARGETS)))
        for name, param in unet.named_parameters():
            param.requires_grad_("lora_" in name)
        pruned = appearance_pruned_keys(appearance)
        for name, param in appearance.named_parameters():
            param.requires_grad_(name not in pruned)
    else:
        motion = adapter.requires_grad_(True)
        temporal = TemporalLayers.from_modules(
            {i: copy.deepcopy(adapter.down_blocks[i].motion_modules) for i in TCAN_BLOCKS}).requires_grad_(True)
    text = torch.zeros(1, 77, int(unet.config.cross_attention_dim), device=device)
    return {"unet": unet, "appearance": appearance, "controlnet": controlnet, "vae": vae, "motion": motion,
            "temporal": temporal, "text": text}


def training_model(parts: dict[str, Any]) -> TrainingModel:
    """The stage's :class:`TrainingModel` (PTM off, as the authors train)."""
    return TrainingModel(parts["unet"], parts["appearance"], parts["controlnet"], parts["text"], parts["motion"],
                         parts["temporal"])


class _OneVideoBank(ReferenceBank):
    """A reference bank for meta tensors: every row reads the one stored reference.

    ``window_forward`` builds its per-row flags on the latents' device, and the bank checks them on
    the CPU, which meta tensors cannot do; for one video with its reference kept (cfg 1), every
    flag is True, so that is what this bank sets.
    """

    def set_read(self, latent_size, use_reference, calibrated_index=None, query_masks=None, key_masks=None,
                 reference_index=None) -> None:
        if use_reference.is_meta:
            use_reference = torch.ones(use_reference.shape[0], dtype=torch.bool)
        super().set_read(latent_size, use_reference, calibrated_index, query_masks, key_masks, reference_index)


@contextlib.contextmanager
def installed_on_meta(model: TrainingModel, checkpoint: bool = False) -> Any:
    """``TrainingModel.installed`` with the one-video bank: the model's patches and reference attention
    (``checkpoint``: the temporal layers recomputed in backward, as with ``--gradient-checkpointing``)."""
    device = torch.device("meta")
    run = RunState(device=device, motion=MotionState(num_frames=None, checkpoint=checkpoint))
    bank = _OneVideoBank()
    with model.tcan_model().patched(run), reference_attention(bank, model.unet, model.appearance):
        try:
            yield run, bank
        finally:
            bank.clear()


def meta_loss(model: TrainingModel, run: RunState, bank: ReferenceBank, size: int, frames: int) -> torch.Tensor:
    """The epsilon loss of one video of ``frames`` frames at ``size`` pixels on meta, as ``TrainingModel.forward``
    computes it (appearance pass, the sampler's window forward, MSE)."""
    meta = torch.device("meta")
    dtype = next(model.unet.parameters()).dtype
    latent = size // 8
    text = model.text.to(dtype)
    timesteps = torch.full((1,), 500, dtype=torch.long, device=meta)
    learns = any(p.requires_grad for p in model.appearance.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and learns):
        appearance_pass(model.appearance, bank, run.motion, "reference",
                        torch.empty(1, 4, latent, latent, device=meta, dtype=dtype), timesteps, text)
    poses = walking_poses(frames, size)
    temporal = frames if model.motion is not None else None
    call = WindowCall(torch.empty(frames, 4, latent, latent, device=meta, dtype=dtype),
                      timesteps.repeat_interleave(frames), poses.to(device=meta, dtype=dtype).movedim(-1, 1),
                      text, 0, 1, temporal, run.motion)
    prepared = [hook.prepare_window(poses) for hook in run.hooks]
    window = WindowInput(call, text, text, text, prepared, (latent, latent), cfg=1.0)
    eps = window_forward(model.unet, model.appearance, bank, run.hooks, window)
    return F.mse_loss(eps.float(), torch.empty(frames, 4, latent, latent, device=meta))


class _Named(torch.nn.Module):
    """Names the stage's modules for the FLOP counter's module tracker: ``_Named.unet``, ``_Named.motion``, ..."""

    def __init__(self, model: TrainingModel) -> None:
        super().__init__()
        for name in ("unet", "appearance", "controlnet", "motion", "temporal"):
            if getattr(model, name) is not None:
                self.add_module(name, getattr(model, name))

    def forward(self, call: Callable[[], Any]) -> Any:
        return call()


# --- FLOPs ----------------------------------------------------------------------------------------


def _part_flops(counts: dict[str, dict], prefix: str) -> int:
    """FLOPs counted under the module ``prefix``: the outermost tracked modules at or below it, summed."""
    names = [n for n in counts if n == prefix or n.startswith(prefix + ".")]
    outer = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
    return sum(sum(counts[n].values()) for n in outer)


def training_flops(stage: int, size: int, frames: int, tiny: bool = False) -> dict[str, dict[str, int | None]]:
    """FLOPs of one training step on meta: {"forward"|"backward": {part: FLOPs, "total": FLOPs}}; ``tiny``
    counts the tiny models instead of the full-size ones (for the tests).

    Forward parts come from the counter's module tracker: "appearance UNet", "ControlNet" and
    "UNet" (stage 1: the APPA LoRA inside the UNet also apart; stage 2: the ControlNet's temporal
    layers and the UNet's motion modules apart). The tracker does not follow this backward (the
    reference tokens cross from the appearance UNet into the UNet), so the backward is split by
    counting it again with one trained part frozen: stage 1, the appearance UNet's backward is
    the step's backward minus the one with the appearance UNet frozen (the rest is the UNet's, the
    LoRA's weight gradients included; the frozen ControlNet has none); stage 2, the ControlNet's
    backward is the step's minus the one with its temporal layers frozen (the rest is the UNet's,
    motion modules included).
    """
    frames = 1 if stage == 1 else frames
    parts = stage_modules(stage, "meta", tiny)
    model = training_model(parts)
    named = _Named(model)
    split = model.appearance if stage == 1 else model.temporal
    trained = [p for p in split.parameters() if p.requires_grad]

    def count(backward: bool) -> FlopCounterMode:
        counter = FlopCounterMode(display=False)
        with installed_on_meta(model) as (run, bank), counter:
            loss = named(lambda: meta_loss(model, run, bank, size, frames))
            if backward:
                loss.backward()
        model.zero_grad(set_to_none=True)
        return counter

    forward = count(False)
    step = count(True).get_total_flops()
    for p in trained:
        p.requires_grad_(False)
    # The forward does the same work whatever trains, so the step minus the forward is the backward.
    without_split = count(True).get_total_flops() - forward.get_total_flops()
    for p in trained:
        p.requires_grad_(True)

    counts = forward.get_flop_counts()
    motion = _part_flops(counts, "_Named.motion")
    temporal = _part_flops(counts, "_Named.temporal")
    fwd = {"appearance UNet": _part_flops(counts, "_Named.appearance"),
           "ControlNet": _part_flops(counts, "_Named.controlnet") - temporal,
           "UNet": _part_flops(counts, "_Named.unet") - motion}
    backward = step - forward.get_total_flops()
    bwd = {"appearance UNet": 0, "ControlNet": 0, "UNet": without_split}
    if stage == 1:
        fwd["UNet: of which APPA LoRA"] = sum(
            sum(v.values()) for n, v in counts.items() if n.endswith((".lora_A.default", ".lora_B.default")))
        bwd["UNet: of which APPA LoRA"] = None
        bwd["appearance UNet"] = backward - without_split
    else:
        fwd["ControlNet temporal layers"], fwd["UNet motion modules"] = temporal, motion
        bwd["ControlNet"] = backward - without_split
        bwd["ControlNet temporal layers"] = bwd["UNet motion modules"] = None
    fwd["total"], bwd["total"] = forward.get_total_flops(), backward
    if sum(v for k, v in fwd.items() if k in ("appearance UNet", "ControlNet", "UNet", "ControlNet temporal layers",
                                               "UNet motion modules")) != fwd["total"]:
        raise RuntimeError(f"the forward parts do not add up to the total: {fwd}")
    # The trainer encodes the target frames and the reference with the VAE at every step (no grad).
    with torch.no_grad():
        vae = flops(lambda: parts["vae"].encode(torch.empty(frames + 1, 3, size, size, device="meta")))
    fwd[VAE_ROW], bwd[VAE_ROW] = vae, 0
    fwd["total"] = fwd.pop("total") + vae
    bwd["total"] = bwd.pop("total")
    return {"forward": fwd, "backward": bwd}


def print_flops(size: int, frames: int) -> dict[int, int]:
    """Print the FLOP tables of both stages -> {stage: total FLOPs per step}."""
    totals = {}
    rate = H100_BF16_DENSE * UTILISATION
    for stage in (1, 2):
        started = time.perf_counter()
        counts = training_flops(stage, size, frames)
        shape = "batch 1" if stage == 1 else f"one clip of {frames} frames"
        print(f"\nStage {stage} FLOPs per training step at {size}x{size}, {shape} (meta, "
              f"{time.perf_counter() - started:.0f} s to count)\n")
        print("| part | forward TFLOP | backward TFLOP | total TFLOP |")
        print("|---|---:|---:|---:|")
        for part in counts["forward"]:
            fwd, bwd = counts["forward"][part], counts["backward"][part]
            if bwd is None:
                print(f"| {part} | {fwd / TERA:.3f} | (in the line above) | |")
            else:
                print(f"| {part} | {fwd / TERA:.3f} | {bwd / TERA:.3f} | {(fwd + bwd) / TERA:.3f} |")
        total = counts["forward"]["total"] + counts["backward"]["total"]
        vae = counts["forward"][VAE_ROW]
        totals[stage] = total
        model_forward = counts["forward"]["total"] - vae
        print(f"\nbackward / forward of the networks (VAE left out) = {counts['backward']['total'] / model_forward:.2f}; "
              f"{total / TERA:.2f} TFLOP per step -> {total / rate * 1000:.0f} ms per step on an H100 at "
              f"{UTILISATION:.0%} of {H100_BF16_DENSE / TERA:.0f} TFLOP/s dense BF16 ({rate / TERA:.0f} TFLOP/s), "
              f"{rate / total:.2f} steps/s; without the VAE encoding {(total - vae) / rate * 1000:.0f} ms")
    return totals


# --- memory ---------------------------------------------------------------------------------------


class SavedTensors:
    """Bytes of the distinct non-parameter tensors saved for backward, in total and per labelled module call.

    Used as ``with SavedTensors(params) as saved:``; a view counts its base once. ``blocks`` says how
    many bytes each call on the ``current`` label stack (checkpointed blocks, see
    :class:`BlockRecorder`; temporal layers, see :func:`label_temporal_layers`) saved while it ran,
    nested calls included.
    """

    def __init__(self, parameters: set[int]) -> None:
        self.parameters = parameters
        self.kept: dict[int, torch.Tensor] = {}
        self.blocks: Counter = Counter()
        self.current: list[tuple[str, int]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in self.parameters and id(base) not in self.kept:
            self.kept[id(base)] = base
            for label in set(self.current):
                self.blocks[label] += _nbytes(base)
        return tensor

    @property
    def total(self) -> int:
        return sum(_nbytes(t) for t in self.kept.values())

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class BlockRecorder:
    """A diffusers ``gradient_checkpointing_func``: checkpoints each block (non-reentrant, as diffusers'
    default) or, with ``checkpoint=False``, runs it plainly and tells ``saved`` which block is running."""

    def __init__(self, checkpoint: bool, saved: SavedTensors) -> None:
        self.checkpoint = checkpoint
        self.saved = saved
        self.calls = 0

    def __call__(self, block: torch.nn.Module, *args: Any) -> Any:
        self.calls += 1
        if self.checkpoint:
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        self.saved.current.append(("block", self.calls))
        try:
            return block(*args)
        finally:
            self.saved.current.pop()


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                     scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` as a GPU runs it: the fused memory-efficient kernel, which keeps the
    output and the log-sum-exp for the backward instead of the [B,H,L,S] probabilities."""
    if enable_gqa:
        raise NotImplementedError("grouped-query attention is not used by SD1.5 modules")
    bias = None
    if attn_mask is not None:
        bias = attn_mask
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf"))
        bias = bias.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, backward, dropout_p,
                                                                  is_causal, scale=scale)[0]


def _matmul_in(op: Callable) -> Callable:
    """``op(input, weight, ...)`` with the input cast to the weight's dtype, as autocast casts both to bf16."""
    def cast(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return op(input.to(weight.dtype), weight, *args, **kwargs)
    return cast


def _float32(op: Callable) -> Callable:
    """``op(input, shape, weight, bias, eps)`` in float32, as autocast runs group and layer norm."""
    def upcast(input: torch.Tensor, size: Any, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
        return op(input.float(), size, None if weight is None else weight.float(),
                  None if bias is None else bias.float(), eps)
    return upcast


@contextlib.contextmanager
def gpu_like_kernels(autocast: bool) -> Any:
    """On meta, run attention as the fused GPU kernel and, with ``autocast``, cast as bf16 autocast does
    (linear and convolution inputs to the weights' bf16, group and layer norm in float32): the saved tensors
    are then those of a GPU step. Meta tensors have no autocast of their own and decompose attention into
    its matrix products."""
    replaced = {"scaled_dot_product_attention": _fused_attention}
    if autocast:
        replaced.update(linear=_matmul_in(F.linear), conv2d=_matmul_in(F.conv2d),
                        group_norm=_float32(F.group_norm), layer_norm=_float32(F.layer_norm))
    originals = {name: getattr(F, name) for name in replaced}
    try:
        for name, op in replaced.items():
            setattr(F, name, op)
        yield
    finally:
        for name, op in originals.items():
            setattr(F, name, op)


@contextlib.contextmanager
def label_temporal_layers(model: TrainingModel, saved: SavedTensors) -> Any:
    """Label each call of a motion-module or temporal-ControlNet layer (AnimateDiff's temporal transformer) in
    ``saved`` for the ``with`` block."""
    calls = [0]

    def enter(module, args):
        calls[0] += 1
        saved.current.append(("temporal", calls[0]))

    def leave(module, args, output):
        saved.current.pop()

    handles = []
    for part in (model.motion, model.temporal):
        for module in (part.modules() if part is not None else ()):
            if type(module).__name__ == "AnimateDiffTransformer3D":
                handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activation_bytes(stage: int, size: int, frames: int, dtype: torch.dtype, tiny: bool = False) -> dict[str, int]:
    """Bytes saved for backward in one step on meta, all modules in ``dtype``: {"plain", "checkpointed",
    "largest block", "outside blocks", ...}; ``tiny`` measures the tiny models (for the tests)."""
    frames = 1 if stage == 1 else frames
    found: dict[str, int] = {}
    for checkpoint in (False, True):
        parts = stage_modules(stage, "meta", tiny)
        model = training_model(parts)
        torch.nn.Module.to(model, dtype=dtype)
        params = {id(p) for p in model.parameters()}
        saved = SavedTensors(params)
        recorder = BlockRecorder(checkpoint, saved)
        for module in {id(m): m for m in (model.unet, model.appearance, model.controlnet)}.values():
            module.enable_gradient_checkpointing(recorder)
        model.train()
        with (installed_on_meta(model, checkpoint) as (run, bank), gpu_like_kernels(dtype == torch.bfloat16),
              label_temporal_layers(model, saved), saved):
            loss = meta_loss(model, run, bank, size, frames)
        if recorder.calls == 0:
            raise RuntimeError("no block went through gradient checkpointing; diffusers' checkpointing hook changed")
        blocks = [v for (kind, _), v in saved.blocks.items() if kind == "block"]
        layers = [v for (kind, _), v in saved.blocks.items() if kind == "temporal"]
        if not checkpoint:
            found["plain"] = saved.total
            found["largest block"] = max(blocks)
            found["largest temporal layer"] = max(layers, default=0)
        else:
            # Non-reentrant checkpointing saves each block's inputs through the hooks in force
            # outside the block, so they are in ``saved.total``.
            # The temporal layers (run from hooks) are checkpointed by the trainer itself; one block or one
            # temporal layer is recomputed at a time during the backward.
            found["outside blocks"] = saved.total
            found["checkpointed"] = saved.total + max(found["largest block"], found["largest temporal layer"])
        del loss
    return found


def parameter_counts(stage: int) -> dict[str, Any]:
    """Parameters of the stage at full size: frozen and trained counts, and the trained tensors' sizes."""
    parts = stage_modules(stage, "meta")
    seen: dict[int, torch.nn.Parameter] = {}
    for name in ("unet", "appearance", "controlnet", "vae", "motion", "temporal"):
        if parts[name] is not None:
            for p in parts[name].parameters():
                seen[id(p)] = p
    trained = [p.numel() for p in seen.values() if p.requires_grad]
    return {"frozen": sum(p.numel() for p in seen.values() if not p.requires_grad), "trained": sum(trained),
            "trained tensors": trained}


def adam8bit_bytes(sizes: list[int]) -> int:
    """Optimizer state of bitsandbytes' AdamW8bit for trained tensors of these sizes."""
    total = 0
    for n in sizes:
        if n < BNB_MIN_8BIT:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
    return total


def memory_tables(size: int, frames: int) -> dict[int, list[tuple[str, dict[str, int]]]]:
    """Per stage, the rows of the memory table: [(variant, {column: bytes})]."""
    tables = {}
    for stage in (1, 2):
        counts = parameter_counts(stage)
        fp32 = activation_bytes(stage, size, frames, torch.float32)
        bf16 = activation_bytes(stage, size, frames, torch.bfloat16)
        frozen, trained = counts["frozen"], counts["trained"]
        adam = 8 * trained
        eight_bit = adam8bit_bytes(counts["trained tensors"])
        variants = [("fp32 everything, AdamW", 4 * frozen, 4 * trained, adam, fp32["plain"]),
                    ("bf16 mixed precision, AdamW", 2 * frozen, 6 * trained, adam, bf16["plain"]),
                    ("bf16 + gradient checkpointing, AdamW", 2 * frozen, 6 * trained, adam, bf16["checkpointed"]),
                    ("bf16 + gradient checkpointing + 8-bit AdamW", 2 * frozen, 6 * trained, eight_bit,
                     bf16["checkpointed"])]
        rows = []
        for name, frozen_b, trained_b, optimizer, activations in variants:
            row = {"weights frozen": frozen_b, "weights trained": trained_b, "gradients": 4 * trained,
                   "optimizer": optimizer, "activations": activations}
            row["total"] = sum(row.values())
            rows.append((name, row))
        tables[stage] = (counts, fp32, bf16, rows)
    return tables


def memory_markdown(tables: dict, size: int, frames: int) -> str:
    """The memory tables as Markdown, with how they were computed."""
    columns = ("weights frozen", "weights trained", "gradients", "optimizer", "activations", "total")
    lines = []
    for stage, (counts, _, _, rows) in tables.items():
        shape = "batch 1" if stage == 1 else f"batch 1 (one clip of {frames} frames)"
        lines.append(f"**Stage {stage}** at {size}x{size}, {shape}: {counts['trained'] / 1e6:.1f} M trained and "
                     f"{counts['frozen'] / 1e6:.1f} M frozen parameters (GiB)\n")
        lines.append("| variant | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for name, row in rows:
            lines.append(f"| {name} | " + " | ".join(f"{row[c] / GIB:.2f}" for c in columns) + " |")
        lines.append("")
    lines.append(
        "Computed by `python bench/bench_training.py`, not measured on a GPU: weights, gradients and optimizer "
        "state from the parameter counts (frozen parts in bf16, trained parts in fp32 plus autocast's bf16 copy, "
        "fp32 gradients, AdamW's two fp32 moments or bitsandbytes' 8-bit ones), activations as the bytes of the "
        "tensors saved for backward, counted on the meta device with `torch.autograd.graph.saved_tensors_hooks` "
        "(attention as the fused GPU kernel, autocast's casts; with checkpointing, plus the largest recomputed "
        "block or temporal layer); the CUDA context and allocator overhead come on top.")
    return "\n".join(lines)


# --- tiny models on the CPU -------------------------------------------------------------------------


def write_tiny_data(root: Path, videos: int = 3, frames: int = 20, size: int = CPU_SIZE) -> Path:
    """Clip folders (``<video>/images`` and ``<video>/dwpose``) of a coloured box moving on a plain background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for v in range(videos):
        folder = root / f"video{v}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "dwpose").mkdir(parents=True, exist_ok=True)
        color = rng.integers(50, 255, 3).astype(np.uint8)
        for f in range(frames):
            image = np.full((size, size, 3), (30, 40, 50), np.uint8)
            pose = np.zeros((size, size, 3), np.uint8)
            x, y = 8 + (f * 2 + v * 7) % (size - 24), 20 + v * 5
            image[y:y + 16, x:x + 12] = color
            pose[y + 4:y + 12, x + 4:x + 8] = 255
            Image.fromarray(image).save(folder / "images" / f"{f:04d}.png")
            Image.fromarray(pose).save(folder / "dwpose" / f"{f:04d}.png")
    return root


def cpu_worker(spec: dict) -> dict:
    """Train ``spec["steps"]`` steps of one stage with the real trainer on tiny models; times and peak memory."""
    from tcan_core.tiny.sd15 import write_tiny_model_tree
    from tcan_core.training.trainer import Trainer, TrainOptions

    torch.set_num_threads(1)
    stage = spec["stage"]
    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        tree = write_tiny_model_tree(temp / "models")
        data = write_tiny_data(temp / "data", frames=CPU_FRAMES + 4)
        stage2 = {"motion_module": tree.files["motion_v2"], "frames": CPU_FRAMES} if stage == 2 else {}
        options = TrainOptions(stage=stage, data=data, base=tree.files["sd15_safetensors"],
                               controlnet=tree.files["controlnet_ldm"],
                               out=temp / "out", width=CPU_SIZE, height=CPU_SIZE, steps=spec["steps"],
                               num_workers=0, checkpoint_every=0, validate_every=0,
                               gradient_checkpointing=spec["checkpointing"], **stage2)
        meter = PeakMeter(torch.device("cpu"))
        times: list[float] = []
        peaks: list[int] = []
        last = [0.0]

        def on_step(step: int, loss: float) -> None:
            # The peak is taken at the end of each step: the checkpoint and files written after the
            # last step are not part of a step.
            now = time.perf_counter()
            times.append(now - last[0])
            peaks.append(meter.split())
            last[0] = time.perf_counter()

        trainer = Trainer(options, progress=False, on_step=on_step)
        trained = sum(p.numel() for p in trainer.trainable)
        meter.start()
        last[0] = time.perf_counter()
        trainer.run()
    return {"seconds": times, "peak": max(peaks), "trained": trained}


def run_cpu_case(spec: dict) -> dict:
    """:func:`cpu_worker` in a fresh Python process."""
    return run_worker(__file__, spec)


def print_cpu(steps: int) -> None:
    """Print the tiny-model CPU table."""
    print(f"\nTraining steps on the CPU with the tiny models: the real trainer, {CPU_SIZE}x{CPU_SIZE} px, batch 1, "
          f"stage 2 with {CPU_FRAMES} frames, float32, 1 thread, {steps} steps (the first is the warm-up)\n")
    print("| stage | gradient checkpointing | trained params | s/step (median) | s first step | peak RSS increase MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for stage in (1, 2):
        for checkpointing in (False, True):
            result = run_cpu_case({"stage": stage, "steps": steps, "checkpointing": checkpointing})
            seconds = result["seconds"]
            print(f"| {stage} | {'on' if checkpointing else 'off'} | {result['trained'] / 1e6:.2f} M | "
                  f"{statistics.median(seconds[1:]):.3f} | {seconds[0]:.3f} | {result['peak'] / MIB:.0f} |")


# --- CUDA ---------------------------------------------------------------------------------------------


def device_step_case(stage: int, size: int, frames: int, checkpointing: bool, eight_bit: bool, steps: int,
                     device: torch.device | str = "cuda", tiny: bool = False) -> dict[str, float]:
    """Training steps through TrainingModel with random weights (full size unless ``tiny``) -> median seconds
    per step and, on CUDA, peak bytes allocated (0 elsewhere; the CPU run only checks this path)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    frames = 1 if stage == 1 else frames
    # Built on the device with diffusers' own initialisation (buffers such as the motion module's
    # positional encoding included), then cast as the trainer casts: frozen bf16, trained fp32.
    parts = stage_modules(stage, device, tiny)
    model = training_model(parts)
    vae = torch.nn.Module.to(parts["vae"], dtype=torch.bfloat16)
    torch.nn.Module.to(model, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        for module in {id(m): m for m in (model.unet, model.appearance, model.controlnet)}.values():
            module.enable_gradient_checkpointing()
    model.train()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": 1e-5, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
    if eight_bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, **kwargs)
    else:
        optimizer = torch.optim.AdamW(trainable, **kwargs)
    latent = size // 8
    generator = torch.Generator(device).manual_seed(0)

    def batch() -> TrainBatch:
        def randn(*shape):
            return torch.randn(*shape, device=device, generator=generator)

        return TrainBatch(noisy=randn(frames, 4, latent, latent), noise=randn(frames, 4, latent, latent),
                          timesteps=torch.randint(0, 1000, (1,), device=device, generator=generator),
                          poses=torch.rand(frames, 3, size, size, device=device, generator=generator),
                          reference=randn(1, 4, latent, latent),
                          use_reference=torch.ones(1, dtype=torch.bool, device=device), frames=frames)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times = []
    for _ in range(steps):
        data = batch()
        sync()
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16), model.installed(device):
            loss = model(data)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - began)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training step gave a non-finite loss {float(loss)}")
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    del model, optimizer, parts, vae
    return {"seconds": statistics.median(times[1:]) if len(times) > 1 else times[0], "peak": peak}


def print_cuda(size: int, frames: int, steps: int) -> None:
    """Print the full-size GPU table (bitsandbytes' 8-bit AdamW rows only when it is installed)."""
    try:
        import bitsandbytes  # noqa: F401

        eight_bit = [False, True]
    except ImportError:
        eight_bit = [False]
    print(f"\nFull-size training steps on {torch.cuda.get_device_name()}: random weights, {size}x{size}, batch 1, "
          f"stage 2 with {frames} frames, bf16 autocast, frozen parts bf16; {steps} steps, median after the first\n")
    print("| stage | gradient checkpointing | optimizer | s/step | max_memory_allocated GiB |")
    print("|---|---|---|---:|---:|")
    for stage in (1, 2):
        for checkpointing in (False, True):
            for eight in eight_bit:
                try:
                    found = device_step_case(stage, size, frames, checkpointing, eight, steps)
                    cells = f"{found['seconds']:.3f} | {found['peak'] / GIB:.2f}"
                except torch.OutOfMemoryError:
                    cells = "out of memory | -"
                # The failed case's tensors are freed with its frames; give the memory back before the next.
                gc.collect()
                torch.cuda.empty_cache()
                print(f"| {stage} | {'on' if checkpointing else 'off'} | {'AdamW8bit' if eight else 'AdamW'} | "
                      f"{cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="pixels of the full-size counts (multiple of 64)")
    parser.add_argument("--frames", type=int, default=16, help="frames per stage-2 clip")
    parser.add_argument("--steps", type=int, default=6, help="training steps per case (the first is a warm-up)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--skip-cpu", action="store_true", help="leave out the tiny-model CPU steps")
    parser.add_argument("--markdown", type=Path, help="also write the memory tables as Markdown to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(cpu_worker(json.loads(args.worker))))
        return
    if args.size < 64 or args.size % 64:
        parser.error(f"--size must be a multiple of 64 (the UNet halves the 1/8 latent three times), got {args.size}")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first step is a warm-up), got {args.steps}")
    if not 1 <= args.frames <= 32:
        parser.error(f"--frames must be 1..32 (AnimateDiff v2's positional encoding), got {args.frames}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and torch sees none; run without --device for the CPU "
                     "and meta-device sections")
    if args.device == "cuda":
        print_cuda(args.size, args.frames, args.steps)
        return
    if not args.skip_cpu:
        print_cpu(args.steps)
    print_flops(args.size, args.frames)
    tables = memory_tables(args.size, args.frames)
    text = memory_markdown(tables, args.size, args.frames)
    print(f"\nMemory per training step at {args.size}x{args.size}, batch 1, computed (see the docstring)\n")
    print(text)
    for stage, (_, fp32, bf16, _) in tables.items():
        print(f"\nstage {stage} activations (MiB): fp32 {fp32['plain'] / MIB:.0f}; bf16 {bf16['plain'] / MIB:.0f}, "
              f"checkpointed {bf16['checkpointed'] / MIB:.0f} = saved outside the checkpointed blocks and temporal "
              f"layers (their inputs included) {bf16['outside blocks'] / MIB:.0f} + the largest recomputed one "
              f"{max(bf16['largest block'], bf16['largest temporal layer']) / MIB:.0f}")
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
