"""TCAN's two training stages on the user's videos, on one GPU or many (Hugging Face accelerate).

TCAN (Kim et al., ECCV 2024), section 3 and Fig. 2; the defaults are the authors' (eccv2024tcan/TCAN
``train.py``, ``configs/train/first_stage.yaml`` and ``second_stage.yaml``): AdamW with learning rate
1e-5, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, a constant schedule, gradient norm clipped
to 1.0, the DDPM schedule of SD1.5 (1000 steps, linear betas 0.00085..0.012), 512 x 512, clips of
16 frames in stage 2, empty prompts. Stage 1 trains the appearance UNet (initialised from the base
UNet) and a peft LoRA of rank 16, alpha 16 (gaussian init) on ``to_q/to_k/to_v`` of ``attn1`` and
``attn2``; stage 2 trains the motion modules (from an AnimateDiff file) and the ControlNet's
temporal layers in down blocks 2 and 3 (initialised from the motion module's). The reference
latent is the VAE posterior's mean, the target latents are sampled from it, one timestep per
video. In stage 1 the authors drop the reference for each sample with probability 0.1 (so that
guidance can leave it out); so does this trainer.

Where this trainer differs from the authors' code, on purpose:

- their stage 1 with ``--freeze_controlnet`` (the command in their README) feeds the frozen
  ControlNet tensors of ones instead of the noisy latents, timestep, text and pose, so the
  stage-1 UNet never sees the pose; here the frozen ControlNet gets the real inputs, as in the
  paper;
- their gradient clipping covers only some trained parameters (the appearance UNet in stage 1,
  the UNet in stage 2); here the norm of all trained parameters is clipped to 1.0;
- their scheduler object is a DDIM scheduler; its ``add_noise`` is DDPM's, the same here.

Data order, noise, timesteps and the reference drop are functions of ``(seed, sample number)``:
optimizer step ``s``, accumulation micro-step ``a``, process ``r`` of ``W`` and batch row ``b`` use
sample ``((s * A + a) * W + r) * B + b``. A resumed run therefore sees exactly the samples and noise
it would have seen, and two processes with batch 1 see what one process with batch 2 sees.
Distribution (DDP on one or many machines, FSDP through accelerate's config) is accelerate's;
only the main process writes files and logs.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..bases import SD15
from .checkpoint import checkpoint_folders, load_checkpoint, save_checkpoint, write_json
from .outputs import SAVE_DTYPES, STAGE_FILES, contact_sheet, save_stage_files
from .step import TrainBatch, TrainingModel

log = logging.getLogger(__name__)

# torch.OutOfMemoryError is torch 2.5+; earlier versions raise the CUDA one only.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
APPA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")
RUN_FILE = "run.json"
LOG_FILE = "log.csv"
VALIDATION = "validation"
TENSORBOARD = "tensorboard"
LOG_COLUMNS = ("step", "loss", "learning_rate", "seconds_per_step", "samples_per_second")
# Settings a resumed run must share with the run it continues (else the samples, noise or
# optimizer state would not line up).
RESUME_KEYS = ("stage", "seed", "batch_size", "grad_accum", "world_size", "width", "height", "frames", "lora_rank",
               "lora_alpha", "lora_only", "reference_drop", "learning_rate", "ptm_tau", "tpc", "mixed_precision")
MEMORY_ADVICE = ("--mixed-precision bf16 (or fp16), --gradient-checkpointing, --use-8bit-adam (needs bitsandbytes), "
                 "--batch-size 1 with --grad-accum N for the same effective batch, a smaller --width/--height, and "
                 "in stage 2 fewer --frames")


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory; the message lists the options that reduce memory."""


