"""IP-Adapter FaceID SD1.5: checkpoint layouts and slots, the one face-adapter loader, the generalised patch
(parity at scale 0, cleanup, face weights), embeddings from a TCAN_FACE and the build step."""

from __future__ import annotations

import pytest
import torch

from tcan_core.animation import build
from tcan_core.face import build as face_build
from tcan_core.animation.model import RunState, TCANModel
from tcan_core.face import (ID_ANIMATOR, IP_ADAPTER_FACEID, FaceAttnProcessor, FaceIDPatch, IPFaceIDWeights,
                            append_face_tokens, check_image_encoder, face_embeddings, face_tokens, load_face_adapter,
                            load_ip_faceid, parse_face_adapter_state_dict, parse_id_animator_state_dict,
                            parse_ip_faceid_state_dict)
from tcan_core.face.identity import FaceIdentity
from tcan_core.models.errors import ModelFormatError, WrongBaseModelError
from tcan_core.tiny.face_adapter import (TINY_CLIP_WIDTH, build_tiny_clip_vision, tiny_id_animator_state_dict,
                                         tiny_ip_faceid_state_dict, write_tiny_clip_vision, write_tiny_id_animator,
                                         write_tiny_ip_faceid)
from tcan_core.tiny.sd15 import build_tiny_sd15

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    return build_tiny_sd15()[0]


@pytest.fixture(scope="module")
def weights(unet, tmp_path_factory):
    return load_face_adapter(write_tiny_ip_faceid(tmp_path_factory.mktemp("faceid") / "faceid.bin", unet), unet)


def make_face(n: int = 2, dim: int = 512, seed: int = 0) -> FaceIdentity:
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(dim, generator=gen)
    return FaceIdentity(crops=torch.rand(n, 224, 224, 3, generator=gen), weights=torch.full((n,), 1.0 / n),
                        embedding=embedding / embedding.norm(), kps=torch.zeros(5, 2),
                        bbox=torch.tensor([0.0, 0.0, 10.0, 10.0]), image_size=(64, 64), source="test face")


def identities(n: int, seed: int = 5) -> torch.Tensor:
    e = torch.randn(n, 512, generator=torch.Generator().manual_seed(seed))
    return e / e.norm(dim=-1, keepdim=True)


def _flat(unet, **kwargs) -> dict:
    return {f"{group}.{k}": v for group, sd in tiny_ip_faceid_state_dict(unet, **kwargs).items() for k, v in sd.items()}


def _inputs(unet, batch=2):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor(500), context


def _unet_state(unet):
    return ({name: module.processor for name, module in unet.named_modules() if name.endswith(("attn1", "attn2"))},
            {k: v.clone() for k, v in unet.state_dict().items()})


def _denoise(unet, model, sample, t, context, uncond=False):
    with torch.no_grad(), model.patched() as run:
        face = run.context_tokens[-1].uncond if uncond else run.context_tokens[-1].cond
        return unet(sample, t, append_face_tokens(context, face)).sample, run.context_tokens[-1].cond


# --- checkpoint -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,nested", [("faceid.bin", True), ("faceid_flat.bin", False),
                                         ("faceid.safetensors", False)])
