"""TCAN's temporal ControlNet on the tiny SD1.5 ControlNet: zero temporal layers reproduce the frozen
ControlNet, real ones mix the frames of a window only from down block 2 on, the layers are the
motion module's own (shared, same names), and the hooks are gone afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import ControlNetModel, MotionAdapter

from tcan_core.animation.controlnet_t import (
    TemporalLayers,
    check_temporal_fits,
    temporal_controlnet_installed,
)
from tcan_core.animation.temporal_hooks import MotionState
from tcan_core.animation.ptm import temporal_attention_levels
from tcan_core.tiny.sd15 import build_tiny_controlnet, build_tiny_motion_adapter

FRAMES = 3
# Residuals of the tiny ControlNet: conv_in, 3 per down block 0-2 (2 layers + downsampler), 2 of block 3,
# then the mid block's. The first 7 come before down block 2.
BEFORE_BLOCK_2 = 7


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def controlnet() -> ControlNetModel:
    return build_tiny_controlnet()


@pytest.fixture(scope="module")
def adapter() -> MotionAdapter:
    return build_tiny_motion_adapter("v3")


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One window: latents [F,4,8,8], a timestep, text states [F,77,64], pose images [F,3,64,64]."""
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(FRAMES, 4, 8, 8, generator=generator)
    text = torch.randn(FRAMES, 77, 64, generator=generator)
    poses = torch.rand(FRAMES, 3, 64, 64, generator=generator)
    return latents, torch.tensor(300), text, poses


def residuals(controlnet, latents, timestep, text, poses) -> list[torch.Tensor]:
    """down_block_res_samples followed by mid_block_res_sample, each [F,C,h,w]."""
    with torch.no_grad():
        down, mid = controlnet(latents, timestep, text, controlnet_cond=poses, return_dict=False)
    return [*down, mid]


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(sub._forward_hooks) for sub in module.modules())


def assert_all_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"residual {index} differs by {(a - b).abs().max().item()}"


def test_zero_temporal_layers_reproduce_the_frozen_controlnet(controlnet, adapter, inputs):
    zeroed = copy.deepcopy(adapter)
    for block in (2, 3):
        for layer in zeroed.down_blocks[block].motion_modules:
            torch.nn.init.zeros_(layer.proj_out.weight)
            torch.nn.init.zeros_(layer.proj_out.bias)
    plain = residuals(controlnet, *inputs)
    with temporal_controlnet_installed(controlnet, TemporalLayers.from_motion_adapter(zeroed),
                                       MotionState(num_frames=FRAMES)):
        got = residuals(controlnet, *inputs)
    assert_all_equal(got, plain)


def test_temporal_layers_mix_frames_from_down_block_2_on(controlnet, adapter, inputs):
    latents, timestep, text, poses = inputs
    moved = poses.clone()
    moved[0] = moved[0].flip(-1)  # change frame 0's pose only
    plain_before = residuals(controlnet, latents, timestep, text, poses)
    plain_after = residuals(controlnet, latents, timestep, text, moved)
    assert_all_equal([r[1:] for r in plain_after], [r[1:] for r in plain_before])

    with temporal_controlnet_installed(controlnet, TemporalLayers.from_motion_adapter(adapter),
                                       MotionState(num_frames=FRAMES)):
        before = residuals(controlnet, latents, timestep, text, poses)
        after = residuals(controlnet, latents, timestep, text, moved)
    assert_all_equal(before[:BEFORE_BLOCK_2], plain_before[:BEFORE_BLOCK_2])
    assert_all_equal([r[1:] for r in after[:BEFORE_BLOCK_2]], [r[1:] for r in before[:BEFORE_BLOCK_2]])
    for index in range(BEFORE_BLOCK_2, len(before)):
        assert not torch.allclose(after[index][1], before[index][1]), f"residual {index} of frame 1 did not change"


def test_layers_run_where_animatediff_puts_them(controlnet, adapter, inputs):
    """Block 2: resnet, attention, temporal layer per pair, then the downsampler; block 3: resnet, temporal layer."""
    calls = {}

    def record(module, args, kwargs, output):
        calls[module] = (kwargs, output[1])

    handles = [controlnet.down_blocks[i].register_forward_hook(record, with_kwargs=True) for i in (2, 3)]
    try:
        with temporal_controlnet_installed(controlnet, TemporalLayers.from_motion_adapter(adapter),
                                           MotionState(num_frames=FRAMES)):
            residuals(controlnet, *inputs)
    finally:
        for handle in handles:
            handle.remove()

    with torch.no_grad():
        block = controlnet.down_blocks[2]
        kwargs, states = calls[block]
        hidden, expected = kwargs["hidden_states"], []
        for resnet, attention, layer in zip(block.resnets, block.attentions, adapter.down_blocks[2].motion_modules):
            hidden = resnet(hidden, kwargs["temb"])
            hidden = attention(hidden, encoder_hidden_states=kwargs["encoder_hidden_states"], return_dict=False)[0]
            expected.append(layer(hidden, num_frames=FRAMES))
            hidden = expected[-1]
        expected.append(block.downsamplers[0](hidden))
        assert_all_equal(list(states), expected)

        block = controlnet.down_blocks[3]
        kwargs, states = calls[block]
        hidden, expected = kwargs["hidden_states"], []
        for resnet, layer in zip(block.resnets, adapter.down_blocks[3].motion_modules):
            hidden = layer(resnet(hidden, kwargs["temb"]), num_frames=FRAMES)
            expected.append(hidden)
        assert_all_equal(list(states), expected)


