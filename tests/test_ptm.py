"""PTM (TCAN's Pose-driven Temperature Map): the map, the fused temporal-attention processor, and
its installation on a tiny diffusers UNetMotionModel."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tcan_core.animation.ptm import (
    PTMAttnProcessor,
    PTMState,
    install_ptm,
    level_size,
    ptm_installed,
    resize_temperature,
    restore_processors,
    temperature_map,
    temporal_attention_levels,
)


def lit(frames: int, height: int, width: int, points) -> torch.Tensor:
    """Black pose images [F,H,W,3] with pixel (y, x) of frame f lit in channel c for each (f, y, x, c)."""
    images = torch.zeros(frames, height, width, 3)
    for f, y, x, c in points:
        images[f, y, x, c] = 1.0
    return images


def analytic(height: int, width: int, y0: int, x0: int, tau: float) -> torch.Tensor:
    """T for B = {(y0, x0)}: tau * |p - (y0, x0)| / half-diagonal + 1; [H,W] float64."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    half_diagonal = math.sqrt((height / 2) ** 2 + (width / 2) ** 2)
    return tau * torch.sqrt((yy - y0) ** 2 + (xx - x0) ** 2) / half_diagonal + 1


# ---------------------------------------------------------------------------------------------
# the map


def test_single_lit_pixel_gives_the_analytic_distance():
    height, width, y0, x0 = 20, 30, 5, 7
    temperature = temperature_map(lit(1, height, width, [(0, y0, x0, 1)]), tau=3.0)
    expected = analytic(height, width, y0, x0, 3.0)
    assert temperature.shape == (height, width)
    assert temperature[y0, x0].item() == 1.0
    for corner in [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)]:
        assert temperature[corner].item() == pytest.approx(expected[corner].item(), rel=1e-6)
    torch.testing.assert_close(temperature.double(), expected, rtol=1e-6, atol=1e-6)


def test_drawn_pixels_have_temperature_one_and_the_rest_more():
    images = torch.zeros(1, 16, 12, 3)
    images[0, 4:9, 3:6] = torch.tensor([0.6, 0.0, 0.0])
    temperature = temperature_map(images, tau=3.0)
    drawn = torch.zeros(16, 12, dtype=torch.bool)
    drawn[4:9, 3:6] = True
    assert torch.equal(temperature[drawn], torch.ones(int(drawn.sum())))
    assert bool((temperature[~drawn] > 1).all())


def test_union_over_frames():
    height, width = 15, 25
    images = lit(3, height, width, [(0, 2, 3, 0), (2, 12, 20, 2)])
    temperature = temperature_map(images, tau=2.0)
    expected = torch.minimum(analytic(height, width, 2, 3, 2.0), analytic(height, width, 12, 20, 2.0))
    torch.testing.assert_close(temperature.double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(temperature, temperature_map(images[:1], tau=2.0))


def test_pixels_below_the_threshold_count_as_black():
    images = lit(1, 10, 14, [(0, 3, 4, 0)])
    images += 0.01
    torch.testing.assert_close(temperature_map(images).double(), analytic(10, 14, 3, 4, 3.0), rtol=1e-6, atol=1e-6)


def test_tau_zero_and_empty_pose_give_exactly_ones():
    images = lit(2, 9, 11, [(0, 1, 1, 0), (1, 7, 9, 1)])
    assert torch.equal(temperature_map(images, tau=0.0), torch.ones(9, 11))
    assert torch.equal(temperature_map(torch.zeros(4, 9, 11, 3), tau=3.0), torch.ones(9, 11))


def test_map_follows_input_dtype():
    images = lit(1, 8, 8, [(0, 0, 0, 0)]).double()
    assert temperature_map(images).dtype == torch.float64
    assert temperature_map(images.half()).dtype == torch.float16


@pytest.mark.parametrize("images, tau, message", [
    (torch.zeros(8, 8, 3), 3.0, r"\[F,H,W,3\]"),
    (torch.zeros(1, 8, 8, 4), 3.0, r"\[F,H,W,3\]"),
    (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), 3.0, "float"),
    (torch.zeros(0, 8, 8, 3), 3.0, "at least one pose frame"),
    (torch.zeros(1, 8, 8, 3), -1.0, "tau"),
    (torch.zeros(1, 8, 8, 3), float("nan"), "tau"),
])
def test_map_bad_input(images, tau, message):
    with pytest.raises(ValueError, match=message):
        temperature_map(images, tau=tau)


def test_resize_is_nearest_neighbour():
    temperature = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert torch.equal(resize_temperature(temperature, 2, 3), temperature[::2, ::2])
    up = resize_temperature(temperature, 8, 12)
    assert torch.equal(up, temperature.repeat_interleave(2, 0).repeat_interleave(2, 1))
    odd = resize_temperature(temperature, 3, 5)
    rows = [math.floor(i * 4 / 3) for i in range(3)]
    cols = [math.floor(j * 6 / 5) for j in range(5)]
    assert torch.equal(odd, temperature[rows][:, cols])