def test_faceid_maps_to_every_attention_in_the_authors_processor_order(unet, tmp_path, name, nested):
    path = tmp_path / name
    if nested or path.suffix == ".safetensors":
        write_tiny_ip_faceid(path, unet)
    else:
        torch.save(_flat(unet), path)
    parsed = load_face_adapter(path, unet)
    sd = tiny_ip_faceid_state_dict(unet)
    adapter = sd["ip_adapter"]

    assert isinstance(parsed, IPFaceIDWeights) and parsed.kind == IP_ADAPTER_FACEID
    order = [k.removesuffix(".processor") for k in unet.attn_processors]
    assert dict(parsed.slots) == {p: i for i, p in enumerate(order)} and len(order) == 32
    assert sorted(parsed.layers) == sorted(p for p in order if p.endswith("attn2"))
    assert parsed.num_tokens == 4 and parsed.embedding_dim == 512 and parsed.has_lora
    for path_, i in parsed.slots.items():
        if path_.endswith("attn2"):
            assert torch.equal(parsed.layers[path_].to_k_face, adapter[f"{i}.to_k_ip.weight"])
            assert torch.equal(parsed.layers[path_].to_v_face, adapter[f"{i}.to_v_ip.weight"])
        for proj, target in (("to_q", "to_q"), ("to_k", "to_k"), ("to_out", "to_out.0")):
            lora = parsed.lora.weights[f"{path_}.{target}"]
            assert torch.equal(lora.down, adapter[f"{i}.{proj}_lora.down.weight"]) and lora.scale == 1.0
    assert len(parsed.lora.weights) == 4 * 32
    for key, value in parsed.mlp.state_dict().items():
        assert torch.equal(value, sd["image_proj"][key]), key
    assert "IP-Adapter FaceID" in parsed.describe() and "rank 4" in parsed.describe()


def test_faceid_without_lora_keys_loads_with_an_empty_lora(unet, tmp_path):
    parsed = load_ip_faceid(write_tiny_ip_faceid(tmp_path / "faceid_nolora.safetensors", unet, lora=False), unet)
    assert not parsed.has_lora and len(parsed.layers) == 16
    assert "no LoRA in the file" in parsed.describe()


def test_partial_lora_names_the_missing_keys(unet):
    sd = _flat(unet)
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        del sd[f"ip_adapter.0.{proj}_lora.down.weight"], sd[f"ip_adapter.0.{proj}_lora.up.weight"]
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): 0\.to_k_lora\.down\.weight.*either no LoRA"):
        parse_ip_faceid_state_dict(sd, unet, "partial.bin")


def test_unexpected_and_wrong_shape_keys_are_named(unet):
    sd = _flat(unet)
    sd["ip_adapter.0.to_k_ip.weight"] = torch.zeros(32, 64)
    with pytest.raises(ModelFormatError, match=r"unexpected key\(s\): 0\.to_k_ip\.weight"):
        parse_ip_faceid_state_dict(sd, unet, "broken.bin")
    sd = _flat(unet)
    sd["ip_adapter.1.to_v_ip.weight"] = torch.zeros(33, 64)
    with pytest.raises(ModelFormatError, match=r"1\.to_v_ip\.weight \(file \[33, 64\], UNet needs \[32, 64\]\)"):
        parse_ip_faceid_state_dict(sd, unet, "broken.bin")
    sd = _flat(unet)
    del sd["image_proj.norm.bias"]
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): norm\.bias"):
        parse_ip_faceid_state_dict(sd, unet, "broken.bin")
    sd = _flat(unet)
    sd["text_encoder.weight"] = torch.zeros(1)
    with pytest.raises(ModelFormatError, match="unexpected key.*text_encoder.weight"):
        parse_ip_faceid_state_dict(sd, unet, "broken.bin")


@pytest.mark.parametrize("lora", [True, False])
def test_sdxl_faceid_is_a_wrong_base_model(unet, lora):
    with pytest.raises(WrongBaseModelError, match="for SDXL.*TCAN model is SD1.5.*ip-adapter-faceid_sd15.bin"):
        parse_ip_faceid_state_dict(_flat(unet, context=2048, lora=lora), unet, "ip-adapter-faceid_sdxl.bin")


