"""The loaders read every format the tiny kit writes, tensor for tensor, and refuse bad files
with messages that say what is wrong."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from tcan_core.models.controlnet import load_controlnet
from tcan_core.models.detect import detect_checkpoint, detect_motion_module
from tcan_core.models.errors import ModelFileError, ModelFormatError, WrongBaseModelError
from tcan_core.models.motion_module import load_motion_module
from tcan_core.models.sd15 import infer_text_config, infer_unet_config, infer_vae_config, load_sd15, shipped_config
from tcan_core.models.state_dict import load_state_dict_file, shapes_of
from tcan_core.tiny import sd15 as kit
from tcan_core.models.ldm_keys import clip_to_ldm, controlnet_to_ldm, motion_to_animatediff, unet_to_ldm, vae_to_ldm


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    a, b = loaded.state_dict(), original.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("key", ["sd15_safetensors", "sd15_ckpt", "sd15_diffusers"])
def test_sd15_round_trip(tiny_tree, key):
    sd = load_sd15(tiny_tree.files[key])
    assert sd.detection.base == "SD1.5"
    assert_same_weights(sd.unet, tiny_tree.modules["unet"])
    assert_same_weights(sd.vae, tiny_tree.modules["vae"])
    assert_same_weights(sd.text_encoder, tiny_tree.modules["text_encoder"])


def test_sd15_loaded_model_computes_like_original(tiny_tree):
    sd = load_sd15(tiny_tree.files["sd15_safetensors"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 5, kit.TINY_CONTEXT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # Same weights; only the summation order of the kernels may differ.
        torch.testing.assert_close(sd.unet(x, 10, ctx).sample, tiny_tree.modules["unet"](x, 10, ctx).sample,
                                   rtol=1e-5, atol=1e-6)


def test_sd15_dtype_and_frozen(tiny_tree):
    sd = load_sd15(tiny_tree.files["sd15_safetensors"], dtype=torch.bfloat16)
    params = list(sd.unet.parameters()) + list(sd.vae.parameters()) + list(sd.text_encoder.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params)


@pytest.mark.parametrize("key", ["controlnet_ldm", "controlnet_ldm_bare", "controlnet_diffusers"])
def test_controlnet_round_trip(tiny_tree, key):
    model, det = load_controlnet(tiny_tree.files[key])
    assert det.base == "SD1.5"
    assert_same_weights(model, tiny_tree.modules["controlnet"])


def test_controlnet_single_file_with_diffusers_keys(tiny_tree, tmp_path):
    path = tmp_path / "cn_diffusers_keys.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_tree.modules["controlnet"].state_dict().items()}, str(path))
    model, det = load_controlnet(path)
    assert det.format == "diffusers"
    assert_same_weights(model, tiny_tree.modules["controlnet"])


@pytest.mark.parametrize("version,mid,frames", [("v1", False, 24), ("v2", True, 32), ("v3", False, 32)])
def test_motion_module_round_trip(tiny_tree, version, mid, frames):
    adapter, det = load_motion_module(tiny_tree.files[f"motion_{version}"])
    assert det.details["version"] == version
    assert det.details["mid_block"] is mid and det.details["max_frames"] == frames
    assert_same_weights(adapter, tiny_tree.modules[f"motion_{version}"])


def test_motion_module_diffusers_layout(tiny_tree, tmp_path):
    path = tmp_path / "mm_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_tree.modules["motion_v2"].state_dict().items()}, str(path))
    adapter, det = load_motion_module(path)
    assert det.format == "diffusers" and det.details["version"] == "v2"
    assert_same_weights(adapter, tiny_tree.modules["motion_v2"])


def _meta(build):
    with torch.device("meta"):
        return build()


def test_real_size_shapes_give_the_shipped_sd15_configs():
    """At SD1.5's real widths, the configs read from the shapes are the shipped SD1.5 configs."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tcan_core.models.controlnet import infer_controlnet_config_ldm

    unet_cfg, vae_cfg = shipped_config("sd15_unet"), shipped_config("sd15_vae")
    unet = _meta(lambda: UNet2DConditionModel.from_config(unet_cfg))
    assert infer_unet_config(shapes_of(unet_to_ldm(unet.state_dict(), unet.config)), "model.diffusion_model.") == unet_cfg
    vae = _meta(lambda: AutoencoderKL.from_config(vae_cfg))
    assert infer_vae_config(shapes_of(vae_to_ldm(vae.state_dict(), vae.config)), "first_stage_model.") == vae_cfg
    text_cfg = {k: v for k, v in shipped_config("sd15_text_encoder").items() if k not in ("architectures", "model_type")}
    text = _meta(lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))
    got = infer_text_config({k.removeprefix("cond_stage_model.transformer."): v
                             for k, v in shapes_of(clip_to_ldm(text.state_dict())).items()})
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings"):
        assert getattr(got, name) == text_cfg[name], name
    cn_cfg = shipped_config("sd15_controlnet")
    cn = _meta(lambda: ControlNetModel.from_config(cn_cfg))
    assert infer_controlnet_config_ldm(shapes_of(controlnet_to_ldm(cn.state_dict(), cn.config)), "control_model.") == cn_cfg


