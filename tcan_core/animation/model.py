"""``TCAN_MODEL``: an immutable handle on shared weights plus the patches recorded on it.

Patch nodes (motion module, APPA LoRA, temporal ControlNet, PTM, face ID) never change the model
they get: they return ``model.with_patch(patch)``, a cheap copy that shares every weight and
records one more patch. The sampler enters :meth:`TCANModel.patched` for exactly one sampling
call; every patch is applied on entry and removed on exit, in reverse order, also when the call
fails or is cancelled. Two branches of a graph therefore never see each other's patches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any, ContextManager, Iterator, Protocol

import torch

log = logging.getLogger(__name__)

# Weights are shared between clones, so only one patched call may run at a time.
_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def modules_on(device: torch.device, *modules: torch.nn.Module | None) -> Iterator[None]:
    """Keep the (distinct, non-None) ``modules`` on ``device`` for the block; put each back where it was after."""
    homes: list[tuple[torch.nn.Module, torch.device]] = []
    seen: set[int] = set()
    try:
        for module in modules:
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            homes.append((module, next(module.parameters()).device))
            module.to(device)
        yield
    finally:
        for module, home in homes:
            module.to(home)


@dataclass
class RunState:
    """What one sampling call shares with the patches applied for it.

    The sampler makes it; patches fill in what the sampler needs from them: ``motion`` is the
    state the temporal layers read (frames per video, None for the appearance pass), ``ptm`` the
    temperature-map state and tau of a PTM patch, ``controlnet`` the ControlNet patch in force.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    motion: Any = None
    ptm: Any = None
    ptm_tau: float = 0.0
    controlnet: Any = None
    notes: list[str] = field(default_factory=list)


class Patch(Protocol):
    """Something a patch node records: ``key`` names its kind, ``applied`` installs it for one call."""

    key: str

    def applied(self, model: "TCANModel", run: RunState) -> ContextManager[None]:
        ...


@dataclass(frozen=True)
class TCANModel:
    """Denoising UNet, VAE and text encoder (shared), an optional appearance UNet, and patches.

    ``appearance_unet`` is None in training-free mode: the base UNet's weights then serve as
    the appearance UNet. ``exclusive`` patch keys replace an earlier patch of the same key
    (one PTM, one ControlNet); other keys stack (several LoRAs).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    source: str
    appearance_unet: torch.nn.Module | None = None
    patches: tuple = field(default_factory=tuple)

    EXCLUSIVE = ("motion", "controlnet", "ptm", "face_id")

    def with_patch(self, patch: Patch) -> "TCANModel":
        """A copy with ``patch`` recorded; this model is left as it was."""
        kept = tuple(p for p in self.patches if not (patch.key in self.EXCLUSIVE and p.key == patch.key))
        return replace(self, patches=kept + (patch,))

    def patch(self, key: str) -> Patch | None:
        """The last recorded patch of kind ``key``, if any."""
        return next((p for p in reversed(self.patches) if p.key == key), None)

    def describe(self) -> str:
        parts = [p.key for p in self.patches] or ["no patches"]
        mode = "appearance UNet from file" if self.appearance_unet is not None else "training-free"
        return f"TCAN model from {self.source} ({mode}; {', '.join(parts)})"

    @contextlib.contextmanager
    def patched(self, run: RunState | None = None) -> Iterator[RunState]:
        """Apply every patch for the duration of one call; remove all of them afterwards."""
        run = RunState() if run is None else run
        with _PATCH_LOCK, contextlib.ExitStack() as stack:
            for patch in self.patches:
                stack.enter_context(patch.applied(self, run))
            yield run