@pytest.mark.parametrize("image_proj,named", [
    ({"proj.0.weight": (1024, 512), "proj.0.bias": (1024,), "proj.2.weight": (3072, 1024), "proj.2.bias": (3072,),
      "norm.weight": (768,), "norm.bias": (768,), "perceiver_resampler.proj_in.weight": (768, 1280)}, "FaceID-Plus"),
    ({"latents": (1, 16, 768), "proj_in.weight": (768, 1280), "proj_out.weight": (768, 768)}, "IP-Adapter Plus"),
    ({"proj.weight": (3072, 1024), "proj.bias": (3072,), "norm.weight": (768,), "norm.bias": (768,)},
     r"IP-Adapter \(image_proj.proj.weight"),
    ({"proj.0.weight": (1280, 1280), "proj.0.bias": (1280,), "proj.2.weight": (768, 1280), "proj.2.bias": (768,),
      "norm.weight": (768,), "norm.bias": (768,)}, "full-face"),
])
def test_other_ip_adapters_are_refused_by_name(unet, image_proj, named):
    sd = {f"image_proj.{k}": torch.zeros(shape) for k, shape in image_proj.items()}
    sd["ip_adapter.1.to_k_ip.weight"] = torch.zeros(32, 768)
    with pytest.raises(ModelFormatError, match=f"{named}.*takes only ID-Animator.*IP-Adapter FaceID for SD1.5"):
        parse_face_adapter_state_dict(sd, unet, "adapter.bin")


def test_one_loader_tells_the_formats_apart_and_refuses_a_lora(unet, tmp_path):
    from tcan_core.tiny.lora import write_tiny_loras

    animator = load_face_adapter(write_tiny_id_animator(tmp_path / "animator.ckpt", unet, "flat"), unet)
    faceid = load_face_adapter(write_tiny_ip_faceid(tmp_path / "faceid.safetensors", unet), unet)
    assert (animator.kind, faceid.kind) == (ID_ANIMATOR, IP_ADAPTER_FACEID)
    assert animator.uses_image_encoder and not faceid.uses_image_encoder

    lora = write_tiny_loras(tmp_path / "loras", unet, layouts=("kohya",)).files["kohya"]
    with pytest.raises(ModelFormatError, match=r"not a face adapter.*animator\.ckpt.*ip-adapter-faceid_sd15\.bin.*"
                                               r"It is a LoRA \(kohya keys\).*TCAN APPA LoRA"):
        load_face_adapter(lora, unet)
    with pytest.raises(ModelFormatError, match="not a face adapter"):
        parse_face_adapter_state_dict({"weight": torch.zeros(2)}, unet, "random.bin")
    mixed = {**_flat(unet), **{f"face_adapter.{k}": v for k, v in tiny_id_animator_state_dict(unet)["face_adapter"]
                                .items()}}
    with pytest.raises(ModelFormatError, match="mixes ID-Animator"):
        parse_face_adapter_state_dict(mixed, unet, "mixed.bin")


# --- patch ------------------------------------------------------------------------------------


def test_scale_zero_is_the_unpatched_unet_and_scale_08_changes_it(unet, weights):
    sample, t, context = _inputs(unet)
    model = TCANModel(unet, None, None, "tiny")
    embedding = identities(1)
    with torch.no_grad():
        reference = unet(sample, t, context).sample
    off, _ = _denoise(unet, model.with_patch(FaceIDPatch(weights, embedding[0], scale=0.0)), sample, t, context)
    on, _ = _denoise(unet, model.with_patch(FaceIDPatch(weights, embedding, scale=0.8)), sample, t, context)
    no_lora, _ = _denoise(unet, model.with_patch(FaceIDPatch(weights, embedding, lora_strength=0.0)), sample, t,
                          context)
    assert torch.equal(off, reference)
    assert (on - reference).abs().max() > 1e-3
    assert (no_lora - reference).abs().max() > 1e-4 and (no_lora - on).abs().max() > 1e-4


def test_faceid_unconditional_tokens_are_the_projection_of_a_zero_embedding(unet, weights):
    run = RunState()
    with TCANModel(unet, None, None, "tiny").with_patch(FaceIDPatch(weights, identities(1))).patched(run):
        uncond = run.context_tokens[-1].uncond
    with torch.no_grad():
        expected = weights.mlp(torch.zeros(1, 512))
    assert torch.equal(uncond, expected) and uncond.abs().max() > 0


