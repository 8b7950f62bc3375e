"""AnimateDiff motion modules hooked into a shared tiny SD1.5 UNet for one call: parity with diffusers'
UNetMotionModel, the plain UNet when switched off, hooks gone afterwards, and the clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from tcan_core.animation.temporal_hooks import MotionState, check_motion_fits, motion_installed, positional_limit
from tcan_core.tiny.sd15 import build_tiny_motion_adapter, tiny_unet_config

VIDEOS, FRAMES = 2, 3
# Temporal layers per adapter in the tiny UNet: 4 down blocks x 2, 4 up blocks x 3, and v2's mid block.
LAYERS = {"v1": 20, "v2": 21, "v3": 20}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    # Only the UNet: build_tiny_sd15 would also import transformers for the text encoder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(tiny_unet_config()).eval()


@pytest.fixture(scope="module")
def adapters() -> dict[str, MotionAdapter]:
    return {version: build_tiny_motion_adapter(version) for version in ("v1", "v2", "v3")}


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents [V*F,4,8,8] (video-major), a timestep, and per-frame text states [V*F,77,64]."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(VIDEOS * FRAMES, 4, 8, 8, generator=generator)
    text = torch.randn(VIDEOS * FRAMES, 77, 64, generator=generator)
    return latents, torch.tensor(500), text


def run(unet: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return unet(latents, timestep, text).sample


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(sub._forward_hooks) for sub in module.modules())


def small_adapter(**changes) -> MotionAdapter:
    config = dict(block_out_channels=(32, 32, 64, 64), motion_layers_per_block=2, motion_norm_num_groups=32,
                  motion_max_seq_length=32, use_motion_mid_block=False)
    config.update(changes)
    return MotionAdapter(**config).eval()


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_hooks_match_unet_motion_model(unet, adapters, inputs, version):
    adapter = adapters[version]
    assert (adapter.mid_block is not None) == (version == "v2")
    latents, timestep, text = inputs
    motion_unet = UNetMotionModel.from_unet2d(unet, adapter).eval()
    video = latents.unflatten(0, (VIDEOS, FRAMES)).transpose(1, 2)  # [V,C,F,H,W] as UNetMotionModel takes it
    with torch.no_grad():
        expected = motion_unet(video, timestep, text).sample.transpose(1, 2).flatten(0, 1)
    with motion_installed(unet, adapter, MotionState(num_frames=FRAMES)):
        got = run(unet, latents, timestep, text)
    # Only the float rounding of a time embedding computed per video instead of per frame differs.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - run(unet, latents, timestep, text)).abs().max() > 0.1


def test_switched_off_is_the_plain_unet_and_the_state_switches_per_call(unet, adapters, inputs):
    latents, timestep, text = inputs
    plain = run(unet, latents, timestep, text)
    state = MotionState(num_frames=None)
    with motion_installed(unet, adapters["v2"], state):
        appearance = run(unet, latents, timestep, text)
        state.num_frames = FRAMES
        animated = run(unet, latents, timestep, text)
        state.num_frames = None
        again = run(unet, latents, timestep, text)
    assert torch.equal(appearance, plain)
    assert torch.equal(again, plain)
    assert not torch.allclose(animated, plain)


def test_frames_mix_within_a_video_only(unet, adapters, inputs):
    latents, timestep, text = inputs
    changed = latents.clone()
    changed[0] += 1.0  # video 0, frame 0
    plain_before, plain_after = run(unet, latents, timestep, text), run(unet, changed, timestep, text)
    assert torch.equal(plain_before[1:], plain_after[1:])
    with motion_installed(unet, adapters["v3"], MotionState(num_frames=FRAMES)):
        before, after = run(unet, latents, timestep, text), run(unet, changed, timestep, text)
    assert not torch.allclose(before[1:FRAMES], after[1:FRAMES])
    assert torch.equal(before[FRAMES:], after[FRAMES:])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_hooks_are_installed_at_every_layer_and_removed_after_the_block(unet, adapters, inputs, version):
    latents, timestep, text = inputs
    plain, before = run(unet, latents, timestep, text), hook_count(unet)
    with motion_installed(unet, adapters[version], MotionState(num_frames=FRAMES)):
        assert hook_count(unet) == before + LAYERS[version]
    assert hook_count(unet) == before
    assert torch.equal(run(unet, latents, timestep, text), plain)


def test_hooks_are_removed_when_the_block_raises(unet, adapters, inputs):
    latents, timestep, text = inputs
    plain, before = run(unet, latents, timestep, text), hook_count(unet)
    with pytest.raises(RuntimeError, match="cancelled"):
        with motion_installed(unet, adapters["v1"], MotionState(num_frames=FRAMES)):
            run(unet, latents, timestep, text)
            raise RuntimeError("cancelled")
    assert hook_count(unet) == before
    assert torch.equal(run(unet, latents, timestep, text), plain)


def test_batch_not_a_multiple_of_the_frames(unet, adapters, inputs):
    latents, timestep, text = inputs
    before = hook_count(unet)
    with pytest.raises(ValueError, match=r"batch of 5 latents .* num_frames=3"):
        with motion_installed(unet, adapters["v2"], MotionState(num_frames=FRAMES)):
            run(unet, latents[:5], timestep, text[:5])
    assert hook_count(unet) == before


@pytest.mark.parametrize("version, limit", [("v1", 24), ("v3", 32)])
def test_more_frames_than_the_positional_encoding(unet, adapters, version, limit):
    adapter = adapters[version]
    assert positional_limit(adapter.down_blocks[0].motion_modules[0]) == limit
    frames = limit + 1
    latents, text = torch.zeros(frames, 4, 8, 8), torch.zeros(frames, 77, 64)
    with pytest.raises(ValueError, match=rf"at most {limit} frames, got {frames} .* {limit} or less"):
        with motion_installed(unet, adapter, MotionState(num_frames=frames)):
            run(unet, latents, torch.tensor(1), text)


def test_sdxl_layout_adapter_is_refused_with_both_widths(unet):
    adapter = small_adapter(block_out_channels=(32, 64, 64))
    message = r"\(32, 64, 64\) \(SDXL-layout motion module\) .* \(32, 32, 64, 64\) .* SD1\.5 motion module"
    with pytest.raises(ValueError, match=message):
        check_motion_fits(unet, adapter, "mm_sdxl.safetensors")
    before = hook_count(unet)
    with pytest.raises(ValueError, match="mm_sdxl.safetensors"):
        with motion_installed(unet, adapter, MotionState(num_frames=2), source="mm_sdxl.safetensors"):
            pass
    assert hook_count(unet) == before


def test_adapter_with_another_layer_count_is_refused(unet, adapters):
    check_motion_fits(unet, adapters["v2"], "tiny v2")
    with pytest.raises(ValueError, match=r"down_blocks\.0 has 2 layers but the motion module has 1"):
        check_motion_fits(unet, small_adapter(motion_layers_per_block=1), "one-layer module")


def test_adapter_in_another_dtype_is_refused(unet, adapters):
    adapter = copy.deepcopy(adapters["v3"]).double()
    with pytest.raises(ValueError, match=r"torch\.float64 .* torch\.float32; move it"):
        with motion_installed(unet, adapter, MotionState(num_frames=2)):
            pass


def test_installing_twice_on_one_unet_is_refused(unet, adapters):
    before = hook_count(unet)
    with motion_installed(unet, adapters["v2"], MotionState(num_frames=2)):
        with pytest.raises(ValueError, match="already has a temporal layer installed"):
            with motion_installed(unet, adapters["v3"], MotionState(num_frames=2)):
                pass
        assert hook_count(unet) == before + LAYERS["v2"]
    assert hook_count(unet) == before


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "16"])
def test_num_frames_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="num_frames must be a whole number >= 1"):
        MotionState(num_frames=bad)
    state = MotionState(num_frames=4)
    with pytest.raises(ValueError, match=repr(bad)):
        state.num_frames = bad
    assert state.num_frames == 4