@pytest.mark.parametrize("size", [(0, 3), (2, 2.5)])
def test_resize_bad_size(size):
    with pytest.raises(ValueError, match="positive integers"):
        resize_temperature(torch.ones(4, 4), *size)


def test_level_size_halves_with_ceil():
    assert [level_size((6, 10), k) for k in range(4)] == [(6, 10), (3, 5), (2, 3), (1, 2)]
    assert level_size((64, 96), 3) == (8, 12)


# ---------------------------------------------------------------------------------------------
# the fused processor against the materialised formula


def make_attention(channels: int, heads: int, seed: int) -> Attention:
    """A temporal attention as AnimateDiff's motion module builds it."""
    torch.manual_seed(seed)
    return Attention(query_dim=channels, heads=heads, dim_head=channels // heads, bias=False).eval()


def materialised(attn: Attention, hidden: torch.Tensor, temperature: torch.Tensor, batch: int) -> torch.Tensor:
    """softmax((q k^T) * scale / T) v with the logits written out, T [h,w] repeated over the batch."""
    rows, frames, _ = hidden.shape
    heads = attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    head_dim = q.shape[-1] // heads
    q, k, v = (t.reshape(rows, frames, heads, head_dim).permute(0, 2, 1, 3) for t in (q, k, v))
    per_row = temperature.reshape(1, -1).expand(batch, -1).reshape(rows, 1, 1, 1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * head_dim ** -0.5 / per_row
    out = torch.matmul(torch.softmax(logits, dim=-1), v)
    out = out.permute(0, 2, 1, 3).reshape(rows, frames, heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("latent, level, batch, frames", [
    ((6, 10), 0, 1, 16),
    ((6, 10), 1, 2, 8),
    ((5, 7), 2, 3, 5),
    ((7, 4), 1, 2, 1),
    ((6, 10), None, 2, 4),
    ((8, 8), 1, 4, 6),
])
@torch.no_grad()
def test_fused_equals_materialised_logits(latent, level, batch, frames):
    attn = make_attention(32, 4, seed=1)
    generator = torch.Generator().manual_seed(2)
    latent_map = 1 + 3 * torch.rand(latent, generator=generator)
    state = PTMState()
    state.set(latent_map)
    height, width = level_size(latent, level or 0)
    hidden = torch.randn(batch * height * width, frames, 32, generator=generator)

    attn.set_processor(PTMAttnProcessor(state, level))
    fused = attn(hidden)
    reference = materialised(attn, hidden, resize_temperature(latent_map, height, width), batch)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    if frames > 1:
        attn.set_processor(AttnProcessor2_0())
        assert not torch.allclose(fused, attn(hidden), atol=1e-4)


def count_chunks(attn: Attention):
    """A list that gets one entry per ``to_q`` call of ``attn`` (one per row chunk), and the hook handle."""
    calls: list[int] = []
    handle = attn.to_q.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("latent, level, batch, chunk_rows", [
    ((6, 10), 0, 2, 7),  # chunks cut through locations and batches
    ((6, 10), 1, 3, 15),  # chunk = exactly one batch's locations
    ((5, 7), 2, 2, 1),
])
@torch.no_grad()
def test_row_chunks_equal_one_chunk_and_the_materialised_logits(latent, level, batch, chunk_rows):
    frames, channels = 6, 32
    attn = make_attention(channels, 4, seed=4)
    generator = torch.Generator().manual_seed(6)
    latent_map = 1 + 3 * torch.rand(latent, generator=generator)
    state = PTMState()
    state.set(latent_map)
    height, width = level_size(latent, level)
    rows = batch * height * width
    hidden = torch.randn(rows, frames, channels, generator=generator)

    attn.set_processor(PTMAttnProcessor(state, level, chunk_bytes=None))
    whole = attn(hidden)
    processor = PTMAttnProcessor(state, level, chunk_bytes=chunk_rows * frames * channels * 4)
    assert processor.chunk_rows(rows, frames, channels, 4) == chunk_rows
    attn.set_processor(processor)
    calls, handle = count_chunks(attn)
    try:
        chunked = attn(hidden)
    finally:
        handle.remove()
    assert len(calls) == math.ceil(rows / chunk_rows) and sum(calls) == rows
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    reference = materialised(attn, hidden, resize_temperature(latent_map, height, width), batch)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_row_chunks_without_a_map_match_attn_processor_2_0_with_a_mask():
    attn = make_attention(32, 4, seed=7)
    generator = torch.Generator().manual_seed(8)
    rows, frames = 2 * 6 * 10, 5
    hidden = torch.randn(rows, frames, 32, generator=generator)
    mask = torch.randn(rows, 1, frames, generator=generator)
    attn.set_processor(AttnProcessor2_0())
    plain = attn(hidden, attention_mask=mask)
    attn.set_processor(PTMAttnProcessor(PTMState(), level=0, chunk_bytes=11 * frames * 32 * 4))
    calls, handle = count_chunks(attn)
    try:
        chunked = attn(hidden, attention_mask=mask)
    finally:
        handle.remove()
    assert calls == [11] * 10 + [10]
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)


def test_the_default_chunk_keeps_sd15_slabs_small():
    processor = PTMAttnProcessor(PTMState(), level=0)
    # 64 x 64 latent with guidance: 8192 rows of 16 frames x 320 channels, 168 MiB per float32 slab.
    chunk = processor.chunk_rows(8192, 16, 320, 4)
    assert 1 < chunk < 8192 and chunk * 16 * 320 * 4 <= processor.chunk_bytes
    assert processor.chunk_rows(100, 16, 320, 4) == 100
    assert PTMAttnProcessor(PTMState(), chunk_bytes=None).chunk_rows(8192, 16, 320, 4) == 8192
    assert processor.chunk_rows(4, 4096, 4096, 4) == 1


@pytest.mark.parametrize("chunk_bytes", [0, -5, 2.5, True])
def test_processor_bad_chunk_bytes(chunk_bytes):
    with pytest.raises(ValueError, match="chunk_bytes"):
        PTMAttnProcessor(PTMState(), chunk_bytes=chunk_bytes)


def test_rows_rule_without_a_level_takes_the_largest_size_that_divides():
    state = PTMState()
    state.set(torch.full((8, 8), 2.0))
    assert state.layer_size(2 * 64) == (8, 8)
    assert state.layer_size(2 * 16) == (4, 4)
    assert state.layer_size(3 * 4) == (2, 2)
    # Four batches at level 1 have the rows of one at level 0: only the level tells them apart.
    assert state.layer_size(4 * 16) == (8, 8)
    assert state.layer_size(4 * 16, level=1) == (4, 4)


@torch.no_grad()
def test_rows_that_do_not_fit_the_level_are_an_error():
    attn = make_attention(16, 2, seed=0)
    state = PTMState()
    state.set(torch.full((6, 10), 2.0))
    attn.set_processor(PTMAttnProcessor(state, level=0))
    with pytest.raises(ValueError, match="level 0 got 50 rows"):
        attn(torch.randn(50, 4, 16))


@pytest.mark.parametrize("temperature, message", [
    (torch.ones(3), r"\[H,W\]"),
    (torch.zeros(3, 3), "> 0"),
    (torch.full((3, 3), float("nan")), "finite"),
])
def test_state_bad_map(temperature, message):
    with pytest.raises(ValueError, match=message):
        PTMState().set(temperature)


def test_processor_refuses_spatial_hidden_states():
    attn = make_attention(16, 2, seed=0)
    attn.set_processor(PTMAttnProcessor(PTMState()))
    with pytest.raises(ValueError, match="temporal attention"):
        attn(torch.randn(1, 16, 4, 4))


@torch.no_grad()
def test_tau_zero_and_no_state_are_bit_identical_to_attn_processor_2_0():
    attn = make_attention(32, 4, seed=3)
    hidden = torch.randn(2 * 6 * 10, 16, 32)
    attn.set_processor(AttnProcessor2_0())
    plain = attn(hidden)
    attn.set_processor(PTMAttnProcessor(PTMState(), level=0))
    assert torch.equal(attn(hidden), plain)
    state = PTMState()
    state.set(temperature_map(lit(2, 48, 80, [(0, 10, 10, 0)]), tau=0.0), latent_size=(6, 10))
    attn.set_processor(PTMAttnProcessor(state, level=0))
    assert torch.equal(attn(hidden), plain)


# ---------------------------------------------------------------------------------------------
# the tiny UNetMotionModel


@pytest.fixture(scope="module")
def tiny_motion():
    """A tiny SD1.5 UNetMotionModel (AnimateDiff v2 layout) and its MotionAdapter."""
    from diffusers import UNetMotionModel

    from tcan_core.tiny.sd15 import build_tiny_motion_adapter, build_tiny_sd15

    unet, _, _ = build_tiny_sd15()
    adapter = build_tiny_motion_adapter("v2")
    return UNetMotionModel.from_unet2d(unet, adapter).eval(), adapter


LATENT = (6, 10)  # non-square, odd after halving: 6x10 -> 3x5 -> 2x3 -> 1x2


@pytest.fixture(scope="module")
def unet_inputs():
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 5, *LATENT, generator=generator)
    # diffusers' UNetMotionModel takes the text embedding per frame: [N*F, 77, C].
    context = torch.randn(2, 77, 64, generator=generator).repeat_interleave(5, dim=0)
    return sample, torch.tensor(500), context


def pose_window(frames: int = 5) -> torch.Tensor:
    """A figure drifting right over the window, drawn at 8x the latent size."""
    images = torch.zeros(frames, LATENT[0] * 8, LATENT[1] * 8, 3)
    for f in range(frames):
        images[f, 10:40, 20 + 2 * f:28 + 2 * f] = torch.tensor([0.6, 0.2, 0.0])
    return images


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    sample, timestep, context = inputs
    return model(sample, timestep, encoder_hidden_states=context).sample


def processors(model) -> dict:
    return {name: module.processor for name, module in model.named_modules() if isinstance(module, Attention)}


def test_install_ptm_finds_every_temporal_attention_with_its_level(tiny_motion):
    model, adapter = tiny_motion
    levels = temporal_attention_levels(model)
    expected = {name for name, m in model.named_modules() if isinstance(m, Attention) and ".motion_modules." in name}
    assert set(levels) == expected and len(expected) == 42
    assert levels["down_blocks.2.motion_modules.1.transformer_blocks.0.attn2"] == 2
    assert levels["mid_block.motion_modules.0.transformer_blocks.0.attn1"] == 3
    assert levels["up_blocks.0.motion_modules.2.transformer_blocks.0.attn1"] == 3
    assert levels["up_blocks.3.motion_modules.0.transformer_blocks.0.attn1"] == 0
    assert temporal_attention_levels(adapter) == levels


def test_levels_match_the_sizes_the_motion_modules_see(tiny_motion, unet_inputs):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    model, _ = tiny_motion
    seen: dict[str, tuple[int, int]] = {}
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].shape[-2:]))
               for name, module in model.named_modules() if isinstance(module, AnimateDiffTransformer3D)]
    try:
        run(model, unet_inputs)
    finally:
        for handle in handles:
            handle.remove()
    levels = temporal_attention_levels(model)
    assert len(seen) == 21
    for name, size in seen.items():
        assert tuple(size) == level_size(LATENT, levels[f"{name}.transformer_blocks.0.attn1"]), name