def test_lora_on_attn1_and_attn2_is_merged_for_the_call_and_everything_is_restored(unet, weights):
    processors, state = _unet_state(unet)
    run = RunState()
    with TCANModel(unet, None, None, "tiny").with_patch(FaceIDPatch(weights, identities(2))).patched(run):
        for attn in ("attn1", "attn2"):
            path = f"down_blocks.0.attentions.0.transformer_blocks.0.{attn}"
            lora = weights.lora.weights[f"{path}.to_v"]
            delta = unet.get_submodule(f"{path}.to_v").weight - state[f"{path}.to_v.weight"]
            assert torch.allclose(delta, lora.up @ lora.down, atol=1e-6)
        assert all(isinstance(unet.get_submodule(p).processor, FaceAttnProcessor) for p in weights.layers)
        assert not isinstance(unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1").processor,
                              FaceAttnProcessor)
        assert any("face ID: 2 face(s)" in note and IP_ADAPTER_FACEID in note for note in run.notes)
    after_processors, after_state = _unet_state(unet)
    assert all(after_processors[k] is v for k, v in processors.items())
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert run.context_tokens == []


def test_face_weights_mix_the_projected_tokens(unet, weights):
    two = identities(2)
    sample, t, context = _inputs(unet)
    model = TCANModel(unet, None, None, "tiny")
    first, first_tokens = _denoise(unet, model.with_patch(FaceIDPatch(weights, two[:1])), sample, t, context)
    only_first, only_tokens = _denoise(unet, model.with_patch(FaceIDPatch(weights, two, face_weights=torch.tensor(
        [1.0, 0.0]))), sample, t, context)
    assert torch.equal(only_tokens, first_tokens) and torch.equal(only_first, first)

    mean = face_tokens(weights, two)
    assert torch.equal(face_tokens(weights, two, face_weights=torch.tensor([0.5, 0.5])), mean)
    assert torch.equal(face_tokens(weights, two, face_weights=torch.tensor([3.0, 3.0])), mean)
    with torch.no_grad():
        each = weights.mlp(two)
    assert torch.allclose(mean, each.mean(dim=0, keepdim=True), atol=1e-6)
    mixed = face_tokens(weights, two, face_weights=torch.tensor([0.75, 0.25]))
    assert torch.allclose(mixed, 0.75 * each[:1] + 0.25 * each[1:], atol=1e-5)


@pytest.mark.parametrize("bad,match", [(torch.tensor([1.0]), r"one weight per face \[2\]"),
                                       (torch.tensor([1.0, -1.0]), "finite numbers >= 0"),
                                       (torch.tensor([0.0, 0.0]), "do not all equal 0"),
                                       (torch.tensor([1.0, float("nan")]), "finite numbers >= 0")])
def test_bad_face_weights_are_refused(weights, bad, match):
    with pytest.raises(ValueError, match=match):
        FaceIDPatch(weights, identities(2), face_weights=bad)


def test_faceid_refuses_clip_features_and_an_image_encoder(weights):
    with pytest.raises(ValueError, match=r"identity embeddings \[n_faces,512\], got \[2, 17, 128\].*not CLIP"):
        FaceIDPatch(weights, torch.zeros(2, 17, 128))
    with pytest.raises(ValueError, match="uses no image encoder"):
        check_image_encoder(build_tiny_clip_vision(), weights)


# --- embeddings from a TCAN_FACE --------------------------------------------------------------


def test_faceid_embeddings_are_the_identity_embedding(weights):
    face = make_face()
    embeddings, uncond = face_embeddings(weights, face, image_encoder=build_tiny_clip_vision())
    assert embeddings.shape == (1, 512) and torch.equal(embeddings[0], face.embedding) and uncond is None
    with pytest.raises(ValueError, match="256 values.*needs the 512-d insightface embedding"):
        face_embeddings(weights, make_face(dim=256))


