"""The patches the TCAN model nodes record on a ``TCAN_MODEL``, each applied for one sampling call.

Every patch is a frozen record (weights shared, nothing copied) whose ``applied(model, run)``
installs it on entry and removes it on exit, also when the call fails or is cancelled:

- :class:`MotionPatch`: AnimateDiff temporal layers hooked into the denoising UNet (key ``motion``);
- :class:`AppaLoraPatch`: TCAN's APPA LoRA merged into the UNet's weights and taken out again (``lora``);
- :class:`ControlNetPatch`: the OpenPose ControlNet, with temporal layers in its down blocks 2
  and 3 when it has them (``controlnet``);
- :class:`PTMPatch`: the pose-driven temperature map in the temporal attention (``ptm``);
- :class:`tcan_core.face.FaceIDPatch` (in :mod:`tcan_core.face`, above this package): a face adapter's
  tokens after the text and its attention branch in every cross-attention (``face_id``).

Modules a patch brings (motion adapter, ControlNet) are moved to the sampling device for the
call and back to where they were after it. A patch takes part in sampling only through typed hook
points on the call's ``RunState`` (:mod:`.forward`): the ControlNet gives residuals, PTM sets the
window's temperature map; the sampler names no patch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ..models.lora import LoraPatch
from .model import RunState, TCANModel, modules_on
from .forward import ForwardHook, Residuals, WindowCall
from .ptm import DEFAULT_TAU, PTMState, ptm_installed, temperature_map

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class MotionPatch:
    """AnimateDiff motion module (diffusers ``MotionAdapter``) in the denoising UNet (Guo et al., ICLR 2024)."""

    adapter: torch.nn.Module
    source: str
    key: str = "motion"

    @property
    def max_frames(self) -> int:
        """The longest window the positional encoding covers."""
        return int(self.adapter.config.get("motion_max_seq_length", 32))

    @contextlib.contextmanager
    def applied(self, model: TCANModel, run: RunState) -> Iterator[None]:
        from .temporal_hooks import check_motion_fits, motion_installed

        check_motion_fits(model.unet, self.adapter, self.source)
        with modules_on(run.device, self.adapter), motion_installed(model.unet, self.adapter, run.motion):
            yield


@dataclass(frozen=True, eq=False)
class AppaLoraPatch:
    """TCAN's APPA LoRA (or any UNet LoRA) at a strength; several stack."""

    lora: LoraPatch
    key: str = "lora"

    @contextlib.contextmanager
    def applied(self, model: TCANModel, run: RunState) -> Iterator[None]:
        with self.lora.applied(model.unet):
            yield


@dataclass(frozen=True, eq=False)
class ControlNetPatch:
    """The frozen OpenPose ControlNet with TCAN's temporal layers (down blocks 2, 3) when ``temporal`` is set.

    ``strength`` scales its residuals; it acts on the sampling steps whose fraction of the run is
    in ``[start, end)`` (``end`` 1.0 includes the last step).
    """

    controlnet: torch.nn.Module
    source: str
    temporal: torch.nn.Module | None = None
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    key: str = "controlnet"

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"ControlNet strength must be a finite number >= 0, got {self.strength}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"ControlNet start and end must satisfy 0 <= start < end <= 1, got start "
                             f"{self.start} and end {self.end}; use 0 and 1 to guide every step")

    def active(self, step: int, steps: int) -> bool:
        """True when step ``step`` of ``steps`` falls in ``[start, end)`` of the run."""
        fraction = step / steps
        return self.strength > 0 and self.start <= fraction and (fraction < self.end or self.end >= 1.0)

    @contextlib.contextmanager
    def applied(self, model: TCANModel, run: RunState) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(modules_on(run.device, self.controlnet))
            if self.temporal is not None:
                from .controlnet_t import check_temporal_fits, temporal_controlnet_installed

                check_temporal_fits(self.controlnet, self.temporal, self.source)
                stack.enter_context(modules_on(run.device, self.temporal))
                stack.enter_context(temporal_controlnet_installed(self.controlnet, self.temporal, run.motion))
            stack.enter_context(run.hooked(_ControlNetHook(self)))
            yield


@dataclass(frozen=True, eq=False)
class PTMPatch:
    """TCAN's pose-driven temperature map on the motion module's temporal attention; tau 0 is off."""

    tau: float = DEFAULT_TAU
    key: str = "ptm"

    def __post_init__(self) -> None:
        if not math.isfinite(self.tau) or self.tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau}; TCAN uses 3, and 0 turns PTM off")

    @staticmethod
    def motion_of(model: TCANModel) -> MotionPatch:
        """The motion patch PTM acts on, or a clear error when the model has none."""
        motion = model.patch("motion")
        if motion is None:
            raise ValueError("TCAN PTM acts on the motion module's temporal attention, and this model has none; "
                             "connect TCAN Motion Module before TCAN PTM")
        return motion

    @contextlib.contextmanager
    def applied(self, model: TCANModel, run: RunState) -> Iterator[None]:
        motion = self.motion_of(model)
        if self.tau == 0:
            yield
            return
        state = PTMState()
        with ptm_installed(motion.adapter, state), run.hooked(_PTMHook(state, self.tau)):
            yield


class _ControlNetHook(ForwardHook):
    """The ControlNet's residuals for a window, at batch f, on the steps its patch is active."""

    def __init__(self, patch: ControlNetPatch) -> None:
        self.patch = patch

    def residuals(self, call: WindowCall) -> Residuals | None:
        patch = self.patch
        if not patch.active(call.step, call.steps):
            return None
        call.motion.num_frames = call.temporal_frames
        return patch.controlnet(call.latents, call.timestep,
                                encoder_hidden_states=call.text.expand(call.frames, -1, -1).to(call.latents.dtype),
                                controlnet_cond=call.poses, conditioning_scale=patch.strength, return_dict=False)


class _PTMHook(ForwardHook):
    """The window's temperature map (TCAN PTM), set on the temporal attentions around the UNet call."""

    def __init__(self, state: PTMState, tau: float) -> None:
        self.state = state
        self.tau = tau

    def prepare_window(self, pose_images: torch.Tensor) -> torch.Tensor:
        """T of the window [H,W] from its pose images [f,H,W,3]."""
        return temperature_map(pose_images, self.tau)

    def enter_window(self, prepared: torch.Tensor, latent_size: tuple[int, int]) -> None:
        self.state.set(prepared, latent_size)

    def exit_window(self) -> None:
        self.state.clear()
