"""CLIP image encoder files from models/clip_vision: the config read from shapes, a strict round trip, the
clear error for other files, and the per-(file, mtime) cache."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tcan_core.face import clear_clip_vision_cache, clip_image_embeddings, clip_vision_config, load_clip_vision
from tcan_core.face.clip_vision import clip_vision_name
from tcan_core.models.errors import ModelFormatError
from tcan_core.tiny.face_adapter import (build_tiny_clip_vision, tiny_clip_vision_config, write_tiny_clip_vision,
                                         write_tiny_id_animator)
from tcan_core.tiny.sd15 import build_tiny_sd15

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "projection_dim", "hidden_act", "layer_norm_eps")


@pytest.fixture(autouse=True)
def empty_cache():
    clear_clip_vision_cache()
    yield
    clear_clip_vision_cache()


def _pixels():
    return torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(4))


def _vit_shapes(width, layers, mlp, patch, positions, projection):
    shapes = {"vision_model.embeddings.patch_embedding.weight": (width, 3, patch, patch),
              "vision_model.embeddings.position_embedding.weight": (positions, width),
              "visual_projection.weight": (projection, width)}
    shapes.update({f"vision_model.encoder.layers.{i}.mlp.fc1.weight": (mlp, width) for i in range(layers)})
    return shapes


@pytest.mark.parametrize("position_ids", [False, True])
def test_round_trip_gives_the_in_memory_encoders_hidden_states(tmp_path, position_ids):
    path = write_tiny_clip_vision(tmp_path / "clip_vision" / "tiny.safetensors", position_ids=position_ids)
    assert ("vision_model.embeddings.position_ids" in load_file(str(path))) == position_ids
    loaded = load_clip_vision(path)
    reference = build_tiny_clip_vision()
    expected = tiny_clip_vision_config()
    for name in CONFIG_FIELDS:
        assert getattr(loaded.config, name) == getattr(expected, name), name
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(clip_image_embeddings(loaded, _pixels()), clip_image_embeddings(reference, _pixels()))
    with torch.no_grad():
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        # Tensors read from a safetensors file may start at an 8-byte offset, and the CPU's matrix-vector
        # kernel then sums in another order (1e-7 apart): close, not bit-equal.
        assert torch.allclose(loaded(pixel_values=pixels).image_embeds, reference(pixel_values=pixels).image_embeds,
                              rtol=0, atol=1e-5)


def test_torch_files_and_half_precision_load_as_float32(tmp_path):
    sd = {k: v.half() for k, v in build_tiny_clip_vision().state_dict().items()}
    torch.save(sd, tmp_path / "tiny_clip.bin")
    loaded = load_clip_vision(tmp_path / "tiny_clip.bin")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    kept = load_clip_vision(tmp_path / "tiny_clip.bin", dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.float16}


def test_config_from_shapes_of_the_real_encoders():
    vit_h = clip_vision_config(_vit_shapes(1280, 32, 5120, 14, 257, 1024))
    assert (vit_h.num_attention_heads, vit_h.hidden_act, vit_h.image_size, vit_h.patch_size) == (16, "gelu", 224, 14)
    assert (vit_h.num_hidden_layers, vit_h.intermediate_size, vit_h.projection_dim) == (32, 5120, 1024)
    assert vit_h.layer_norm_eps == 1e-5 and clip_vision_name(vit_h) == "ViT-H/14"
    vit_l = clip_vision_config(_vit_shapes(1024, 24, 4096, 14, 257, 768))
    assert (vit_l.num_attention_heads, vit_l.hidden_act, clip_vision_name(vit_l)) == (16, "quick_gelu", "ViT-L/14")
    vit_b = clip_vision_config(_vit_shapes(768, 12, 3072, 32, 50, 512))
    assert (vit_b.num_attention_heads, vit_b.image_size, clip_vision_name(vit_b)) == (12, 224, "ViT-B/32")
    big_g = clip_vision_config(_vit_shapes(1664, 48, 8192, 14, 257, 1280))
    assert (big_g.num_attention_heads, big_g.hidden_act) == (16, "gelu")
    with pytest.raises(ModelFormatError, match="width of 100 .*head count"):
        clip_vision_config(_vit_shapes(100, 2, 200, 8, 17, 32))
    with pytest.raises(ModelFormatError, match="not a square image"):
        clip_vision_config(_vit_shapes(128, 2, 256, 8, 20, 32))


def test_a_file_that_is_not_a_clip_vision_model_is_refused(tmp_path):
    animator = write_tiny_id_animator(tmp_path / "animator.safetensors", build_tiny_sd15()[0])
    with pytest.raises(ModelFormatError, match="not a CLIP vision encoder.*vision_model.embeddings.*"
                                               "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"):
        load_clip_vision(animator)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = {k: v.contiguous() for k, v in build_tiny_clip_vision().state_dict().items()}
    del sd["vision_model.post_layernorm.bias"]
    sd["text_model.final_layer_norm.weight"] = torch.ones(4)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): vision_model\.post_layernorm\.bias.*"
                                               r"unexpected key\(s\): text_model\.final_layer_norm\.weight"):
        load_clip_vision(tmp_path / "broken.safetensors")


def test_loaded_encoders_are_cached_per_file_and_mtime(tmp_path):
    path = write_tiny_clip_vision(tmp_path / "tiny.safetensors")
    first = load_clip_vision(path)
    assert load_clip_vision(path) is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = load_clip_vision(path)
    assert second is not first and load_clip_vision(path) is second
    clear_clip_vision_cache()
    assert load_clip_vision(path) is not second