def test_id_animator_embeddings_need_the_right_image_encoder(unet, tmp_path):
    animator = load_face_adapter(write_tiny_id_animator(tmp_path / "animator.ckpt", unet), unet)
    face = make_face(n=2)
    with pytest.raises(ValueError, match="needs a CLIP ViT-H/14 image encoder from models/clip_vision"):
        face_embeddings(animator, face)
    embeddings, uncond = face_embeddings(animator, face, build_tiny_clip_vision())
    assert embeddings.shape == (2, 17, TINY_CLIP_WIDTH) and uncond.shape == (1, 17, TINY_CLIP_WIDTH)

    flat = tiny_id_animator_state_dict(unet, "flat", embedding_dim=1280)["state_dict"]
    vit_h = parse_id_animator_state_dict(flat, unet, "animator_vit_h.ckpt")
    with pytest.raises(ValueError, match=f"width {TINY_CLIP_WIDTH}.*ViT-H/14.*models/clip_vision"):
        face_embeddings(vit_h, face, build_tiny_clip_vision())


def test_id_animator_face_weights_pick_one_face(unet, tmp_path):
    animator = load_face_adapter(write_tiny_id_animator(tmp_path / "animator.ckpt", unet), unet)
    embeddings, _ = face_embeddings(animator, make_face(n=2), build_tiny_clip_vision())
    assert torch.equal(face_tokens(animator, embeddings, face_weights=torch.tensor([0.0, 1.0])),
                       face_tokens(animator, embeddings[1:]))
    assert torch.equal(face_tokens(animator, embeddings, face_weights=torch.tensor([0.5, 0.5])),
                       face_tokens(animator, embeddings))


# --- build ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcan_model(tiny_tree):
    model, _ = build.load_tcan_model(tiny_tree.files["sd15_safetensors"])
    return model


def test_add_face_id_returns_a_clone_with_the_patch(tcan_model, tmp_path):
    faceid = write_tiny_ip_faceid(tmp_path / "tcan" / "ip-adapter-faceid_sd15.bin", tcan_model.unet)
    face = make_face(n=2)
    out, report = face_build.add_face_id(tcan_model, faceid, face, scale=0.6)
    assert tcan_model.patches == () and out is not tcan_model and out.unet is tcan_model.unet
    patch = out.patch("face_id")
    assert patch.scale == 0.6 and patch.weights.kind == IP_ADAPTER_FACEID and patch.face_weights is None
    assert torch.equal(patch.embeddings[0], face.embedding)
    assert "ip-adapter-faceid ip-adapter-faceid_sd15.bin, 2 face(s), scale 0.6, 4 tokens" in report
    assert "identity embedding" in report and "\n" not in report

    animator = write_tiny_id_animator(tmp_path / "tcan" / "animator.ckpt", tcan_model.unet)
    encoder = write_tiny_clip_vision(tmp_path / "clip_vision" / "tiny_clip.safetensors")
    with pytest.raises(ValueError, match="needs a CLIP ViT-H/14 image encoder"):
        face_build.add_face_id(out, animator, face)
    again, report = face_build.add_face_id(out, animator, face, clip_vision_path=encoder, lora_strength=0.5)
    assert [p.key for p in again.patches] == ["face_id"] and again.patch("face_id").weights.kind == ID_ANIMATOR
    assert again.patch("face_id").num_faces == 2 and torch.equal(again.patch("face_id").face_weights, face.weights)
    assert "image encoder tiny_clip.safetensors" in report and "LoRA strength 0.5" in report
    assert out.patch("face_id") is patch


def test_add_face_id_runs_the_encoder_on_the_given_device_and_puts_it_back(tcan_model, tmp_path):
    from tcan_core.face.clip_vision import load_clip_vision

    animator = write_tiny_id_animator(tmp_path / "tcan" / "animator.ckpt", tcan_model.unet)
    encoder = write_tiny_clip_vision(tmp_path / "clip_vision" / "tiny_clip.safetensors")
    face = make_face(n=1)
    here, _ = face_build.add_face_id(tcan_model, animator, face, clip_vision_path=encoder)
    there, _ = face_build.add_face_id(tcan_model, animator, face, clip_vision_path=encoder, device="cpu")
    assert torch.equal(here.patch("face_id").embeddings, there.patch("face_id").embeddings)
    assert there.patch("face_id").embeddings.device.type == "cpu"
    assert next(load_clip_vision(encoder).parameters()).device.type == "cpu"
