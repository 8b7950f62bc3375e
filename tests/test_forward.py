"""The one window forward: typed input, patches only through hook points, and gradients flow through it (the
trainer's use); the sampler and the forward name no patch kind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tcan_core.animation.controlnet_t import TemporalLayers
from tcan_core.animation.forward import ForwardHook, WindowCall, WindowInput, window_forward
from tcan_core.animation.model import RunState
from tcan_core.animation.patches import ControlNetPatch, MotionPatch, PTMPatch
from tcan_core.animation.temporal_hooks import MotionState

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def window_input(run: RunState, context: torch.Tensor, x: torch.Tensor, cfg: float = 2.0) -> WindowInput:
    frames = x.shape[0]
    poses = torch.zeros(frames, 64, 64, 3)
    poses[:, 20:40, 24:32] = 1.0
    prepared = [hook.prepare_window(poses) for hook in run.hooks]
    call = WindowCall(x, torch.tensor(500), poses.movedim(-1, 1), context, 0, 2, frames, run.motion)
    return WindowInput(call, context, context, context, prepared, (8, 8), cfg)


def test_gradients_flow_through_the_window_forward_with_every_hook(tiny_parts, tiny_model):
    adapter = tiny_parts["adapter"]
    model = (tiny_model.with_patch(MotionPatch(adapter, "tiny motion"))
             .with_patch(ControlNetPatch(tiny_parts["controlnet"], "tiny controlnet",
                                         TemporalLayers.from_motion_adapter(adapter)))
             .with_patch(PTMPatch(3.0)))
    run = RunState(motion=MotionState(num_frames=None))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with model.patched(run):
        assert [type(h).__name__ for h in run.hooks] == ["_ControlNetHook", "_PTMHook"]
        eps = window_forward(model.unet, model.unet, None, run.hooks, window_input(run, tiny_parts["context"], x))
        assert eps.shape == (3, 4, 8, 8) and eps.requires_grad
        eps.square().mean().backward()
    assert run.hooks == [] and x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0


class _Counting(ForwardHook):
    def __init__(self) -> None:
        self.entered = self.exited = 0

    def enter_window(self, prepared, latent_size) -> None:
        self.entered += 1

    def exit_window(self) -> None:
        self.exited += 1


class _Boom(ForwardHook):
    def enter_window(self, prepared, latent_size) -> None:
        raise RuntimeError("boom")


def test_a_failing_hook_still_exits_the_hooks_entered_before_it(tiny_parts, tiny_model):
    counting = _Counting()
    run = RunState(motion=MotionState(num_frames=None), hooks=[counting, _Boom()])
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        window_forward(tiny_model.unet, tiny_model.unet, None, run.hooks, window_input(run, tiny_parts["context"], x))
    assert counting.entered == counting.exited == 1


@pytest.mark.parametrize("module", ["sampler.py", "forward.py"])
def test_the_sampler_and_the_forward_name_no_patch_kind(module):
    tree = ast.parse((ROOT / "tcan_core" / "animation" / module).read_text())
    kinds = {"motion", "lora", "controlnet", "ptm", "face_id"}
    named = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in kinds]
    calls = [ast.unparse(node) for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr in ("patch", "ptm", "controlnet", "face_tokens")]
    imports = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and "face" in (node.module or "")]
    assert not named and not calls and not imports, (named, calls, imports)