def test_unet_tau_zero_parity_tau_three_differs_and_restore_is_exact(tiny_motion, unet_inputs):
    model, _ = tiny_motion
    before = processors(model)
    plain = run(model, unet_inputs)

    state = PTMState()
    originals = install_ptm(model, state)
    assert set(originals) == set(temporal_attention_levels(model))
    assert all(isinstance(model.get_submodule(name).processor, PTMAttnProcessor) for name in originals)
    spatial = {name for name in before if name not in originals}
    assert all(processors(model)[name] is before[name] for name in spatial)
    try:
        assert torch.equal(run(model, unet_inputs), plain)
        state.set(temperature_map(pose_window(), tau=0.0), latent_size=LATENT)
        assert torch.equal(run(model, unet_inputs), plain)
        state.set(temperature_map(pose_window(), tau=3.0), latent_size=LATENT)
        assert state.active
        with_ptm = run(model, unet_inputs)
        assert (with_ptm - plain).abs().max().item() > 1e-4
        state.clear()
        assert torch.equal(run(model, unet_inputs), plain)
    finally:
        restore_processors(model, originals)

    after = processors(model)
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert torch.equal(run(model, unet_inputs), plain)


def test_ptm_installed_restores_on_error(tiny_motion, unet_inputs):
    model, _ = tiny_motion
    before = processors(model)
    plain = run(model, unet_inputs)
    state = PTMState()
    state.set(temperature_map(pose_window(), tau=3.0), latent_size=LATENT)
    with pytest.raises(RuntimeError, match="cancelled"):
        with ptm_installed(model, state):
            assert not torch.equal(run(model, unet_inputs), plain)
            raise RuntimeError("cancelled")
    assert all(processors(model)[name] is proc for name, proc in before.items())
    assert torch.equal(run(model, unet_inputs), plain)


def test_install_on_motion_adapter_and_restore(tiny_motion):
    _, adapter = tiny_motion
    before = processors(adapter)
    originals = install_ptm(adapter, PTMState())
    assert set(originals) == set(before)
    restore_processors(adapter, originals)
    assert all(processors(adapter)[name] is proc for name, proc in before.items())


def test_install_without_motion_modules_is_an_error():
    with pytest.raises(ValueError, match="no temporal attention"):
        install_ptm(make_attention(16, 2, seed=0), PTMState())


def test_restore_unknown_attention_is_an_error(tiny_motion):
    _, adapter = tiny_motion
    with pytest.raises(ValueError, match="no attention 'down_blocks.9"):
        restore_processors(adapter, {"down_blocks.9.motion_modules.0.transformer_blocks.0.attn1": AttnProcessor2_0()})
