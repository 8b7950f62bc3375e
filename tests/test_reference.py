"""Reference attention (TCAN) with calibrated extra keys/values (TPC): the processor against written-out
attention formulas, and its installation on a tiny SD1.5 UNet (parity, row selection, shared weights)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tcan_core.animation.ptm import level_size
from tcan_core.animation.reference import (
    ReferenceAttnProcessor,
    ReferenceBank,
    reference_attention,
    reference_layers,
    resize_masks,
)

LATENT = (6, 10)  # non-square, odd after halving: 6x10 -> 3x5 -> 2x3 -> 1x2
HEADS, HEAD_DIM = 4, 8
CHANNELS = HEADS * HEAD_DIM


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# one attention module against the written-out formula


def make_attention(seed: int = 0) -> Attention:
    """A self-attention as SD1.5's BasicTransformerBlock builds attn1."""
    torch.manual_seed(seed)
    return Attention(query_dim=CHANNELS, heads=HEADS, dim_head=HEAD_DIM, bias=False).eval()


def written_out(attn: Attention, frame: torch.Tensor, extra: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for one row, keys [frame; extra]; frame [N,C], mask bool [N,K] -> [N,C]."""
    tokens = frame if extra is None else torch.cat([frame, extra])
    q, k, v = attn.to_q(frame), attn.to_k(tokens), attn.to_v(tokens)
    q, k, v = (t.view(t.shape[0], HEADS, HEAD_DIM).transpose(0, 1) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(frame.shape[0], CHANNELS)
    return attn.to_out[1](attn.to_out[0](out))


def dense_mask(frame_and_ref: int, query_in: torch.Tensor, key_in: torch.Tensor) -> torch.Tensor:
    """The full [N, K] mask TPC describes: frame and reference keys always, calibrated keys at query_in x key_in."""
    visible = torch.ones(query_in.shape[0], frame_and_ref, dtype=torch.bool)
    return torch.cat([visible, query_in[:, None] & key_in[None, :]], dim=1)


def store(bank: ReferenceBank, processor: ReferenceAttnProcessor, attn: Attention, tokens: torch.Tensor,
          group: str = "reference") -> None:
    with bank.writing(group):
        processor(attn, tokens)


@torch.no_grad()
def test_off_mode_and_rows_without_reference_are_bit_identical_to_attn_processor_2_0():
    attn = make_attention()
    x = torch.randn(3, 15, CHANNELS)
    plain = AttnProcessor2_0()(attn, x)
    bank = ReferenceBank()
    processor = ReferenceAttnProcessor(bank, "layer", 0)
    assert torch.equal(processor(attn, x), plain)
    store(bank, processor, attn, torch.randn(1, 15, CHANNELS))
    bank.set_read((3, 5), torch.tensor([False, True, False]))
    out = processor(attn, x)
    assert torch.equal(out[[0, 2]], plain[[0, 2]])
    assert (out[1] - plain[1]).abs().max() > 1e-3
    bank.set_read((3, 5), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(processor(attn, x), plain)
    bank.clear()
    assert bank.mode == "off"
    assert torch.equal(processor(attn, x), plain)


@pytest.mark.parametrize("stored_batch", [1, 3])
@torch.no_grad()
def test_reader_equals_attention_over_frame_and_reference_tokens(stored_batch):
    attn = make_attention(1)
    x = torch.randn(3, 12, CHANNELS)
    reference = torch.randn(stored_batch, 7, CHANNELS)  # the reference may have its own token count
    bank = ReferenceBank()
    processor = ReferenceAttnProcessor(bank, "layer")
    store(bank, processor, attn, reference)
    bank.set_read((3, 4), torch.tensor([True, False, True]))
    out = processor(attn, x)
    for row in (0, 2):
        expected = written_out(attn, x[row], reference[0 if stored_batch == 1 else row])
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], written_out(attn, x[1]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_writer_stores_its_input_and_returns_plain_attention():
    attn = make_attention(2)
    x = torch.randn(2, 6, CHANNELS)
    bank = ReferenceBank()
    processor = ReferenceAttnProcessor(bank, "layer")
    with bank.writing("calibrated"):
        assert bank.mode == "write" and bank.write_group == "calibrated"
        out = processor(attn, x)
    assert torch.equal(out, AttnProcessor2_0()(attn, x))
    assert torch.equal(bank.stored("layer", "calibrated"), x)
    assert bank.stored("layer") is None and bank.layers == ()


def test_writing_clears_its_group_and_restores_the_mode_also_on_error():
    bank = ReferenceBank()
    with bank.writing():
        bank.store("a", torch.zeros(1, 2, 3))
    with bank.writing("calibrated"):
        bank.store("a", torch.zeros(2, 2, 3))
    assert bank.layers == ("a",) and bank.mode == "off"
    bank.set_read(LATENT, torch.tensor([True]))
    with pytest.raises(RuntimeError, match="boom"):
        with bank.writing():
            assert bank.layers == ()  # cleared on entry
            raise RuntimeError("boom")
    assert bank.mode == "read"
    assert bank.stored("a", "calibrated") is not None
    bank.clear("calibrated")
    assert bank.stored("a", "calibrated") is None and bank.mode == "off"


def layer_masks(masks: torch.Tensor) -> torch.Tensor:
    """The rule the module documents, written out for masks at exactly 2x the layer: 2x2 mean >= 0.5."""
    return (F.avg_pool2d(masks[:, None], 2)[:, 0] >= 0.5).flatten(1)


def calibrated_setup(seed: int = 3):
    """Attention at a 3 x 4 layer, 4 rows (row 0 without reference, rows 1-3 with), 2 calibrated images."""
    generator = torch.Generator().manual_seed(seed)
    attn = make_attention(seed)
    x = torch.randn(4, 12, CHANNELS, generator=generator)
    reference = torch.randn(1, 12, CHANNELS, generator=generator)
    calibrated = torch.randn(2, 12, CHANNELS, generator=generator)
    bank = ReferenceBank()
    processor = ReferenceAttnProcessor(bank, "layer", 0)
    store(bank, processor, attn, reference)
    store(bank, processor, attn, calibrated, "calibrated")
    use = torch.tensor([False, True, True, True])
    index = torch.tensor([-1, 0, 1, 0])  # rows 1 and 3 share calibrated image 0 (TPC sparsity)
    return attn, x, reference[0], calibrated, bank, processor, use, index


@torch.no_grad()
def test_calibration_with_partial_masks_equals_the_dense_masked_formula():
    attn, x, reference, calibrated, bank, processor, use, index = calibrated_setup()
    generator = torch.Generator().manual_seed(9)
    # Masks at 2x the layer with soft values, so the area + threshold rule matters.
    query_masks = (torch.rand(4, 6, 8, generator=generator) > 0.4).float() * 0.9
    key_masks = (torch.rand(2, 6, 8, generator=generator) > 0.5).float()
    query_masks[3] = 0  # row 3 uses calibration but has no person: reference only
    bank.set_read((3, 4), use, index, query_masks, key_masks)
    out = processor(attn, x)
    query_in, key_in = layer_masks(query_masks), layer_masks(key_masks)
    assert torch.equal(resize_masks(query_masks, 3, 4), query_in)
    assert 0 < int(query_in[1].sum()) < 12 and 0 < int(query_in[2].sum()) < 12
    assert 0 < int(key_in.sum(dim=1).min()) and int(key_in.sum(dim=1).max()) < 12
    torch.testing.assert_close(out[0], written_out(attn, x[0]), rtol=1e-5, atol=1e-5)
    for row in (1, 2, 3):
        image = int(index[row])
        mask = dense_mask(24, query_in[row], key_in[image])
        expected = written_out(attn, x[row], torch.cat([reference, calibrated[image]]), mask)
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_full_masks_and_no_masks_attend_over_frame_reference_and_calibrated_unmasked():
    attn, x, reference, calibrated, bank, processor, use, index = calibrated_setup(4)
    bank.set_read((3, 4), use, index, torch.ones(4, 3, 4), torch.ones(2, 24, 32))
    full = processor(attn, x)
    bank.set_read((3, 4), use, index)
    unmasked = processor(attn, x)
    for row in (1, 2, 3):
        expected = written_out(attn, x[row], torch.cat([reference, calibrated[int(index[row])]]))
        torch.testing.assert_close(full[row], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unmasked[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("empty", ["query", "key"])
@torch.no_grad()
def test_empty_query_or_key_masks_equal_no_calibration(empty):
    attn, x, _, _, bank, processor, use, index = calibrated_setup(5)
    bank.set_read((3, 4), use)
    without = processor(attn, x)
    query_masks = torch.zeros(4, 3, 4) if empty == "query" else torch.ones(4, 3, 4)
    key_masks = torch.zeros(2, 3, 4) if empty == "key" else torch.ones(2, 3, 4)
    bank.set_read((3, 4), use, index, query_masks, key_masks)
    out = processor(attn, x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, without)


@torch.no_grad()
def test_an_empty_key_mask_of_one_image_leaves_only_its_rows_uncalibrated():
    attn, x, _, _, bank, processor, use, index = calibrated_setup(6)
    bank.set_read((3, 4), use)
    without = processor(attn, x)
    key_masks = torch.ones(2, 3, 4)
    key_masks[0] = 0  # image 0 (rows 1 and 3) has no person after warping
    bank.set_read((3, 4), use, index, torch.ones(4, 3, 4), key_masks)
    out = processor(attn, x)
    assert torch.equal(out[[0, 1, 3]], without[[0, 1, 3]])
    assert (out[2] - without[2]).abs().max() > 1e-3


def test_mask_resizing_is_area_then_half_threshold():
    masks = torch.zeros(1, 4, 4)
    masks[0, :2, :1] = 1  # half of cell (0, 0) at 2 x 2
    masks[0, 2:, 2:] = 0.4  # below the threshold however large the region
    assert resize_masks(masks, 2, 2).tolist() == [[True, False, False, False]]
    assert resize_masks(torch.ones(1, 2, 3), 5, 7).all()  # upsampling keeps a full mask full


# ---------------------------------------------------------------------------------------------
# errors


def test_set_read_rejects_bad_inputs():
    bank = ReferenceBank()
    use = torch.tensor([False, True, True])
    with pytest.raises(ValueError, match=r"use_reference must be a bool.*float32"):
        bank.set_read(LATENT, torch.ones(3))
    with pytest.raises(ValueError, match=r"use_reference must be a bool.*\(3, 1\)"):
        bank.set_read(LATENT, torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"latent_size .* got \(6, 0\)"):
        bank.set_read((6, 0), use)
    with pytest.raises(ValueError, match=r"calibrated_index must be an integer tensor \[3\].*\(2,\)"):
        bank.set_read(LATENT, use, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"-1 \(no calibration\).*\[-1, -2, 0\]"):
        bank.set_read(LATENT, use, torch.tensor([-1, -2, 0]))
    with pytest.raises(ValueError, match=r"rows \[0\] have a calibrated image but do not use the reference"):
        bank.set_read(LATENT, use, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"\[-1, 0, 2\] points past the 2 calibrated images"):
        bank.set_read(LATENT, use, torch.tensor([-1, 0, 2]), key_masks=torch.ones(2, 6, 10))
    with pytest.raises(ValueError, match=r"query_masks must be a float tensor \[3,H,W\].*\(2, 6, 10\)"):
        bank.set_read(LATENT, use, torch.tensor([-1, 0, 0]), query_masks=torch.ones(2, 6, 10))
    with pytest.raises(ValueError, match=r"key_masks must be a float tensor \[Nc,H,W\].*\(6, 10\)"):
        bank.set_read(LATENT, use, torch.tensor([-1, 0, 0]), key_masks=torch.ones(6, 10))
    with pytest.raises(ValueError, match=r"values in 0\.\.1, got values from 0\.0 to 255\.0"):
        bank.set_read(LATENT, use, torch.tensor([-1, 0, 0]), query_masks=torch.full((3, 6, 10), 255.0).tril())
    with pytest.raises(ValueError, match="need calibrated_index"):
        bank.set_read(LATENT, use, key_masks=torch.ones(1, 6, 10))
    with pytest.raises(ValueError, match=r"group must be one of .* got 'ref'"):
        with bank.writing("ref"):
            pass
    with pytest.raises(ValueError, match=r"got 'all'"):
        bank.clear("all")
    assert bank.mode == "off"


def test_calibrated_index_is_checked_against_the_stored_images():
    attn, x, _, _, bank, processor, use, _ = calibrated_setup()
    with pytest.raises(ValueError, match=r"\[-1, 2, 0, 0\] points past the 2 calibrated images"):
        bank.set_read((3, 4), use, torch.tensor([-1, 2, 0, 0]))
    bank.clear("calibrated")
    bank.set_read((3, 4), use, torch.tensor([-1, 2, 0, 0]))  # nothing stored yet: checked when read
    store(bank, processor, attn, torch.randn(2, 12, CHANNELS), "calibrated")
    with pytest.raises(ValueError, match=r"points past the 2 calibrated images stored for layer 'layer'"):
        processor(attn, x)
    bank.set_read((3, 4), use, torch.tensor([-1, 0, 0, 0]), key_masks=torch.ones(3, 3, 4))
    with pytest.raises(ValueError, match=r"key_masks has 3 masks but 2 calibrated images are stored"):
        processor(attn, x)


@torch.no_grad()
def test_processor_read_errors():
    attn = make_attention()
    x = torch.randn(3, 12, CHANNELS)
    bank = ReferenceBank()
    processor = ReferenceAttnProcessor(bank, "layer", 0)
    bank.set_read((3, 4), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"'layer' has no stored reference tokens.*writing"):
        processor(attn, x)
    store(bank, processor, attn, torch.randn(2, 12, CHANNELS))
    with pytest.raises(ValueError, match=r"batch of 2 but the denoising batch has 3 rows"):
        processor(attn, x)
    store(bank, processor, attn, torch.randn(1, 12, CHANNELS))
    with pytest.raises(ValueError, match=r"use_reference has 3 entries but layer 'layer' got a batch of 4 rows"):
        processor(attn, torch.randn(4, 12, CHANNELS))
    with pytest.raises(ValueError, match=r"got an attention mask"):
        processor(attn, x, attention_mask=torch.zeros(3, 1, 12))
    bank.set_read((3, 4), torch.tensor([True, False, True]), torch.tensor([0, -1, 0]))
    with pytest.raises(ValueError, match=r"no stored calibrated tokens.*writing\(\"calibrated\"\)"):
        processor(attn, x)
    store(bank, processor, attn, torch.randn(1, 12, CHANNELS), "calibrated")
    bank.set_read((5, 4), torch.tensor([True, False, True]), torch.tensor([0, -1, 0]), torch.ones(3, 5, 4))
    with pytest.raises(ValueError, match=r"level 0 got 12 tokens, not the 5 x 4 of a 5 x 4 latent"):
        processor(attn, x)
    store(bank, processor, attn, torch.randn(1, 20, CHANNELS), "calibrated")
    bank.set_read((3, 4), torch.tensor([True, False, True]), torch.tensor([0, -1, 0]), key_masks=torch.ones(1, 3, 4))
    with pytest.raises(ValueError, match=r"stored 20 calibrated tokens per image but its 3 x 4 masks have 12"):
        processor(attn, x)


def test_store_outside_writing_and_bad_processor_arguments_are_errors():
    bank = ReferenceBank()
    with pytest.raises(ValueError, match=r"outside ReferenceBank\.writing"):
        bank.store("layer", torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"bank must be a ReferenceBank, got dict"):
        ReferenceAttnProcessor({}, "layer")
    with pytest.raises(ValueError, match=r"level must be .* got -1"):
        ReferenceAttnProcessor(bank, "layer", -1)
    with pytest.raises(ValueError, match=r"Linear is not a diffusers SD1.5 UNet"):
        reference_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one UNet"):
        with reference_attention(bank):
            pass


# ---------------------------------------------------------------------------------------------
# installed on a tiny SD1.5 UNet


@pytest.fixture(scope="module")
def unet():
    from tcan_core.tiny.sd15 import build_tiny_sd15

    return build_tiny_sd15()[0]


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(7)
    frames = torch.randn(2, 4, *LATENT, generator=generator)
    negative, positive = torch.randn(2, 1, 77, 64, generator=generator)
    sample = torch.cat([frames, frames])  # [uncond frames ; cond frames]
    context = torch.cat([negative.expand(2, -1, -1), positive.expand(2, -1, -1)])
    reference = torch.randn(1, 4, *LATENT, generator=generator)
    return sample, torch.tensor(500), context, reference, positive


@torch.no_grad()
def run(model, sample, timestep, context) -> torch.Tensor:
    return model(sample, timestep, encoder_hidden_states=context).sample


def attn_processors(model) -> dict:
    return {name: module.processor for name, module in model.named_modules() if isinstance(module, Attention)}


def test_reference_layers_are_the_mid_and_up_self_attentions_with_their_levels(unet):
    layers = reference_layers(unet)
    expected = {name for name in attn_processors(unet)
                if name.endswith("attn1") and name.split(".")[0] in ("mid_block", "up_blocks")}
    assert set(layers) == expected and len(layers) == 10
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn1"] == 3
    assert {layers[f"up_blocks.{i}.attentions.0.transformer_blocks.0.attn1"] for i in (1, 2, 3)} == {2, 1, 0}


def test_reference_layers_skip_motion_modules(unet):
    from diffusers import UNetMotionModel

    from tcan_core.tiny.sd15 import build_tiny_motion_adapter

    motion = UNetMotionModel.from_unet2d(unet, build_tiny_motion_adapter("v2"))
    assert reference_layers(motion) == reference_layers(unet)


@torch.no_grad()
def test_installed_off_is_exact_and_the_original_processors_come_back(unet, inputs):
    sample, timestep, context, reference, positive = inputs
    plain = run(unet, sample, timestep, context)
    before = attn_processors(unet)
    bank = ReferenceBank()
    with reference_attention(bank, unet, unet) as same:
        assert same is bank
        installed = [unet.get_submodule(name).processor for name in reference_layers(unet)]
        assert all(isinstance(p, ReferenceAttnProcessor) for p in installed)
        assert len({id(p) for p in installed}) == len(installed)
        assert torch.equal(run(unet, sample, timestep, context), plain)
        with bank.writing():
            run(unet, reference, timestep, context[-1:])
        bank.clear()
        assert torch.equal(run(unet, sample, timestep, context), plain)
    after = attn_processors(unet)
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    with pytest.raises(RuntimeError, match="inside"):
        with reference_attention(bank, unet):
            raise RuntimeError("inside")
    after = attn_processors(unet)
    assert all(after[name] is before[name] for name in before)


@pytest.mark.parametrize("flags", [(False, False, True, True), (True, False, True, False)])
@torch.no_grad()
def test_the_reference_changes_exactly_the_rows_that_use_it(unet, inputs, flags):
    sample, timestep, context, reference, positive = inputs
    plain = run(unet, sample, timestep, context)
    bank = ReferenceBank()
    use = torch.tensor(flags)
    with reference_attention(bank, unet):
        with bank.writing():
            run(unet, reference, timestep, positive)
        assert set(bank.layers) == set(reference_layers(unet))
        for name, level in reference_layers(unet).items():
            height, width = level_size(LATENT, level)
            assert bank.stored(name).shape == (1, height * width, unet.get_submodule(name).query_dim)
        bank.set_read(LATENT, use)
        out = run(unet, sample, timestep, context)
    assert torch.equal(out[~use], plain[~use])
    assert all((out[row] - plain[row]).abs().max() > 1e-4 for row in use.nonzero().flatten().tolist())


@torch.no_grad()
def test_training_free_shared_unet_equals_a_separate_copy_and_other_weights_differ(unet, inputs):
    sample, timestep, context, reference, positive = inputs
    use = torch.tensor([False, False, True, True])
    other = copy.deepcopy(unet)
    torch.manual_seed(1)
    for parameter in other.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.02)
    outputs = []
    for appearance in (unet, copy.deepcopy(unet), other):
        bank = ReferenceBank()
        with reference_attention(bank, unet, appearance):
            with bank.writing():
                run(appearance, reference, timestep, positive)
            bank.set_read(LATENT, use)
            outputs.append(run(unet, sample, timestep, context))
    shared, separate, other = outputs
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-6)
    assert (shared[2:] - other[2:]).abs().max() > 1e-4
    assert torch.equal(shared[:2], other[:2])


@torch.no_grad()
def test_calibration_in_the_unet_with_pixel_masks(unet, inputs):
    sample, timestep, context, reference, positive = inputs
    generator = torch.Generator().manual_seed(11)
    calibrated = torch.randn(2, 4, *LATENT, generator=generator)
    use = torch.tensor([False, False, True, True])
    index = torch.tensor([-1, -1, 0, 1])
    pixels = (LATENT[0] * 8, LATENT[1] * 8)
    query_masks = torch.zeros(4, *pixels)
    query_masks[:, 8:40, 16:56] = 1
    key_masks = torch.zeros(2, *pixels)
    key_masks[:, 4:44, 24:72] = 1
    bank = ReferenceBank()
    with reference_attention(bank, unet):
        with bank.writing():
            run(unet, reference, timestep, positive)
        with bank.writing("calibrated"):
            run(unet, calibrated, timestep, positive.expand(2, -1, -1))
        bank.set_read(LATENT, use)
        without = run(unet, sample, timestep, context)
        bank.set_read(LATENT, use, index, query_masks, key_masks)
        masked = run(unet, sample, timestep, context)
        bank.set_read(LATENT, use, index, torch.zeros(4, *pixels), key_masks)
        empty = run(unet, sample, timestep, context)
    assert torch.isfinite(masked).all()
    assert torch.equal(masked[:2], without[:2])
    assert (masked[2:] - without[2:]).abs().max() > 1e-4
    assert torch.equal(empty, without)
