"""The TCAN sampler: one reference image and a batch of pose images -> an animated clip.

TCAN (Kim et al., ECCV 2024), section 3 and the authors' inference defaults: DDIM, 25 steps,
guidance 7.5, empty prompts, windows of 16 frames with overlap 4. One call of
:func:`sample_animation` reads top to bottom:

1. check the inputs and bring reference, poses and calibration to ``width`` x ``height``;
2. encode the reference (and the TPC-calibrated references) with the VAE;
3. draw the initial noise (independent per frame, or one window's noise repeated, as the
   authors do);
4. apply the model's patches for this call (motion module, APPA LoRA, temporal ControlNet,
   PTM) and install reference attention;
5. for every step: run the appearance UNet once on the clean reference latent (its mid/up
   self-attention inputs go into the bank); for every window of frames: its guided noise
   prediction (:func:`~.forward.window_forward`: the ControlNet's residuals, the calibrated
   references of the window through the appearance UNet, the denoising UNet on
   ``[uncond ; cond]`` with the reference left out of the unconditional half, guidance), added
   to the MultiDiffusion average; then one scheduler step on the whole clip;
6. decode the latents in chunks of frames, moving each chunk to the CPU.

Memory stays flat in the clip length: only the latents ``[F,4,h,w]`` and the decoded frames
(on the CPU) grow with frames; everything else is per window. Patches and processors are removed
when the call ends, also on error or cancel.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention.context import append_tokens
from ..bases import SD15
from ..images import check_image_batch
from .model import RunState, TCANModel, modules_on
from .forward import WindowCall, WindowInput, appearance_pass, window_forward
from .schedulers import DEFAULT_SCHEDULER, SCHEDULERS, make_scheduler
from .temporal_hooks import MotionState
from .text import check_context, match_token_lengths
from .vae import SD15_LATENT_SCALE, VAELike
from .windows import DEFAULT_CONTEXT_LENGTH, DEFAULT_CONTEXT_OVERLAP, WindowAccumulator, iterate_windows

log = logging.getLogger(__name__)

NOISE_INDEPENDENT = "independent per frame"
NOISE_REPEATED = "one window repeated"
NOISE_MODES = (NOISE_INDEPENDENT, NOISE_REPEATED)

# Two sizes count as the same aspect ratio when they differ by at most this fraction.
ASPECT_TOLERANCE = 0.02
DEFAULT_DECODE_CHUNK = 16

_LATENT_RGB = SD15.latent_rgb_matrix()

ProgressCallback = Callable[[int, "torch.Tensor | None"], None]


@dataclass(frozen=True)
class SamplerSettings:
    """The TCAN Sampler's widgets; the defaults are TCAN's."""

    seed: int = 0
    steps: int = 25
    cfg: float = 7.5
    scheduler: str = DEFAULT_SCHEDULER
    width: int = 512
    height: int = 512
    context_length: int = DEFAULT_CONTEXT_LENGTH
    context_overlap: int = DEFAULT_CONTEXT_OVERLAP
    closed_loop: bool = False
    noise: str = NOISE_INDEPENDENT
    reference_out_of_uncond: bool = True
    decode_chunk: int = DEFAULT_DECODE_CHUNK

    def check(self) -> None:
        """Raise a ValueError naming the first bad setting."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 64 or value % 8:
                low, high = max(64, value // 8 * 8), max(64, -(-value // 8) * 8)
                raise ValueError(f"{name} must be a multiple of 8 and at least 64, got {value}; "
                                 f"the nearest valid {name}s are {low} and {high}" if low != high else
                                 f"{name} must be a multiple of 8 and at least 64, got {value}; use {low}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}; TCAN uses 25")
        if not math.isfinite(self.cfg) or self.cfg < 1.0:
            raise ValueError(f"cfg must be a number >= 1, got {self.cfg}; TCAN uses 7.5 (1 turns guidance off)")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"unknown initial noise {self.noise!r}; choose one of {', '.join(NOISE_MODES)}")
        if self.decode_chunk < 1:
            raise ValueError(f"decode_chunk must be at least 1 frame, got {self.decode_chunk}")