def test_switched_off_is_the_frozen_controlnet(controlnet, adapter, inputs):
    plain = residuals(controlnet, *inputs)
    state = MotionState(num_frames=None)
    with temporal_controlnet_installed(controlnet, TemporalLayers.from_motion_adapter(adapter), state):
        off = residuals(controlnet, *inputs)
        state.num_frames = FRAMES
        on = residuals(controlnet, *inputs)
    assert_all_equal(off, plain)
    assert not torch.allclose(on[-1], plain[-1])


def test_hooks_are_removed_after_the_block_and_on_error(controlnet, adapter, inputs):
    temporal = TemporalLayers.from_motion_adapter(adapter)
    plain, before = residuals(controlnet, *inputs), hook_count(controlnet)
    with temporal_controlnet_installed(controlnet, temporal, MotionState(num_frames=FRAMES)):
        assert hook_count(controlnet) == before + 4
    assert hook_count(controlnet) == before
    with pytest.raises(RuntimeError, match="cancelled"):
        with temporal_controlnet_installed(controlnet, temporal, MotionState(num_frames=FRAMES)):
            residuals(controlnet, *inputs)
            raise RuntimeError("cancelled")
    assert hook_count(controlnet) == before
    latents, timestep, text, poses = inputs
    with pytest.raises(ValueError, match=r"batch of 2 latents .* num_frames=3"):
        with temporal_controlnet_installed(controlnet, temporal, MotionState(num_frames=FRAMES)):
            residuals(controlnet, latents[:2], timestep, text[:2], poses[:2])
    assert hook_count(controlnet) == before
    assert_all_equal(residuals(controlnet, *inputs), plain)


def test_from_motion_adapter_shares_the_modules_under_the_adapter_names(adapter):
    temporal = TemporalLayers.from_motion_adapter(adapter)
    assert temporal.blocks == (2, 3)
    for block in (2, 3):
        assert temporal.motion_modules(block) is adapter.down_blocks[block].motion_modules
    adapter_state = adapter.state_dict()
    state = temporal.state_dict()
    assert set(state) == {k for k in adapter_state if k.startswith(("down_blocks.2.", "down_blocks.3."))}
    for key, value in state.items():
        assert value.data_ptr() == adapter_state[key].data_ptr(), key
    # PTM finds the layers at the levels of the blocks they run in.
    assert set(temporal_attention_levels(temporal).values()) == {2, 3}


def test_from_modules_loads_a_motion_module_state_dict(adapter):
    fresh = copy.deepcopy(adapter)
    for parameter in fresh.parameters():
        torch.nn.init.zeros_(parameter)
    temporal = TemporalLayers.from_modules({block: fresh.down_blocks[block].motion_modules for block in (2, 3)})
    wanted = {k: v for k, v in adapter.state_dict().items() if k.startswith(("down_blocks.2.", "down_blocks.3."))}
    temporal.load_state_dict(wanted, strict=True)
    assert torch.equal(fresh.down_blocks[3].motion_modules[1].proj_out.weight,
                       adapter.down_blocks[3].motion_modules[1].proj_out.weight)


@pytest.mark.parametrize("modules, message", [
    ({}, "non-empty dict"),
    ({-1: None}, "whole numbers >= 0, got -1"),
    ({2: []}, "non-empty torch.nn.ModuleList"),
    ({2: torch.nn.ModuleList([torch.nn.Linear(2, 2)])}, "holds Linear"),
])
def test_from_modules_refuses_bad_input(modules, message):
    with pytest.raises(ValueError, match=message):
        TemporalLayers.from_modules(modules)


def test_from_motion_adapter_refuses_missing_blocks(adapter):
    with pytest.raises(ValueError, match=r"\(0\.\.3\), got \(4,\)"):
        TemporalLayers.from_motion_adapter(adapter, blocks=(4,))


def test_mismatched_width_is_refused_with_both_widths(controlnet):
    wide = MotionAdapter(block_out_channels=(64, 64, 128, 128), motion_layers_per_block=2, motion_norm_num_groups=32,
                         use_motion_mid_block=False)
    temporal = TemporalLayers.from_motion_adapter(wide)
    message = r"down block 2 have width 128 but the ControlNet's down block 2 has width 64 .* SD1\.5 motion module"
    with pytest.raises(ValueError, match=message):
        check_temporal_fits(controlnet, temporal, "wide layers")
    before = hook_count(controlnet)
    with pytest.raises(ValueError, match="wide layers"):
        with temporal_controlnet_installed(controlnet, temporal, MotionState(num_frames=2), source="wide layers"):
            pass
    assert hook_count(controlnet) == before


def test_wrong_layer_count_or_block_is_refused(controlnet, adapter):
    check_temporal_fits(controlnet, TemporalLayers.from_motion_adapter(adapter), "tiny v3")
    three = TemporalLayers.from_modules({2: adapter.up_blocks[1].motion_modules})  # width 64, 3 layers
    with pytest.raises(ValueError, match="down block 2 has 2 layers but there are 3"):
        check_temporal_fits(controlnet, three, "three layers")
    beyond = TemporalLayers.from_modules({4: adapter.down_blocks[3].motion_modules})
    with pytest.raises(ValueError, match="down block 4, but the ControlNet has 4 down blocks"):
        check_temporal_fits(controlnet, beyond, "block 4")