def test_real_size_motion_module_detected_as_v2():
    from diffusers import MotionAdapter

    adapter = _meta(lambda: MotionAdapter())
    det = detect_motion_module(shapes_of(motion_to_animatediff(adapter.state_dict())))
    assert (det.base, det.details["version"], det.details["channels"]) == ("SD1.5", "v2", (320, 640, 1280, 1280))


# Bad inputs -----------------------------------------------------------------------------------


def test_truncated_safetensors(tiny_tree, tmp_path):
    data = tiny_tree.files["sd15_safetensors"].read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt safetensors"):
        load_sd15(bad)


def test_garbage_file(tmp_path):
    bad = tmp_path / "page.safetensors"
    bad.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ModelFileError, match="neither a safetensors file nor a PyTorch checkpoint"):
        load_state_dict_file(bad)


class Payload:
    """A pickled object that is not a tensor; unpickling it could run code, so it is refused."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_object_refused(tmp_path, capsys):
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, bad)
    with pytest.raises(ModelFileError, match=r"weights_only=True.*safetensors"):
        load_state_dict_file(bad)
    assert "must never run" not in capsys.readouterr().out


def test_sdxl_checkpoint_in_sd15_slot(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file(kit.sdxl_like_state_dict(), str(path))
    assert detect_checkpoint(shapes_of(kit.sdxl_like_state_dict())).base == "SDXL"
    with pytest.raises(WrongBaseModelError, match=r"SDXL checkpoint.*needs an SD1\.5 checkpoint"):
        load_sd15(path)


def test_sdxl_diffusers_folder(tmp_path):
    (tmp_path / "text_encoder_2").mkdir()
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(WrongBaseModelError, match="SDXL"):
        load_sd15(tmp_path)


def test_sd2_checkpoint_in_sd15_slot(tmp_path):
    path = tmp_path / "sd2.safetensors"
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
          "cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}
    save_file(sd, str(path))
    with pytest.raises(WrongBaseModelError, match=r"SD2\.x checkpoint"):
        load_sd15(path)


def test_inpainting_checkpoint_refused(tiny_tree, tmp_path):
    sd = load_state_dict_file(tiny_tree.files["sd15_safetensors"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(sd[key].shape[0], 9, 3, 3)
    path = tmp_path / "inpaint.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelFormatError, match="inpainting"):
        load_sd15(path)


def test_unexpected_and_missing_keys_are_named(tiny_tree, tmp_path):
    sd = load_state_dict_file(tiny_tree.files["sd15_safetensors"])
    sd["model.diffusion_model.input_blocks.1.0.extra_layer.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelFormatError, match=r"unexpected key\(s\): \S*extra_layer\.weight"):
        load_sd15(path)
    sd.pop("model.diffusion_model.input_blocks.1.0.extra_layer.weight")
    sd.pop("first_stage_model.decoder.conv_out.bias")
    save_file(sd, str(path))
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): \S*decoder\.conv_out\.bias"):
        load_sd15(path)


def test_controlnet_for_sdxl_refused(tmp_path):
    from diffusers import ControlNetModel

    cfg = kit.tiny_controlnet_config()
    cfg.update(cross_attention_dim=2048)
    model = ControlNetModel.from_config(cfg)
    path = tmp_path / "cn_xl.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet_to_ldm(model.state_dict(), cfg).items()}, str(path))
    with pytest.raises(WrongBaseModelError, match=r"SDXL controlnet.*control_v11p_sd15_openpose"):
        load_controlnet(path)


def test_controlnet_slot_given_a_lora(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ModelFormatError, match="a LoRA, not an SD1.5 ControlNet"):
        load_controlnet(path)


def test_motion_module_for_sdxl_refused(tmp_path):
    from diffusers import MotionAdapter

    adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=2, use_motion_mid_block=False)
    path = tmp_path / "mm_sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in motion_to_animatediff(adapter.state_dict()).items()}, str(path))
    with pytest.raises(WrongBaseModelError, match=r"SDXL motion.*mm_sd_v15_v2"):
        load_motion_module(path)


def test_checkpoint_given_to_motion_slot(tiny_tree):
    with pytest.raises(ModelFormatError, match="not an SD1.5 AnimateDiff motion module"):
        load_motion_module(tiny_tree.files["sd15_safetensors"])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict_file("/nonexistent/model.safetensors")


def test_pickle_protocol_is_not_used_for_safetensors(tiny_tree, monkeypatch):
    """safetensors files never go through pickle at all."""
    monkeypatch.setattr(pickle, "Unpickler", None)
    assert load_state_dict_file(tiny_tree.files["sd15_safetensors"])