@dataclass
class TrainOptions:
    """Everything one training run needs; the defaults are the authors' (see the module docstring)."""

    stage: int
    data: Path
    base: Path
    controlnet: Path
    out: Path
    motion_module: Path | None = None
    appearance: Path | None = None
    lora: Path | None = None
    lora_only: bool = False
    width: int = 512
    height: int = 512
    frames: int = 16
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 10000
    learning_rate: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 16.0
    reference_drop: float = 0.1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    half_frozen: bool = True
    ptm_tau: float = 0.0
    tpc: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0
    validation_steps: int = 25
    validation_frames: int = 16
    seed: int = 0
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False
    save_dtype: str = "fp16"
    log_every: int = 1

    def check(self) -> None:
        """Raise a ValueError/FileNotFoundError naming the first bad option and how to fix it."""
        from .data import size_check

        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 (appearance UNet + APPA LoRA) or 2 (motion modules + temporal "
                             f"ControlNet), got {self.stage}")
        size_check(self.width, self.height)
        for name in ("base", "controlnet"):
            if not Path(getattr(self, name)).exists():
                raise FileNotFoundError(f"--{name} {getattr(self, name)} does not exist; give the path of the SD1.5 "
                                        f"{'checkpoint' if name == 'base' else 'OpenPose ControlNet'}")
        if self.stage == 2 and self.motion_module is None:
            raise ValueError("stage 2 needs --motion-module: the AnimateDiff module its motion modules and temporal "
                             "ControlNet layers start from (the authors use mm_sd_v15_v2.ckpt)")
        if self.stage == 1 and self.motion_module is not None:
            raise ValueError("--motion-module is for stage 2; stage 1 trains without motion modules")
        if self.lora_only and self.stage != 1:
            raise ValueError("--lora-only fine-tunes the stage-1 APPA LoRA; use it with --stage 1")
        if self.stage == 1 and self.lora is not None:
            raise ValueError("--lora loads a trained APPA LoRA into stage 2; stage 1 trains its own LoRA")
        for name in ("motion_module", "appearance", "lora"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {value} does not exist")
        whole = {"frames": 1, "batch_size": 1, "grad_accum": 1, "steps": 1, "lora_rank": 1, "validation_steps": 1,
                 "validation_frames": 1, "keep_checkpoints": 1}
        for name, low in whole.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {value!r}")
        for name in ("checkpoint_every", "validate_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got "
                             f"{self.mixed_precision!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if not 0.0 <= self.reference_drop < 1.0:
            raise ValueError(f"--reference-drop must be in [0, 1), got {self.reference_drop}; the authors use 0.1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning-rate must be a number > 0, got {self.learning_rate}; the authors use 1e-5")
        if self.ptm_tau < 0 or not math.isfinite(self.ptm_tau):
            raise ValueError(f"--ptm-tau must be >= 0 (0 is off, as the authors train), got {self.ptm_tau}")
        if self.ptm_tau > 0 and self.stage != 2:
            raise ValueError("--ptm-tau acts on the motion module's temporal attention, so it needs --stage 2")
        if self.tpc and self.batch_size != 1:
            raise ValueError("--tpc calibrates the reference for one clip at a time; use --batch-size 1 (with "
                             "--grad-accum for a larger effective batch)")
        if self.ptm_tau > 0 and self.gradient_checkpointing:
            raise ValueError("--ptm-tau and --gradient-checkpointing do not combine yet: the temperature map is set "
                             "per window and is gone when the backward pass recomputes the temporal layers; train "
                             "without PTM (as the authors do) or without checkpointing")
        if self.ptm_tau > 0 and self.batch_size != 1:
            raise ValueError("--ptm-tau computes one temperature map per clip; use --batch-size 1 (with --grad-accum "
                             "for a larger effective batch)")

    def settings(self, world_size: int) -> dict[str, Any]:
        """The run's settings as JSON-able values (written to run.json and every output file)."""
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        values["adam_betas"] = list(self.adam_betas)
        values["world_size"] = world_size
        for transient in ("resume", "overwrite"):
            values.pop(transient)
        return values


@dataclass
class TrainResult:
    """What a run did: steps done, files written, the last checkpoint, the losses, and whether it was stopped."""

    step: int
    files: dict[str, Path] = field(default_factory=dict)
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    validations: list[Path] = field(default_factory=list)


class StopRequest:
    """Set by Ctrl-C (SIGINT): the loop saves a checkpoint after the current step and stops. A second
    Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def on_interrupt(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            log.warning("interrupt: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def sample_noise(seed: int, sample: int, frames: int, latent_shape: tuple[int, int, int],
                 reference_drop: float) -> tuple[int, bool, torch.Tensor, torch.Tensor]:
    """One sample's timestep, reference drop, diffusion noise [F,4,h,w] and VAE posterior noise [F,4,h,w], drawn
    from a generator seeded like the dataset's (:func:`~tcan_core.training.data.mix_seed`), on its own stream."""
    from .data import mix_seed

    generator = torch.Generator().manual_seed(mix_seed("noise", seed, sample))
    timestep = int(torch.randint(0, SD15.schedule["num_train_timesteps"], (1,), generator=generator))
    drop = bool(torch.rand(1, generator=generator) < reference_drop)
    noise = torch.randn((frames, *latent_shape), generator=generator)
    posterior = torch.randn((frames, *latent_shape), generator=generator)
    return timestep, drop, noise, posterior


class _Numbered(torch.utils.data.Dataset):
    """A dataset indexed by sample number that also returns the number (for the sample's noise)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, sample: int) -> tuple[int, dict]:
        return sample, self.dataset[sample]


class SampleBatches(torch.utils.data.Sampler):
    """Sample numbers of this process's micro-batches from ``start_step`` on (see the module docstring)."""

    def __init__(self, start_step: int, steps: int, grad_accum: int, world_size: int, rank: int,
                 batch_size: int) -> None:
        self.start_step, self.steps = start_step, steps
        self.grad_accum, self.world_size, self.rank, self.batch_size = grad_accum, world_size, rank, batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            for micro in range(self.grad_accum):
                first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
                yield list(range(first, first + self.batch_size))


def _collate(items: list[tuple[int, dict]]) -> dict[str, Any]:
    return {"samples": [n for n, _ in items],
            "items": [{k: item[k] for k in ("clip", "frames", "crop", "size") if k in item} for _, item in items],
            "reference": torch.stack([item["reference"] for _, item in items]),
            "target": torch.stack([item["target"] for _, item in items]),
            "poses": torch.stack([item["poses"] for _, item in items])}


def _ddpm_scheduler():
    """SD1.5's training noise schedule (DDPM, 1000 steps, linear betas 0.00085..0.012)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15.schedule, clip_sample=False)


@torch.no_grad()
def _encode(vae: torch.nn.Module, images: torch.Tensor, noise: torch.Tensor | None, chunk: int = 4) -> torch.Tensor:
    """Images [N,3,H,W] in -1..1 -> scaled latents [N,4,h,w] (float32): the posterior's mean, or a sample
    with the given standard-normal ``noise`` [N,4,h,w]; ``chunk`` images at a time."""
    dtype, device = next(vae.parameters()).dtype, next(vae.parameters()).device
    parts = []
    for start in range(0, images.shape[0], chunk):
        dist = vae.encode(images[start:start + chunk].to(device=device, dtype=dtype)).latent_dist
        latent = dist.mean.float()
        if noise is not None:
            latent = latent + dist.std.float() * noise[start:start + chunk].to(device)
        parts.append(latent)
    return torch.cat(parts) * SD15.latent_scale


def _frames_of(sequence, frames: list[int]):
    """The given frames of a PoseSequence, as a PoseSequence."""
    from ..pose_format import PoseSequence

    index = np.asarray(frames)
    return PoseSequence(sequence.body[index], sequence.face[index], sequence.hands[index], sequence.people[index],
                        sequence.width, sequence.height)


def _check_out(options: TrainOptions, remove: bool) -> None:
    """Refuse to overwrite a run unless --resume or --overwrite says what to do; clear it for --overwrite when
    ``remove`` (the main process; every process checks, so all of them stop on a refusal)."""
    out = Path(options.out)
    ours = [RUN_FILE, LOG_FILE, VALIDATION, TENSORBOARD, "checkpoints", *STAGE_FILES[1], *STAGE_FILES[2]]
    present = [name for name in ours if (out / name).exists()]
    if options.resume:
        # Only the main process decides: one that cannot see --out gets the shared-filesystem error in run().
        if remove and not checkpoint_folders(out):
            raise FileNotFoundError(f"--resume: {out} holds no checkpoint to continue from; run without --resume to "
                                    "start a new run there")
        return
    if present and not options.overwrite:
        done = checkpoint_folders(out)
        what = f"a run with a checkpoint at step {done[-1][0]}" if done else "files of an earlier run"
        raise FileExistsError(f"--out {out} already holds {what} ({', '.join(present)}); pass --resume to continue "
                              "it, --overwrite to delete it and start again, or choose another --out")
    for name in present if remove else ():
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def _load_parts(options: TrainOptions, device: torch.device) -> dict[str, Any]:
    """Every model of the stage on the CPU in float32, frozen, plus the empty prompt's context."""
    from ..animation.controlnet_t import TCAN_BLOCKS, TemporalLayers
    from ..animation.text import encode_empty_prompt
    from ..models.controlnet import load_controlnet
    from ..models.sd15 import load_sd15
    from ..models.tcan_ckpt import load_appearance_unet

    parts = load_sd15(options.base, dtype=torch.float32)
    unet, vae = parts.unet, parts.vae
    text = encode_empty_prompt(parts.text_encoder)
    controlnet, _ = load_controlnet(options.controlnet)
    loaded: dict[str, Any] = {"unet": unet, "vae": vae, "text": text, "controlnet": controlnet, "motion": None,
                              "temporal": None, "lora_patch": None, "source": Path(options.base).name}
    if options.appearance is not None:
        loaded["appearance"] = load_appearance_unet(options.appearance, like=unet)
    elif options.stage == 1:
        # A copy of the base weights (taken before the LoRA is added): trained, or frozen with --lora-only.
        loaded["appearance"] = copy.deepcopy(unet)
    else:
        # Frozen and without a file: the base UNet itself serves, as in training-free sampling.
        loaded["appearance"] = unet
    if options.stage == 2:
        from ..models.motion_module import load_motion_module

        motion, det = load_motion_module(options.motion_module)
        limit = int(motion.config.get("motion_max_seq_length", 32))
        if options.frames > limit:
            raise ValueError(f"--frames {options.frames} is longer than the motion module's {limit}-frame positional "
                             f"encoding; use --frames {limit} or less (TCAN uses 16)")
        loaded["motion"] = motion
        loaded["temporal"] = TemporalLayers.from_modules(
            {i: copy.deepcopy(motion.down_blocks[i].motion_modules) for i in TCAN_BLOCKS})
        if options.lora is not None:
            from ..models.lora import LoraPatch, load_lora

            loaded["lora_patch"] = LoraPatch(load_lora(options.lora, unet), 1.0)
    return loaded


def _add_lora(unet: torch.nn.Module, options: TrainOptions) -> None:
    """TCAN's APPA LoRA on the denoising UNet through peft (gaussian init: B = 0, so training starts at the base)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("stage 1 trains the APPA LoRA with the 'peft' package, which is not installed; install it "
                          "with `pip install peft` (or `pip install comfyui-tcan[train]`)") from None
    unet.add_adapter(LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(APPA_TARGETS)))


def _optimizer(params: list[torch.nn.Parameter], options: TrainOptions) -> torch.optim.Optimizer:
    kwargs = dict(lr=options.learning_rate, betas=options.adam_betas, weight_decay=options.weight_decay,
                  eps=options.adam_eps)
    if options.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use-8bit-adam needs the 'bitsandbytes' package (CUDA only); install it with "
                              "`pip install bitsandbytes`, or leave the option out") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # Multi-tensor updates: the fused per-tensor loop is the default on CUDA only, and much slower on the CPU.
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def _center_crop(size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, h, w): the largest centred box of ``width``/``height``'s aspect in a frame of ``size`` (H, W)."""
    frame_h, frame_w = size
    scale = min(frame_w / width, frame_h / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    return (frame_h - crop_h) // 2, (frame_w - crop_w) // 2, crop_h, crop_w


def _launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) started, read from its environment."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


class Trainer:
    """One training run: set up by :meth:`__init__`, run by :meth:`run` (see the module docstring)."""

    def __init__(self, options: TrainOptions, progress: bool = True,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        options.check()
        self.options = options
        self.progress = progress
        self.on_step = on_step
        unused = options.stage == 1 and not options.lora_only and options.reference_drop > 0
        # accelerate keeps one state per process; a second run in the same process (a notebook, the tests) may
        # ask for another precision, so the mixed-precision state is reset (the process group is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        launched = _launched_processes()
        # Without a GPU accelerate joins the processes (gloo, MULTI_CPU) only when told to use the CPU; else a
        # torchrun or `accelerate launch --multi_gpu` start gives N independent runs writing the same files.
        # torch.accelerator (torch 2.6+) also sees XPU/MPS; older torch, which ComfyUI may have, knows only CUDA here.
        devices = getattr(torch, "accelerator", None)
        cpu = launched > 1 and not (devices.is_available() if devices is not None else torch.cuda.is_available())
        # In stage 1 a micro-batch whose samples all drop the reference gives the appearance UNet no gradient.
        self.accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=cpu, kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=unused)])
        acc = self.accelerator
        if launched > 1 and acc.num_processes != launched:
            raise RuntimeError(f"the launcher started {launched} processes but accelerate joined {acc.num_processes} "
                               f"({acc.distributed_type}); each would train alone and overwrite the others' files. "
                               "Launch with `accelerate launch --multi_gpu` or torchrun on GPUs, or set "
                               "ACCELERATE_USE_CPU=1 to train on the CPU")
        self.out = Path(options.out)
        _check_out(options, remove=acc.is_main_process)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.settings = options.settings(acc.num_processes)
        self._check_resume_settings()

        from .data import ClipDataset, PairDataset, load_clips

        clips = load_clips(options.data)
        if options.stage == 1:
            self.dataset = PairDataset(clips.clips, options.width, options.height, seed=options.seed)
        else:
            self.dataset = ClipDataset(clips.clips, options.width, options.height, frames=options.frames,
                                       seed=options.seed)
        self.clips = clips
        self.clip_by_name = {clip.name: clip for clip in clips.clips}
        self._poses: dict[str, Any] = {}
        if options.tpc:
            missing = [clip.name for clip in self.dataset.clips if clip.keypoints is None]
            if missing:
                raise ValueError(f"--tpc needs each clip's pose keypoints, which `python -m tcan_core prepare-data` "
                                 f"writes (poses.json); {len(missing)} clip(s) have only rendered poses (such as "
                                 f"{missing[0]}, e.g. the authors' layout). Prepare the videos with prepare-data, or "
                                 "train without --tpc")
        self.frames = 1 if options.stage == 1 else options.frames
        self._build_model()

    def _check_resume_settings(self) -> None:
        path = self.out / RUN_FILE
        if not self.options.resume or not path.is_file():
            return
        earlier = json.loads(path.read_text())
        differ = [f"{key} {earlier.get(key)!r} -> {self.settings.get(key)!r}" for key in RESUME_KEYS
                  if earlier.get(key) != self.settings.get(key)]
        if differ:
            raise ValueError(f"--resume: these settings differ from the run in {self.out}: {'; '.join(differ)}. A "
                             "resumed run must keep them to continue exactly; use the earlier values, or start a new "
                             "run in another --out")

    def _build_model(self) -> None:
        from accelerate.utils import DistributedType

        options, acc = self.options, self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            raise RuntimeError("FSDP is not supported by the TCAN trainer yet (its checkpoints, validation and weight "
                               "files read the full parameters in one process); launch with DDP (accelerate's "
                               f"default) and cut memory with {MEMORY_ADVICE}")
        device = acc.device
        weight_dtype = MIXED_PRECISION[options.mixed_precision]
        frozen_dtype = weight_dtype if options.half_frozen else torch.float32
        parts = _load_parts(options, device)
        self.source = parts["source"]
        unet, appearance, controlnet = parts["unet"], parts["appearance"], parts["controlnet"]
        self._stack = contextlib.ExitStack()
        if parts["lora_patch"] is not None:
            # The stage-1 LoRA is frozen in stage 2: merged into the frozen base for the run, taken out at the end.
            self._stack.enter_context(parts["lora_patch"].applied(unet))
        if options.stage == 1:
            torch.manual_seed(options.seed)
            _add_lora(unet, options)
        model = TrainingModel(unet, appearance, controlnet, parts["text"], parts["motion"], parts["temporal"],
                              options.ptm_tau)
        model.requires_grad_(False)
        trains_appearance = options.stage == 1 and not options.lora_only
        if options.stage == 1:
            for name, param in unet.named_parameters():
                param.requires_grad_("lora_" in name)
            if trains_appearance:
                from ..models.tcan_ckpt import appearance_pruned_keys

                # The layers after the last self-attention input are never read (the authors remove them).
                unused = appearance_pruned_keys(appearance)
                for name, param in appearance.named_parameters():
                    param.requires_grad_(name not in unused)
        else:
            parts["motion"].requires_grad_(True)
            parts["temporal"].requires_grad_(True)
        self.trains_appearance = trains_appearance
        vae = torch.nn.Module.to(parts["vae"], device=device, dtype=frozen_dtype).requires_grad_(False)
        model.to(device=device, dtype=frozen_dtype)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        if options.gradient_checkpointing:
            for module in {id(m): m for m in (unet, appearance, controlnet)}.values():
                module.enable_gradient_checkpointing()
        model.train()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        optimizer = _optimizer(self.trainable, options)
        self.vae = vae
        self.unwrapped = model
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = _ddpm_scheduler()
        log.info("stage %d: %.2f M trained parameters in %d tensors", options.stage,
                 sum(p.numel() for p in self.trainable) / 1e6, len(self.trainable))

    # --- one step -------------------------------------------------------------------------------

    def _batch(self, loaded: dict[str, Any]) -> TrainBatch:
        options, device = self.options, self.accelerator.device
        frames = self.frames
        latent_shape = (SD15.latent_channels, options.height // SD15.vae_factor, options.width // SD15.vae_factor)
        draws = [sample_noise(options.seed, n, frames, latent_shape,
                              options.reference_drop if options.stage == 1 else 0.0) for n in loaded["samples"]]
        timesteps = torch.tensor([d[0] for d in draws], dtype=torch.long, device=device)
        use_reference = torch.tensor([not d[1] for d in draws], dtype=torch.bool, device=device)
        noise = torch.cat([d[2] for d in draws]).to(device)
        posterior = torch.cat([d[3] for d in draws])
        target = loaded["target"].flatten(0, 1)
        latents = _encode(self.vae, target, posterior)
        reference = _encode(self.vae, loaded["reference"], None)
        noisy = self.scheduler.add_noise(latents, noise, timesteps.repeat_interleave(frames))
        pose_images = loaded["poses"].flatten(0, 1)
        poses = pose_images.to(device)
        calibrated = calibrated_latents = None
        if options.tpc:
            calibrated, images = self._calibrate(loaded["items"][0], latents.shape[-2:])
            calibrated = tuple(part.to(device) for part in calibrated)
            calibrated_latents = _encode(self.vae, images * 2 - 1, None)
        return TrainBatch(noisy, noise, timesteps, poses, reference, use_reference, frames, calibrated,
                          calibrated_latents, pose_images.movedim(1, -1))

    def _calibrate(self, item: dict[str, Any], latent_size) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """TPC (Yoon et al., NeurIPS 2024) for one training item: the reference warped onto each target frame's
        pose on the full frames, then given the item's crop -> (WindowInput.calibrated parts, images [U,3,H,W])."""
        import torch.nn.functional as F
        import torchvision.transforms.functional as TF

        from ..tpc import calibrate
        from .data import read_frames

        options = self.options
        clip = self.clip_by_name[item["clip"]]
        sequence = self._keypoints(clip)
        first, second = item["frames"]
        if options.stage == 1:
            reference, targets = first, [second]
        else:
            reference, targets = 0, list(range(first, second))
        size, crop = tuple(item["size"]), tuple(item["crop"])
        full = (0, 0, size[0], size[1])
        image = read_frames([clip.images[reference]], size, full, size)[0].permute(1, 2, 0).numpy()
        calibration = calibrate(image, _frames_of(sequence, [reference]), _frames_of(sequence, targets),
                                keypoint_set="body")
        out = [options.height, options.width]

        def fit(x: torch.Tensor) -> torch.Tensor:
            return TF.resized_crop(x, *crop, out, antialias=True)

        images = fit(calibration.images.permute(0, 3, 1, 2)).clamp(0, 1)
        key_masks = F.interpolate(fit(calibration.masks[:, None]), size=tuple(latent_size), mode="area")[:, 0]
        query_masks = F.interpolate(fit(calibration.driving_person_masks().float()[:, None]), size=tuple(latent_size),
                                    mode="area")[:, 0]
        local = torch.as_tensor(calibration.frame_to_calibrated, dtype=torch.long)
        used = torch.arange(images.shape[0])
        return (used, local, query_masks, key_masks), images

    def _keypoints(self, clip):
        """The clip's poses (prepare-data's poses.json), read once."""
        from ..pose.pose_json import load_pose_json
        from ..pose_format import parse_pose_keypoint

        cached = self._poses.get(clip.name)
        if cached is None:
            cached = parse_pose_keypoint(load_pose_json(clip.keypoints))
            self._poses[clip.name] = cached
        return cached

    def _step(self, micro_batches: list[dict[str, Any]]) -> float:
        acc, options = self.accelerator, self.options
        total = 0.0
        with acc.autocast(), self.unwrapped.installed(acc.device, options.gradient_checkpointing):
            for index, loaded in enumerate(micro_batches):
                batch = self._batch(loaded)
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if last else acc.no_sync(self.model):
                    loss = self.model(batch)
                    acc.backward(loss / len(micro_batches))
                total += float(loss.detach())
            if acc.sync_gradients and options.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, options.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    @torch.no_grad()
    def mean_loss(self, samples: list[int]) -> float:
        """The epsilon loss averaged over the given sample numbers (their data, timesteps and noise), without
        training: how well the model predicts the noise of those examples now."""
        acc = self.accelerator
        losses = []
        with acc.autocast(), self.unwrapped.installed(acc.device):
            for sample in samples:
                loaded = _collate([(sample, self.dataset[sample])])
                losses.append(float(self.unwrapped(self._batch(loaded))))
        return sum(losses) / len(losses)

    # --- state ----------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int) -> Path | None:
        acc = self.accelerator
        folder = None
        if acc.is_main_process:
            params = dict(self.unwrapped.named_parameters())
            trainable = {name: params[name] for name in self.trainable_names}
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            folder = save_checkpoint(self.out, step, trainable, self.optimizer.state_dict(),
                                     {"settings": self.settings, "scaler": scaler}, self.options.keep_checkpoints)
        acc.wait_for_everyone()
        return folder

    def _resume(self) -> int:
        found = checkpoint_folders(self.out)
        if not self.options.resume or not found:
            return 0
        step, folder = found[-1]
        trainable, optimizer, state = load_checkpoint(folder)
        missing = sorted(set(self.trainable_names) - set(trainable))
        if missing:
            raise ValueError(f"checkpoint {folder} lacks {len(missing)} trained tensor(s) such as {missing[0]}; it "
                             "was written by another stage or setting. Resume with the settings it was made with")
        params = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name in self.trainable_names:
                params[name].copy_(trainable[name])
        self.optimizer.load_state_dict(optimizer)
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s (step %d)", folder, step)
        return step

    # --- validation -----------------------------------------------------------------------------

    def validate(self, step: int) -> Path | None:
        """Sample a validation clip with the TCAN sampler (first clip: its first frame as the reference, its
        poses) -> ``validation/step-N.mp4`` and a contact sheet ``step-N.png`` (poses, result, ground truth)."""
        from PIL import Image

        from ..animation.sampler import SamplerSettings, sample_animation
        from ..animation.vae import DiffusersVAE
        from ..video_io import write_frames
        from .data import frame_size, read_frames

        acc, options = self.accelerator, self.options
        path = None
        if acc.is_main_process:
            clip = self.clips.clips[0]
            count = min(options.validation_frames, len(clip.images))
            size = frame_size(clip.images[0])
            crop, out = _center_crop(size, options.width, options.height), (options.height, options.width)
            images = read_frames(clip.images[:count], size, crop, out)
            poses = read_frames(clip.poses[:count], size, crop, out)
            reference = images[:1].movedim(1, -1)
            context_length = min(count, 16 if self.unwrapped.motion is None else
                                 int(self.unwrapped.motion.config.get("motion_max_seq_length", 32)))
            settings = SamplerSettings(seed=options.seed, steps=options.validation_steps, width=options.width,
                                       height=options.height, context_length=min(context_length, options.frames),
                                       context_overlap=min(4, max(0, min(context_length, options.frames) - 1)))
            text = self.unwrapped.text
            with acc.autocast():
                result = sample_animation(self.unwrapped.tcan_model(), reference, poses.movedim(1, -1), text, text,
                                          DiffusersVAE(self.vae), settings, device=acc.device)
            frames = (result.frames.numpy() * 255).round().astype(np.uint8)
            to_uint8 = lambda x: (x.movedim(1, -1).numpy() * 255).round().astype(np.uint8)  # noqa: E731
            folder = self.out / VALIDATION
            path = folder / f"step-{step:06d}.mp4"
            write_frames(path, frames, fps=8.0)
            sheet = contact_sheet([to_uint8(poses), frames, to_uint8(images)])
            partial = folder / f".step-{step:06d}.png.partial"
            Image.fromarray(sheet).save(partial, format="PNG")
            partial.replace(folder / f"step-{step:06d}.png")
            log.info("validation clip of step %d: %s", step, path)
        acc.wait_for_everyone()
        return path

    # --- the loop -------------------------------------------------------------------------------

    def _log_writers(self, start: int):
        if not self.accelerator.is_main_process:
            return None, None
        path = self.out / LOG_FILE
        rows = []
        if path.is_file():
            with path.open(newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= start]
        handle = path.open("w", newline="")
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(str(self.out / TENSORBOARD), purge_step=start + 1)
        except ImportError:
            log.info("tensorboard is not installed: losses go to %s only", path)
        return (handle, writer), tensorboard

    def run(self) -> TrainResult:
        """Train to ``options.steps`` (from the latest checkpoint with ``--resume``) -> what was done."""
        acc, options = self.accelerator, self.options
        start = self._resume()
        # Every process reads --out to resume; where some machines do not see it, they would start at other
        # steps and their collectives would no longer pair up (a hang or garbage), so all must agree.
        starts = acc.gather(torch.tensor([start], device=acc.device))
        if bool((starts != start).any()):
            raise ValueError(f"--resume: the processes found different checkpoints in {self.out} (steps "
                             f"{starts.tolist()} by process); --out and --data must be on a filesystem every "
                             "machine sees")
        result = TrainResult(step=start)
        if acc.is_main_process:
            write_json(self.out / RUN_FILE, self.settings)
        batches = SampleBatches(start, options.steps, options.grad_accum, acc.num_processes, acc.process_index,
                                options.batch_size)
        loader = torch.utils.data.DataLoader(_Numbered(self.dataset), batch_sampler=batches, collate_fn=_collate,
                                             num_workers=options.num_workers, persistent_workers=False)
        csv_log, tensorboard = self._log_writers(start)
        bar = None
        if acc.is_main_process and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=options.steps, initial=start, desc=f"TCAN stage {options.stage}", unit="step")
        stop = StopRequest()
        samples_per_step = options.batch_size * options.grad_accum * acc.num_processes
        step = start
        try:
            with stop.on_interrupt():
                iterator = iter(loader)
                while step < options.steps:
                    began = time.perf_counter()
                    micro = [next(iterator) for _ in range(options.grad_accum)]
                    try:
                        loss = self._step(micro)
                    except _OUT_OF_MEMORY as exc:
                        raise TrainingOutOfMemory(f"out of memory in training step {step + 1} at {options.width}x"
                                                  f"{options.height}, batch {options.batch_size}"
                                                  f"{'' if options.stage == 1 else f', {options.frames} frames'}; "
                                                  f"reduce memory with {MEMORY_ADVICE}. ({exc})") from exc
                    step += 1
                    loss = float(acc.gather(torch.tensor([loss], device=acc.device)).mean())
                    seconds = time.perf_counter() - began
                    result.losses.append(loss)
                    result.step = step
                    if acc.is_main_process:
                        if step % options.log_every == 0 or step == options.steps:
                            csv_log[1].writerow({"step": step, "loss": f"{loss:.6f}",
                                                 "learning_rate": f"{options.learning_rate:g}",
                                                 "seconds_per_step": f"{seconds:.4f}",
                                                 "samples_per_second": f"{samples_per_step / seconds:.4f}"})
                            csv_log[0].flush()
                            if tensorboard is not None:
                                tensorboard.add_scalar("loss", loss, step)
                                tensorboard.add_scalar("seconds_per_step", seconds, step)
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", s_per_step=f"{seconds:.2f}")
                            bar.update(1)
                    if self.on_step is not None:
                        self.on_step(step, loss)
                    if options.checkpoint_every and step % options.checkpoint_every == 0 and step < options.steps:
                        result.checkpoint = self._save_checkpoint(step)
                    if options.validate_every and step % options.validate_every == 0:
                        result.validations.append(self.validate(step))
                    flag = torch.tensor([int(stop.requested)], device=acc.device)
                    if int(acc.reduce(flag, "sum")) > 0:
                        result.interrupted = True
                        break
            if result.interrupted or step == options.steps:
                done = checkpoint_folders(self.out)
                if not done or done[-1][0] != step:
                    result.checkpoint = self._save_checkpoint(step)
                else:
                    result.checkpoint = done[-1][1]
            if not result.interrupted:
                if options.validate_every and step % options.validate_every:
                    result.validations.append(self.validate(step))
                result.files = self._save_outputs(step)
        finally:
            if bar is not None:
                bar.close()
            if csv_log is not None:
                csv_log[0].close()
            if tensorboard is not None:
                tensorboard.close()
            self._stack.close()
        return result

    def _save_outputs(self, step: int) -> dict[str, Path]:
        acc, options = self.accelerator, self.options
        files: dict[str, Path] = {}
        if acc.is_main_process:
            model = self.unwrapped
            lora = None
            if options.stage == 1:
                lora = {"rank": options.lora_rank, "alpha": options.lora_alpha, "targets": APPA_TARGETS}
            files = save_stage_files(self.out, options.stage,
                                     {"unet": model.unet, "appearance": model.appearance, "motion": model.motion,
                                      "temporal": model.temporal},
                                     self.trains_appearance, lora, self.source, step, self.settings,
                                     SAVE_DTYPES[options.save_dtype])
        acc.wait_for_everyone()
        return files


def train(options: TrainOptions, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run one TCAN training stage (see the module docstring) -> what it did."""
    return Trainer(options, progress, on_step).run()