@dataclass
class AnimationResult:
    """Decoded frames [F,H,W,3] (CPU, float32, 0..1) and the final latents [F,4,h,w] (CPU, unscaled)."""

    frames: torch.Tensor
    latents: torch.Tensor
    notes: list[str]


class SamplingCancelled(RuntimeError):
    """Raised by a ``check_cancel`` callback to stop sampling; patches are removed on the way out."""


def size_for_aspect(aspect: float, area: int) -> tuple[int, int]:
    """(width, height): multiples of 8, at least 64, with ``aspect`` (w / h) and about ``area`` pixels."""
    height = max(64, round(math.sqrt(area / aspect) / 8) * 8)
    return max(64, round(height * aspect / 8) * 8), height


def fit_images(images: torch.Tensor, width: int, height: int, what: str) -> torch.Tensor:
    """Resize IMAGE [B,H,W,C] to ``width`` x ``height`` when the aspect ratio matches; else a clear error.

    The aspect policy: images whose width / height differs from the target's by at most 2% are
    resized (area filter when shrinking, bicubic when enlarging); anything else is refused, since
    stretching would change the character's proportions and cropping would cut the pose apart.
    """
    frames, src_h, src_w = images.shape[0], images.shape[1], images.shape[2]
    if (src_h, src_w) == (height, width):
        return images
    source, target = src_w / src_h, width / height
    if abs(source / target - 1.0) > ASPECT_TOLERANCE:
        fit_w, fit_h = size_for_aspect(source, width * height)
        raise ValueError(f"{what} {'is' if frames == 1 else 'are'} {src_w}x{src_h} (aspect {source:.3f}) but the sampler's width x height is "
                         f"{width}x{height} (aspect {target:.3f}); set width x height to {fit_w}x{fit_h} "
                         f"(same aspect as the {what}) or crop/render the {what} at {width}x{height}")
    mode = "area" if src_h * src_w > height * width else "bicubic"
    x = images.movedim(-1, 1).float()
    x = F.interpolate(x, size=(height, width), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    log.info("%s resized from %dx%d to %dx%d (%d frames)", what, src_w, src_h, width, height, frames)
    return x.movedim(1, -1).clamp(0.0, 1.0).to(images.dtype)


def initial_noise(num_frames: int, shape: tuple[int, int, int], seed: int, mode: str, window: int) -> torch.Tensor:
    """Initial noise [F,C,h,w] from ``seed`` on the CPU (the same on every device).

    ``NOISE_REPEATED`` draws one window of ``window`` frames and repeats it along the clip, as the
    authors' pipeline does; ``NOISE_INDEPENDENT`` draws every frame's own noise.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if mode == NOISE_REPEATED:
        base = torch.randn((min(window, num_frames), *shape), generator=generator)
        reps = -(-num_frames // base.shape[0])
        return base.repeat(reps, 1, 1, 1)[:num_frames]
    return torch.randn((num_frames, *shape), generator=generator)


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """A cheap RGB preview of one SD1.5 latent [4,h,w] (scaled) -> IMAGE [h,w,3] in 0..1."""
    rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), _LATENT_RGB)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def _encode(vae: VAELike, images: torch.Tensor, device: torch.device, dtype: torch.dtype,
            chunk: int) -> torch.Tensor:
    """IMAGE [B,H,W,3] -> scaled latents [B,4,h,w] on ``device``, encoded ``chunk`` images at a time."""
    parts = [vae.encode(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)]
    latents = torch.cat([p.to(device=device, dtype=torch.float32) for p in parts]) * SD15_LATENT_SCALE
    return latents.to(dtype)


@dataclass(frozen=True)
class _Contexts:
    """Text contexts of one call: ``text`` for the ControlNet; ``positive``/``negative`` for the denoising
    UNet, with the patches' context tokens (face adapters) appended after the text; ``appearance`` for the
    reference pass (with those tokens only when the appearance UNet is the denoising UNet, whose
    cross-attention then splits them off)."""

    text: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    appearance: torch.Tensor

    @classmethod
    def for_run(cls, run: RunState, positive: torch.Tensor, negative: torch.Tensor, shared: bool) -> "_Contexts":
        if not run.context_tokens:
            return cls(positive, positive, negative, positive)
        extended, extended_negative = positive, negative
        for extra in run.context_tokens:
            extended = append_tokens(extended, extra.cond)
            extended_negative = append_tokens(extended_negative, extra.cond if extra.uncond is None else extra.uncond)
        return cls(positive, extended, extended_negative, extended if shared else positive)


class _Window:
    """What a window needs at every step, prepared once and kept on the CPU (small: no pixels of the clip).

    ``prepared`` holds each hook's window data (PTM: the map [H,W]); ``calibrated`` holds the
    calibrated images the window uses, each frame's index among them, the driving person masks at
    latent size and the warped reference masks.
    """

    def __init__(self, frames: tuple[int, ...], prepared: list,
                 calibrated: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        self.frames = frames
        self.prepared = prepared
        self.calibrated = calibrated


@torch.no_grad()
def sample_animation(model: TCANModel, reference: torch.Tensor | None, poses: torch.Tensor, positive: torch.Tensor,
                     negative: torch.Tensor, vae: VAELike, settings: SamplerSettings = SamplerSettings(),
                     calibration=None, device: torch.device | str | None = None,
                     progress: ProgressCallback | None = None,
                     check_cancel: Callable[[], None] | None = None, temporal: bool = True) -> AnimationResult:
    """Animate ``reference`` [1,H,W,3] with ``poses`` [F,H,W,3] (rendered OpenPose images), TCAN; -> frames.

    ``positive``/``negative`` are text contexts [1,77k,768]; ``calibration`` an optional TPC
    ``Calibration`` for the same frames; ``progress(n, preview)`` is called after every window
    evaluation (steps x windows in all); ``check_cancel()`` is called between windows and may
    raise to stop. ``reference=None`` leaves reference attention out (the model's other patches
    still apply) and ``temporal=False`` leaves the motion module and the ControlNet's temporal
    layers out, so every pose gives its own image: TIFF's character stage (:mod:`tcan_core.face.character`).
    """
    from .reference import ReferenceBank, reference_attention

    # 1. Inputs.
    settings.check()
    check_image_batch(poses, "the pose images", "connect the rendered poses (TCAN Pose Render)")
    if reference is None:
        if calibration is not None:
            raise ValueError("a TPC calibration needs the reference image it was made from; connect the reference "
                             "or remove the calibration")
    else:
        check_image_batch(reference, "the reference", "connect one image (Load Image)")
    if reference is not None and reference.shape[0] != 1:
        raise ValueError(f"the reference is a batch of {reference.shape[0]} images; TCAN animates one character "
                         "from one image: pick one with an ImageFromBatch node")
    num_frames = int(poses.shape[0])
    if num_frames == 0:
        raise ValueError("the pose batch has 0 frames; connect TCAN Pose Render with at least one frame")
    context_width = int(model.unet.config.cross_attention_dim)
    positive = check_context(positive, "positive", context_width)
    negative = check_context(negative, "negative", context_width)
    positive, negative = match_token_lengths(positive, negative)
    if calibration is not None and calibration.num_frames != num_frames:
        raise ValueError(f"the calibration covers {calibration.num_frames} driving frames but {num_frames} pose "
                         "images were given; calibrate with the same driving poses that were rendered")
    limit = model.window_limit() if temporal else None
    if limit is not None and min(settings.context_length, num_frames) > limit.max_frames:
        raise ValueError(f"context length {settings.context_length} is longer than the motion module's "
                         f"{limit.max_frames}-frame positional encoding; use a context length of at most "
                         f"{limit.max_frames}")

    width, height = settings.width, settings.height
    if reference is not None:
        reference = fit_images(reference, width, height, "reference image")
    poses = fit_images(poses, width, height, "pose images")
    device = torch.device(device) if device is not None else next(model.unet.parameters()).device
    unet = model.unet
    appearance = model.appearance_unet if model.appearance_unet is not None else unet
    dtype = next(unet.parameters()).dtype
    positive, negative = positive.to(device), negative.to(device)
    latent_size = (height // SD15.vae_factor, width // SD15.vae_factor)
    notes: list[str] = []

    with modules_on(device, unet, appearance if reference is not None else None):
        # 2. Reference latents.
        ref_latent = _encode(vae, reference, device, dtype, 1) if reference is not None else None
        cal_latents = cal_key_masks = None
        if calibration is not None:
            cal_images = fit_images(calibration.images, width, height, "calibrated references")
            cal_latents = _encode(vae, cal_images, device, dtype, settings.decode_chunk)
            cal_key_masks = F.interpolate(calibration.masks.float()[:, None], size=latent_size, mode="area")[:, 0]

        # 3. Noise and schedule.
        scheduler = make_scheduler(settings.scheduler)
        scheduler.set_timesteps(settings.steps, device=device)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            # Modulo 2**64: the node allows seeds up to 2**64 - 1, and a generator takes no more.
            step_kwargs["generator"] = torch.Generator("cpu").manual_seed((int(settings.seed) + 1) % 2**64)
        latents = initial_noise(num_frames, (SD15.latent_channels, *latent_size), settings.seed, settings.noise,
                                settings.context_length).to(device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma

        plan = iterate_windows(num_frames, settings.steps, settings.context_length, settings.context_overlap,
                               settings.closed_loop)
        accumulator = WindowAccumulator(num_frames)
        run = RunState(device=device, motion=MotionState(num_frames=None), notes=notes)
        bank = ReferenceBank() if reference is not None else None
        windows: dict[int, _Window] = {}

        # 4. Patches and reference attention for exactly this call.
        with model.patched(run), (reference_attention(bank, unet, appearance) if bank is not None
                                  else contextlib.nullcontext()):
            contexts = _Contexts.for_run(run, positive, negative, shared=appearance is unet)
            # 5. Steps x windows, then one scheduler step per sampling step.
            for task in plan:
                if check_cancel is not None:
                    check_cancel()
                t = scheduler.timesteps[task.step]
                if task.first_in_step:
                    accumulator.reset()
                    if bank is not None:
                        appearance_pass(appearance, bank, run.motion, "reference", ref_latent, t,
                                        contexts.appearance)
                window = windows.get(task.window)
                if window is None:
                    window = _prepare_window(task.frames, poses, run, calibration, cal_key_masks, latent_size)
                    windows[task.window] = window
                prediction = window_forward(unet, appearance, bank, run.hooks, _window_input(
                    window, scheduler, latents, poses, t, task.step, settings, contexts, cal_latents, latent_size,
                    run, dtype, device, temporal))
                accumulator.add(task.frames, prediction.movedim(0, 1)[None])
                preview = None
                if task.last_in_step:
                    fused = accumulator.result()[0].movedim(0, 1)
                    stepped = scheduler.step(fused, t, latents, **step_kwargs)
                    latents = stepped.prev_sample
                    denoised = getattr(stepped, "pred_original_sample", None)
                    preview = latent_preview((latents if denoised is None else denoised)[0])
                if progress is not None:
                    progress(1, preview)
            if bank is not None:
                bank.clear()

        if not bool(torch.isfinite(latents).all()):
            advice = {torch.float16: "run the UNet in float32 or bfloat16 (ComfyUI: --fp32-unet / --bf16-unet), or "
                                     "lower cfg",
                      torch.bfloat16: "run the UNet in float32 (ComfyUI: --fp32-unet), or lower cfg"}.get(
                dtype, "float32 does not overflow here, so a weight file or input holds NaN/inf or a patch is too "
                       "strong: lower cfg and the LoRA / ControlNet strengths, and load the checkpoint, LoRA and "
                       "motion module files again (one may be corrupt)")
            raise FloatingPointError(f"the denoising UNet produced NaN or infinite latents (model dtype {dtype}); "
                                     f"{advice}")
        # 6. Decode in chunks; frames go to the CPU as they are decoded.
        raw = (latents / SD15_LATENT_SCALE).to(dtype)
        del latents
    frames = decode_frames(vae, raw, settings.decode_chunk)
    return AnimationResult(frames=frames, latents=raw.float().cpu(), notes=notes)


def decode_frames(vae: VAELike, raw_latents: torch.Tensor, chunk: int = DEFAULT_DECODE_CHUNK) -> torch.Tensor:
    """Unscaled latents [F,4,h,w] -> IMAGE [F,8h,8w,3] on the CPU, ``chunk`` frames at a time; NaN -> clear error.

    Each chunk is written into one preallocated output, so the decoded clip exists once.
    """
    frames: torch.Tensor | None = None
    for start in range(0, raw_latents.shape[0], chunk):
        images = vae.decode(raw_latents[start:start + chunk])
        if not bool(torch.isfinite(images).all()):
            raise FloatingPointError(f"the VAE decoded NaN or infinite pixels in frames {start}.."
                                     f"{min(start + chunk, raw_latents.shape[0]) - 1} while the latents are finite; "
                                     "SD1.5 VAEs overflow in float16: decode in float32 (ComfyUI: --fp32-vae, or "
                                     "a VAE Loader with the fp16-fixed VAE)")
        if frames is None:
            frames = torch.empty((raw_latents.shape[0], *images.shape[1:]), dtype=torch.float32)
        frames[start:start + images.shape[0]] = images.float().cpu()
    return frames


def _prepare_window(frames: tuple[int, ...], poses: torch.Tensor, run: RunState, calibration,
                    cal_key_masks: torch.Tensor | None, latent_size: tuple[int, int]) -> _Window:
    """The hooks' window data (PTM map) and calibration indices and masks, on the CPU."""
    index = list(frames)
    window_poses = poses[index].float() if run.hooks else None
    prepared = [hook.prepare_window(window_poses) for hook in run.hooks]
    calibrated = None
    if calibration is not None:
        cal_index = torch.as_tensor(calibration.frame_to_calibrated[index], dtype=torch.long)
        used = torch.unique(cal_index)
        local = torch.searchsorted(used, cal_index)
        # Area-averaged to the latent, so each layer's own area average (and 0.5 threshold) sees
        # the same fractions as from full-size masks, at a 64th of the memory.
        query = F.interpolate(calibration.driving_person_masks(index).float()[:, None], size=latent_size,
                              mode="area")[:, 0]
        calibrated = (used, local, query, cal_key_masks[used])
    return _Window(frames, prepared, calibrated)


def _window_input(window: _Window, scheduler, latents: torch.Tensor, poses: torch.Tensor, t: torch.Tensor, step: int,
                  settings: SamplerSettings, contexts: _Contexts, cal_latents: torch.Tensor | None,
                  latent_size: tuple[int, int], run: RunState, dtype: torch.dtype, device: torch.device,
                  temporal: bool) -> WindowInput:
    """The typed input of :func:`~.forward.window_forward` for one window at timestep ``t``."""
    index = list(window.frames)
    x = scheduler.scale_model_input(latents[index], t).to(dtype)
    window_poses = poses[index].to(device=device, dtype=dtype).movedim(-1, 1)
    call = WindowCall(x, t, window_poses, contexts.text, step, settings.steps, len(index) if temporal else None,
                      run.motion)
    calibrated = tuple(part.to(device) for part in window.calibrated) if window.calibrated is not None else None
    return WindowInput(call, contexts.positive, contexts.negative, contexts.appearance, window.prepared, latent_size,
                       settings.cfg, settings.reference_out_of_uncond, calibrated, cal_latents)
