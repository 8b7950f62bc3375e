"""``python -m tcan_core train``: one TCAN training stage from the command line (one process or many).

Run it as it is for one GPU (or the CPU), or under ``accelerate launch`` / ``torchrun`` for many
GPUs and machines: accelerate reads the launcher's environment, and only the main process writes
files and logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _train(args: argparse.Namespace) -> int:
    from .trainer import TrainingOutOfMemory, TrainOptions, train

    options = TrainOptions(
        stage=args.stage, data=Path(args.data), base=Path(args.base), controlnet=Path(args.controlnet),
        out=Path(args.out), motion_module=_path(args.motion_module), appearance=_path(args.appearance),
        lora=_path(args.lora), lora_only=args.lora_only, width=args.width, height=args.height, frames=args.frames,
        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, learning_rate=args.learning_rate,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha if args.lora_alpha is not None else float(args.lora_rank),
        reference_drop=args.reference_drop, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, use_8bit_adam=args.use_8bit_adam,
        half_frozen=not args.fp32_frozen, ptm_tau=args.ptm_tau, tpc=args.tpc, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, validate_every=args.validate_every,
        validation_steps=args.validation_steps, validation_frames=args.validation_frames, seed=args.seed,
        num_workers=args.num_workers, resume=args.resume, overwrite=args.overwrite, save_dtype=args.save_dtype)
    try:
        result = train(options, progress=not args.no_progress)
    except (FileExistsError, TrainingOutOfMemory, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        # Under a launcher every process returns here; only the main one reports.
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint {result.checkpoint}. Continue with the same command "
              "and --resume.", flush=True)
        return 130
    for name, path in result.files.items():
        print(f"wrote {path}", flush=True)
    if result.losses:
        print(f"stage {args.stage}: {result.step} steps, last loss {result.losses[-1]:.4f}", flush=True)
    return 0


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """The ``train`` sub-command and its options (the defaults are the TCAN authors')."""
    p = sub.add_parser("train", help="train TCAN stage 1 (appearance UNet + APPA LoRA) or stage 2 (motion modules + "
                                     "temporal ControlNet) on prepared videos; one GPU, or many with accelerate launch")
    p.add_argument("--stage", type=int, required=True, choices=(1, 2), help="1: image level, 2: video level")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="training set: a prepare-data folder, the TCAN authors' TikTok root (train/<video>/images, "
                        "dwpose), or a folder of clip folders with images/ and dwpose/")
    p.add_argument("--base", required=True, metavar="CKPT", help="SD1.5 checkpoint (single file or diffusers folder)")
    p.add_argument("--controlnet", required=True, metavar="FILE", help="the OpenPose ControlNet (frozen)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, logs, validation clips, weights")
    p.add_argument("--motion-module", metavar="FILE",
                   help="stage 2: AnimateDiff motion module to start from (the authors use mm_sd_v15_v2.ckpt)")
    p.add_argument("--appearance", metavar="FILE",
                   help="stage 2: the stage-1 appearance_unet.safetensors (default: the base UNet, training-free); "
                        "stage 1 with --lora-only: the appearance UNet to keep (default: the base UNet's weights)")
    p.add_argument("--lora", metavar="FILE", help="stage 2: the stage-1 appa_lora.safetensors (kept frozen)")
    p.add_argument("--lora-only", action="store_true",
                   help="stage 1: train only the APPA LoRA (fine-tune one character from a few clips)")
    p.add_argument("--width", type=int, default=512, help="training width, a multiple of 8 (512)")
    p.add_argument("--height", type=int, default=512, help="training height, a multiple of 8 (512)")
    p.add_argument("--frames", type=int, default=16, help="stage 2: frames per clip (16)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per process and micro-step (1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (1)")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps in all (10000)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate, constant (1e-5)")
    p.add_argument("--lora-rank", type=int, default=16, help="stage 1: APPA LoRA rank (16)")
    p.add_argument("--lora-alpha", type=float, default=None, help="stage 1: APPA LoRA alpha (default: the rank)")
    p.add_argument("--reference-drop", type=float, default=0.1,
                   help="stage 1: probability of dropping a sample's reference, for guidance (0.1, as the authors)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"),
                   help="autocast; frozen models in that precision too (bf16 on recent GPUs)")
    p.add_argument("--fp32-frozen", action="store_true", help="keep the frozen models in float32 under mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA; pip install bitsandbytes)")
    p.add_argument("--ptm-tau", type=float, default=0.0, help="stage 2: PTM tau during training (0: off, as the authors)")
    p.add_argument("--tpc", action="store_true",
                   help="TPC's calibrated references in reference attention during training (off, as the authors "
                        "train; needs prepare-data's poses.json and --batch-size 1)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints to keep (3)")
    p.add_argument("--validate-every", type=int, default=500,
                   help="steps between validation clips (0: none), sampled with the TCAN sampler")
    p.add_argument("--validation-steps", type=int, default=25, help="sampling steps of a validation clip (25)")
    p.add_argument("--validation-frames", type=int, default=16, help="frames of a validation clip (16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and LoRA init (0)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes (2)")
    p.add_argument("--save-dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="dtype of the weight files")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
