"""ID-Animator face adapter: checkpoint layouts, the attn2 processor, the patch's parity and cleanup."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from tcan_core.animation.model import RunState, TCANModel
from tcan_core.face import (FaceAttnProcessor, FaceIDPatch, FaceState, append_face_tokens, check_image_encoder,
                            clip_image_embeddings, cross_attention_slots, face_tokens, load_id_animator,
                            parse_id_animator_state_dict)
from tcan_core.models.errors import ModelFormatError, WrongBaseModelError
from tcan_core.tiny.face_adapter import (TINY_CLIP_WIDTH, build_tiny_clip_vision, tiny_id_animator_parts,
                                         tiny_id_animator_state_dict, write_tiny_id_animator)
from tcan_core.tiny.sd15 import build_tiny_sd15


@pytest.fixture(scope="module")
def unet():
    return build_tiny_sd15()[0]


@pytest.fixture(scope="module")
def weights(unet, tmp_path_factory):
    return load_id_animator(write_tiny_id_animator(tmp_path_factory.mktemp("face") / "animator.ckpt", unet), unet)


@pytest.fixture(scope="module")
def embeddings():
    encoder = build_tiny_clip_vision()
    gen = torch.Generator().manual_seed(3)
    return clip_image_embeddings(encoder, torch.rand(2, 224, 224, 3, generator=gen))


def _inputs(unet, batch=2):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor(500), context


def _flat(unet, **kwargs) -> dict:
    return dict(tiny_id_animator_state_dict(unet, "flat", **kwargs)["state_dict"])


def _attn2_state(unet):
    return ({name: module.processor for name, module in unet.named_modules() if name.endswith("attn2")},
            {k: v.clone() for k, v in unet.state_dict().items()})


@pytest.mark.parametrize("name,layout", [("animator.ckpt", "grouped"), ("animator_ddp.ckpt", "flat"),
                                         ("animator.safetensors", "grouped"), ("flat.safetensors", "flat")])
def test_both_layouts_map_to_attn2_in_the_authors_processor_order(unet, tmp_path, name, layout):
    path = write_tiny_id_animator(tmp_path / name, unet, layout)
    parsed = load_id_animator(path, unet)
    image_proj, adapter = tiny_id_animator_parts(unet)

    order = [k.removesuffix(".processor") for k in unet.attn_processors]
    assert dict(parsed.slots) == {p: order.index(p) for p in order if p.endswith("attn2")}
    assert sorted(parsed.slots.values()) == list(range(1, len(order), 2))
    assert parsed.layout == layout and parsed.num_tokens == 4 and parsed.embedding_dim == TINY_CLIP_WIDTH
    for path_, i in parsed.slots.items():
        assert torch.equal(parsed.layers[path_].to_k_face, adapter[f"{i}.to_k_face.weight"])
        assert torch.equal(parsed.layers[path_].to_v_face, adapter[f"{i}.to_v_face.weight"])
        lora = parsed.lora.weights[f"{path_}.to_out.0"]
        assert torch.equal(lora.up, adapter[f"{i}.to_out_lora.up.weight"]) and lora.scale == 1.0
    for key, value in parsed.resampler.state_dict().items():
        assert torch.equal(value, image_proj[key]), key


def test_processor_without_face_tokens_or_at_scale_zero_is_attn_processor_2_0(unet):
    attn = unet.get_submodule(next(iter(cross_attention_slots(unet))))
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=gen)
    text = torch.randn(2, 77, 64, generator=gen)
    face = torch.randn(1, 5, 64, generator=gen)
    k_face, v_face = torch.randn(2, attn.to_k.out_features, 64, generator=gen)
    plain = AttnProcessor2_0()(attn, hidden, text)

    assert torch.equal(FaceAttnProcessor(FaceState(0, 0.8), k_face, v_face)(attn, hidden, text), plain)
    both = append_face_tokens(text, face)
    assert both.shape == (2, 82, 64) and torch.equal(both[:, :77], text)
    assert torch.equal(FaceAttnProcessor(FaceState(5, 0.0), k_face, v_face)(attn, hidden, both), plain)
    assert not torch.equal(AttnProcessor2_0()(attn, hidden, both), plain)  # the split is what keeps parity
    with_face = FaceAttnProcessor(FaceState(5, 0.8), k_face, v_face)(attn, hidden, both)
    assert (with_face - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="followed by 5 face tokens, got a context of 5"):
        FaceAttnProcessor(FaceState(5, 0.8), k_face, v_face)(attn, hidden, face.expand(2, -1, -1))


def test_scale_zero_equals_the_unpatched_unet_and_scale_08_changes_it(unet, weights, embeddings):
    sample, t, context = _inputs(unet)
    model = TCANModel(unet, None, None, "tiny")
    with torch.no_grad():
        reference = unet(sample, t, context).sample
        with model.with_patch(FaceIDPatch(weights, embeddings, scale=0.0)).patched() as run:
            assert run.context_tokens[-1].cond.shape == (1, 4, 64)
            off = unet(sample, t, append_face_tokens(context, run.context_tokens[-1].cond)).sample
        with model.with_patch(FaceIDPatch(weights, embeddings)).patched() as run:
            on = unet(sample, t, append_face_tokens(context, run.context_tokens[-1].cond)).sample
            # Zero tokens (the default unconditional half) add exactly nothing to face attention.
            uncond = unet(sample, t, append_face_tokens(context, run.context_tokens[-1].uncond)).sample
        with model.with_patch(FaceIDPatch(weights, embeddings, lora_strength=0.0)).patched() as run:
            no_lora_uncond = unet(sample, t, append_face_tokens(context, run.context_tokens[-1].uncond)).sample
    assert torch.equal(off, reference)
    assert (on - reference).abs().max() > 1e-3
    assert (uncond - reference).abs().max() > 1e-5  # the LoRA is merged
    assert torch.equal(no_lora_uncond, reference)


def test_lora_is_merged_for_the_call_and_everything_is_restored(unet, weights, embeddings):
    processors, state = _attn2_state(unet)
    path, i = next(iter(weights.slots.items()))
    lora = weights.lora.weights[f"{path}.to_q"]
    run = RunState()
    with TCANModel(unet, None, None, "tiny").with_patch(FaceIDPatch(weights, embeddings)).patched(run):
        q = unet.get_submodule(f"{path}.to_q").weight
        assert torch.allclose(q - state[f"{path}.to_q.weight"], lora.up @ lora.down, atol=1e-6)
        assert all(isinstance(unet.get_submodule(p).processor, FaceAttnProcessor) for p in weights.slots)
        assert any("face ID: 2 face(s)" in note for note in run.notes)
    after_processors, after_state = _attn2_state(unet)
    assert all(after_processors[k] is v for k, v in processors.items())
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert run.context_tokens == []


def test_patch_is_removed_when_the_call_fails(unet, weights, embeddings):
    processors, state = _attn2_state(unet)
    run = RunState()
    with pytest.raises(RuntimeError, match="boom"):
        with TCANModel(unet, None, None, "tiny").with_patch(FaceIDPatch(weights, embeddings)).patched(run):
            raise RuntimeError("boom")
    after_processors, after_state = _attn2_state(unet)
    assert all(after_processors[k] is v for k, v in processors.items())
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert run.context_tokens == []


def test_several_faces_are_averaged_after_the_resampler(weights, embeddings):
    with torch.no_grad():
        each = [weights.resampler(embeddings[i:i + 1]) for i in range(2)]
    averaged = face_tokens(weights, embeddings)
    assert torch.allclose(averaged, (each[0] + each[1]) / 2, atol=1e-6)
    assert not torch.allclose(averaged, each[0], atol=1e-4)
    assert FaceIDPatch(weights, embeddings).num_faces == 2
    assert FaceIDPatch(weights, embeddings[0]).num_faces == 1  # [tokens, width] is one face


def test_wrong_image_encoder_width_names_the_encoder_needed(unet, weights):
    narrow = build_tiny_clip_vision(hidden_size=32)
    with pytest.raises(ValueError, match=f"width 32.*an image encoder of width {TINY_CLIP_WIDTH}"):
        check_image_encoder(narrow, weights)
    check_image_encoder(build_tiny_clip_vision(), weights)
    wrong = clip_image_embeddings(narrow, torch.rand(1, 224, 224, 3))
    with pytest.raises(ValueError, match=rf"\[n_faces,tokens,{TINY_CLIP_WIDTH}\], got \[1, 17, 32\]"):
        FaceIDPatch(weights, wrong)
    vit_h = parse_id_animator_state_dict(_flat(unet, embedding_dim=1280), unet, "vit_h.ckpt")
    with pytest.raises(ValueError, match="ViT-H/14"):
        check_image_encoder(narrow, vit_h)


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_bad_scale_is_refused(weights, embeddings, bad):
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        FaceIDPatch(weights, embeddings, scale=bad)


def test_sdxl_width_adapter_is_a_wrong_base_model(unet):
    with pytest.raises(WrongBaseModelError, match="for SDXL.*TCAN model is SD1.5"):
        parse_id_animator_state_dict(_flat(unet, context=2048), unet, "sdxl_animator.ckpt")


def test_missing_and_unexpected_keys_are_named(unet):
    sd = _flat(unet)
    del sd["module.adapter_modules.31.to_v_face.weight"]
    sd["module.adapter_modules.0.to_k_face.weight"] = torch.zeros(32, 64)
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): 31\.to_v_face\.weight.*unexpected key\(s\): "
                                               r"0\.to_k_face\.weight"):
        parse_id_animator_state_dict(sd, unet, "broken.ckpt")

    sd = _flat(unet)
    del sd["module.image_proj_model.norm_out.bias"]
    with pytest.raises(ModelFormatError, match="missing key.*norm_out.bias"):
        parse_id_animator_state_dict(sd, unet, "broken.ckpt")

    sd = _flat(unet)
    sd["text_encoder.weight"] = torch.zeros(1)
    with pytest.raises(ModelFormatError, match="unexpected key.*text_encoder.weight"):
        parse_id_animator_state_dict(sd, unet, "broken.ckpt")

    sd = _flat(unet)
    sd["module.adapter_modules.1.to_k_face.weight"] = torch.zeros(33, 64)
    with pytest.raises(ModelFormatError, match=r"1\.to_k_face\.weight \(file \[33, 64\], UNet needs \[32, 64\]\)"):
        parse_id_animator_state_dict(sd, unet, "broken.ckpt")


def test_a_file_with_neither_layout_is_refused(unet):
    with pytest.raises(ModelFormatError, match="neither key layout of ID-Animator"):
        parse_id_animator_state_dict({"down.weight": torch.zeros(2, 2)}, unet, "lora.safetensors")
    grouped = tiny_id_animator_state_dict(unet, "grouped")
    mixed = {f"image_proj.{k}": v for k, v in grouped["image_proj"].items()}
    mixed.update({f"adapter_modules.{k}": v for k, v in grouped["face_adapter"].items()})
    with pytest.raises(ModelFormatError, match="mixes both key layouts"):
        parse_id_animator_state_dict(mixed, unet, "mixed.ckpt")
