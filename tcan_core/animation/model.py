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
from typing import Any, ContextManager, Iterator, Protocol, runtime_checkable

import torch

from .forward import ForwardHook

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


@dataclass(frozen=True, eq=False)
class ContextTokens:
    """Tokens a patch appends after the text context for one call (a face adapter's face tokens).

    ``cond`` [1,n,C] goes after the positive context, ``uncond`` [1,n,C] after the negative one
    (None: ``cond`` there too). Every context given to the denoising UNet during the call must end
    with them, in the order the patches were applied, since the attention splits them off the end.
    """

    owner: str
    cond: torch.Tensor
    uncond: torch.Tensor | None = None


@dataclass
class RunState:
    """What one sampling call shares with the patches applied for it.

    The sampler makes it; ``motion`` is the state the temporal layers read (frames per video, None
    for the appearance pass). Patches take part in the call through typed hook points only:
    ``hooks`` (:class:`~tcan_core.animation.forward.ForwardHook`: per-window data, ControlNet
    residuals, per-window attention state) and ``context_tokens`` (tokens after the text context);
    they add to ``notes`` for the node's report. :meth:`hooked` adds a hook for a ``with`` block.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    motion: Any = None
    hooks: list[ForwardHook] = field(default_factory=list)
    context_tokens: list[ContextTokens] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def hooked(self, hook: ForwardHook) -> Iterator[ForwardHook]:
        """``hook`` in :attr:`hooks` for the ``with`` block, taken out after it (also on error)."""
        self.hooks.append(hook)
        try:
            yield hook
        finally:
            self.hooks.remove(hook)


@runtime_checkable
class WindowLimited(Protocol):
    """A patch that limits how many frames one window may have (a motion module's positional encoding)."""

    @property
    def max_frames(self) -> int:
        ...


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

    def window_limit(self) -> WindowLimited | None:
        """The patch that allows the fewest frames per window, or None when no patch limits them."""
        limited = [p for p in self.patches if isinstance(p, WindowLimited)]
        return min(limited, key=lambda p: p.max_frames) if limited else None

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
