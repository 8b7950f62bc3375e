"""TCAN-trained checkpoints: the authors' .ckpt layouts and the pack's safetensors load into the right
places tensor for tensor; files of another kind and files with wrong keys get errors that say so."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from tcan_core.models.errors import ModelFormatError
from tcan_core.models.lora import appa_targets
from tcan_core.models.state_dict import load_state_dict_file
from tcan_core.models.tcan_ckpt import (APPEARANCE_UNET, CONTROLNET, LDM_CHECKPOINT, LORA, MOTION_MODULE,
                                        TCAN_UNET, TEMPORAL_CONTROLNET, UNKNOWN, appearance_pruned_keys,
                                        detect_tcan_checkpoint, load_appearance_unet, load_tcan_unet,
                                        load_temporal_controlnet)
from tcan_core.tiny.lora import write_tiny_loras
from tcan_core.tiny.sd15 import build_tiny_motion_adapter
from tcan_core.tiny.tcan_ckpt import (tiny_appa_factors, tiny_appearance_state_dict, tiny_controlnet_temporal,
                                      write_tiny_tcan_models)

SEED = 0


@pytest.fixture(scope="module")
def models(tiny_tree):
    """The tiny base UNet, ControlNet and an authors'-config motion adapter (no mid block, 32 frames)."""
    return {"unet": tiny_tree.modules["unet"], "controlnet": tiny_tree.modules["controlnet"],
            "adapter": build_tiny_motion_adapter("v3", seed=42)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A models root of its own, so the shared tiny tree that other tests scan stays as it is."""
    return tmp_path_factory.mktemp("tcan_models")


@pytest.fixture(scope="module")
def files(root, models):
    return write_tiny_tcan_models(root, models["unet"], models["controlnet"], models["adapter"], SEED)


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def save_torch(sd: dict[str, torch.Tensor], path) -> str:
    torch.save(sd, path)
    return str(path)


def test_files_live_in_the_tcan_folder(root, files):
    assert len(files) == 11 and all(p.parent == root / "tcan" and p.is_file() for p in files.values())


@pytest.mark.parametrize("key", ["appearance_ckpt", "appearance_module_ckpt"])
def test_authors_appearance_unet_takes_only_the_unread_layers_from_the_base(models, files, key):
    base = models["unet"]
    loaded = load_appearance_unet(files[key], like=base).state_dict()
    trained = tiny_appearance_state_dict(base, SEED)
    pruned = appearance_pruned_keys(base)
    assert {k.split(".")[0] for k in pruned} >= {"conv_out", "conv_norm_out", "up_blocks"}
    base_sd = base.state_dict()
    for key_, value in loaded.items():
        assert torch.equal(value, base_sd[key_] if key_ in pruned else trained[key_]), key_
    # The norm1 whose output the reference path reads comes from the file, not from the base.
    kept = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.weight"
    assert kept not in pruned and torch.equal(loaded[kept], trained[kept])


def test_authors_appearance_unet_does_not_share_storage_with_the_base(models, files):
    loaded = load_appearance_unet(files["appearance_ckpt"], like=models["unet"])
    base_ptrs = {t.data_ptr() for t in models["unet"].state_dict().values()}
    assert not base_ptrs & {t.data_ptr() for t in loaded.state_dict().values()}


def test_pack_appearance_unet_loads_every_tensor_from_the_file(models, files):
    model = load_appearance_unet(files["appearance_safetensors"], like=models["unet"], dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in tiny_appearance_state_dict(models["unet"], SEED).items()}
    assert_same(model.state_dict(), expected)
    assert type(model).__name__ == "UNet2DConditionModel" and dict(model.config) == dict(models["unet"].config)
    assert not any(p.requires_grad for p in model.parameters())


def test_appearance_unet_names_missing_and_unexpected_keys(models, files, tmp_path):
    sd = load_state_dict_file(files["appearance_ckpt"])
    gone = "down_blocks.1.resnets.0.conv1.weight"
    del sd[gone]
    sd["down_blocks.1.resnets.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelFormatError) as err:
        load_appearance_unet(save_torch(sd, tmp_path / "broken.ckpt"), like=models["unet"])
    # Once a key beyond the authors' pruned set is missing, the pruned ones are reported too.
    assert gone in str(err.value) and "down_blocks.1.resnets.0.extra.weight" in str(err.value)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)


def test_appearance_unet_partly_pruned_is_not_filled_in(models, files, tmp_path):
    sd = dict(tiny_appearance_state_dict(models["unet"], SEED))
    del sd["conv_out.weight"]
    with pytest.raises(ModelFormatError, match=r"1 missing key\(s\): conv_out.weight"):
        load_appearance_unet(save_torch(sd, tmp_path / "no_conv_out.ckpt"), like=models["unet"])


@pytest.mark.parametrize("file_key,says", [
    ("sd15_ckpt", "single-file Stable Diffusion checkpoint.*in TCAN Load Model"),
    ("controlnet_diffusers", "ControlNet without temporal layers.*in TCAN Temporal ControlNet"),
    ("controlnet_ldm", "ControlNet without temporal layers.*in TCAN Temporal ControlNet"),
    ("motion_v2", "AnimateDiff motion module.*in TCAN Motion Module"),
])
def test_appearance_unet_given_another_kind_says_what_it_is(tiny_tree, models, file_key, says):
    path = tiny_tree.files[file_key]
    if path.is_dir():
        path = path / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelFormatError, match="not a TCAN appearance.*; choose it as") as err:
        load_appearance_unet(path, like=models["unet"])
    err.match(says)


def test_appearance_unet_given_a_lora_or_a_tcan_unet(models, files, tmp_path):
    lora = write_tiny_loras(tmp_path, models["unet"], layouts=("peft_ckpt",)).files["peft_ckpt"]
    with pytest.raises(ModelFormatError, match="is a LoRA file.*TCAN APPA LoRA"):
        load_appearance_unet(lora, like=models["unet"])
    with pytest.raises(ModelFormatError, match="is a TCAN denoising UNet checkpoint"):
        load_appearance_unet(files["unet_stage2_ckpt"], like=models["unet"])


def test_appearance_unet_needs_a_2d_unet(models, files):
    with pytest.raises(ValueError, match="UNet2DConditionModel; got MotionAdapter"):
        load_appearance_unet(files["appearance_ckpt"], like=models["adapter"])


@pytest.mark.parametrize("key", ["unet_stage2_ckpt", "unet_stage2_module_ckpt", "unet_stage2_safetensors"])
def test_stage2_unet_gives_the_written_lora_and_motion_modules(models, files, key):
    parts = load_tcan_unet(files[key], base_unet=models["unet"])
    factors = tiny_appa_factors(models["unet"], SEED)
    assert parts.lora is not None and parts.lora.layout == "peft"
    assert sorted(parts.lora.weights) == sorted(factors) == sorted(appa_targets(models["unet"]))
    for path, (down, up) in factors.items():
        lora = parts.lora.weights[path]
        assert torch.equal(lora.down, down) and torch.equal(lora.up, up), path
        assert lora.alpha is None and lora.scale == 1.0
    assert parts.lora.coverage.complete
    assert type(parts.motion_adapter).__name__ == "MotionAdapter"
    assert_same(parts.motion_adapter.state_dict(), models["adapter"].state_dict())
    assert parts.motion_adapter.mid_block is None
    assert parts.base_mismatch == ()


def test_stage1_unet_has_a_lora_and_no_motion_modules(models, files):
    parts = load_tcan_unet(files["unet_stage1_ckpt"], base_unet=models["unet"])
    assert parts.motion_adapter is None and parts.base_mismatch == ()
    factors = tiny_appa_factors(models["unet"], SEED)
    assert all(torch.equal(parts.lora.weights[p].down, d) for p, (d, _) in factors.items())


def test_motion_adapter_dtype_and_device(models, files):
    adapter = load_tcan_unet(files["unet_stage2_ckpt"], base_unet=models["unet"], dtype=torch.float16).motion_adapter
    assert {p.dtype for p in adapter.parameters()} == {torch.float16}
    assert not any(p.requires_grad for p in adapter.parameters())


def test_another_base_is_reported_not_refused(models, files):
    base = copy.deepcopy(models["unet"])
    with torch.no_grad():
        base.conv_in.weight.add_(1.0)
        base.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(2.0)
    parts = load_tcan_unet(files["unet_stage2_ckpt"], base_unet=base)
    assert parts.base_mismatch == ("conv_in.weight",
                                   "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    assert parts.lora is not None and parts.motion_adapter is not None


def test_plain_diffusers_base_names_are_read_too(models, tmp_path):
    unet = models["unet"]
    sd = {**unet.state_dict(), **{f"{p}.lora_A.weight": a for p, (a, _) in tiny_appa_factors(unet, SEED).items()},
          **{f"{p}.lora_B.weight": b for p, (_, b) in tiny_appa_factors(unet, SEED).items()}}
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    parts = load_tcan_unet(path, base_unet=unet)
    assert parts.base_mismatch == () and parts.motion_adapter is None
    assert sorted(parts.lora.weights) == sorted(appa_targets(unet))


def test_tcan_unet_names_missing_and_unexpected_keys(models, files, tmp_path):
    sd = load_state_dict_file(files["unet_stage2_ckpt"])
    del sd["up_blocks.1.resnets.2.conv2.bias"]
    sd["up_blocks.1.resnets.2.bogus.weight"] = torch.zeros(2)
    with pytest.raises(ModelFormatError) as err:
        load_tcan_unet(save_torch(sd, tmp_path / "broken_base.ckpt"), base_unet=models["unet"])
    assert "up_blocks.1.resnets.2.conv2.bias" in str(err.value)
    assert "up_blocks.1.resnets.2.bogus.weight" in str(err.value)

    sd = load_state_dict_file(files["unet_stage2_ckpt"])
    gone = "up_blocks.2.motion_modules.1.temporal_transformer.proj_out.weight"
    del sd[gone]
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): up_blocks\.2\.motion_modules\.1\.proj_out\.weight"):
        load_tcan_unet(save_torch(sd, tmp_path / "broken_motion.ckpt"), base_unet=models["unet"])


def test_learnable_taumap_checkpoint_is_refused_with_the_reason(models, files, tmp_path):
    sd = load_state_dict_file(files["unet_stage2_ckpt"])
    sd["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0."
       "taumap_projection_layer.weight"] = torch.zeros(1, 256, 3, 3)
    with pytest.raises(ModelFormatError, match="use_learnable_taumap"):
        load_tcan_unet(save_torch(sd, tmp_path / "taumap.ckpt"), base_unet=models["unet"])


@pytest.mark.parametrize("file_key,says", [
    ("motion_v2", "AnimateDiff motion module.*motion_module in TCAN Motion Module"),
    ("sd15_safetensors", "single-file Stable Diffusion checkpoint.*checkpoint in TCAN Load Model"),
])
def test_tcan_unet_given_another_kind_says_what_it_is(tiny_tree, models, file_key, says):
    with pytest.raises(ModelFormatError, match=says):
        load_tcan_unet(tiny_tree.files[file_key], base_unet=models["unet"])


def test_tcan_unet_given_an_appearance_unet_or_controlnet_t(models, files):
    with pytest.raises(ModelFormatError, match="is a TCAN appearance"):
        load_tcan_unet(files["appearance_safetensors"], base_unet=models["unet"])
    with pytest.raises(ModelFormatError, match="is a TCAN temporal ControlNet.*temporal_layers in TCAN Temporal"):
        load_tcan_unet(files["controlnet_t_ckpt"], base_unet=models["unet"])


def expected_temporal(adapter) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tiny_controlnet_temporal(adapter, SEED).items():
        block, rest = key.removeprefix("down_blocks.").split(".motion_modules.", 1)
        out.setdefault(int(block), {})[rest] = value
    return out


@pytest.mark.parametrize("key", ["controlnet_t_ckpt", "controlnet_t_module_ckpt", "controlnet_t_safetensors"])
def test_temporal_controlnet_splits_into_controlnet_and_temporal_layers(models, files, key):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    controlnet, temporal = load_temporal_controlnet(files[key])
    assert type(controlnet).__name__ == "ControlNetModel"
    assert_same(controlnet.state_dict(), models["controlnet"].state_dict())
    expected = expected_temporal(models["adapter"])
    assert sorted(temporal) == [2, 3]
    for block, modules in temporal.items():
        assert isinstance(modules, torch.nn.ModuleList) and len(modules) == 2
        assert all(isinstance(m, AnimateDiffTransformer3D) for m in modules)
        assert_same(modules.state_dict(), expected[block])
    # Trained layers, not the motion module they were initialised from.
    initial = models["adapter"].down_blocks[2].motion_modules[0].proj_in.weight
    assert not torch.equal(temporal[2][0].proj_in.weight, initial)


def test_temporal_layers_alone_give_no_controlnet(models, files):
    path = files["controlnet_t_temporal_only_safetensors"]
    controlnet, temporal = load_temporal_controlnet(path, dtype=torch.float16)
    assert controlnet is None and sorted(temporal) == [2, 3]
    expected = expected_temporal(models["adapter"])
    assert_same(temporal[3].state_dict(), {k: v.half() for k, v in expected[3].items()})


def test_temporal_controlnet_names_missing_and_unexpected_keys(files, tmp_path):
    sd = load_state_dict_file(files["controlnet_t_ckpt"])
    del sd["down_blocks.3.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_k.weight"]
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): 1\.transformer_blocks\.0\.attn2\.to_k\.weight"):
        load_temporal_controlnet(save_torch(sd, tmp_path / "no_to_k.ckpt"))

    sd = load_state_dict_file(files["controlnet_t_ckpt"])
    del sd["controlnet_mid_block.bias"]
    with pytest.raises(ModelFormatError, match=r"missing key\(s\): controlnet_mid_block\.bias"):
        load_temporal_controlnet(save_torch(sd, tmp_path / "no_mid.ckpt"))

    sd = load_state_dict_file(files["controlnet_t_ckpt"])
    sd["mid_block.motion_modules.0.temporal_transformer.norm.weight"] = torch.ones(64)
    with pytest.raises(ModelFormatError, match="outside the ControlNet's down blocks: mid_block.motion_modules"):
        load_temporal_controlnet(save_torch(sd, tmp_path / "mid.ckpt"))


def test_temporal_layers_must_fit_the_controlnet(models, files, tmp_path):
    sd = load_state_dict_file(files["controlnet_t_safetensors"])
    moved = {k.replace("down_blocks.3.", "down_blocks.1.") if ".motion_modules." in k else k: v for k, v in sd.items()}
    with pytest.raises(ModelFormatError, match="down block 1: temporal width 64, ControlNet width 32"):
        load_temporal_controlnet(save_torch(moved, tmp_path / "moved.ckpt"))


@pytest.mark.parametrize("file_key,says", [
    ("controlnet_ldm_bare", "ControlNet without temporal layers"),
    ("motion_v3", "AnimateDiff motion module"),
])
def test_temporal_controlnet_given_another_kind_says_what_it_is(tiny_tree, file_key, says):
    with pytest.raises(ModelFormatError, match=says):
        load_temporal_controlnet(tiny_tree.files[file_key])


@pytest.mark.parametrize("key,kind", [
    ("appearance_ckpt", APPEARANCE_UNET), ("appearance_module_ckpt", APPEARANCE_UNET),
    ("appearance_safetensors", APPEARANCE_UNET), ("unet_stage1_ckpt", TCAN_UNET), ("unet_stage2_ckpt", TCAN_UNET),
    ("unet_stage2_module_ckpt", TCAN_UNET), ("unet_stage2_safetensors", TCAN_UNET),
    ("controlnet_t_ckpt", TEMPORAL_CONTROLNET), ("controlnet_t_module_ckpt", TEMPORAL_CONTROLNET),
    ("controlnet_t_safetensors", TEMPORAL_CONTROLNET), ("controlnet_t_temporal_only_safetensors", TEMPORAL_CONTROLNET),
])
def test_detect_classifies_every_kit_file(files, key, kind):
    assert detect_tcan_checkpoint(load_state_dict_file(files[key])) == kind


@pytest.mark.parametrize("key,kind", [
    ("sd15_safetensors", LDM_CHECKPOINT), ("sd15_ckpt", LDM_CHECKPOINT), ("controlnet_ldm", CONTROLNET),
    ("controlnet_ldm_bare", CONTROLNET), ("motion_v1", MOTION_MODULE), ("motion_v2", MOTION_MODULE),
    ("motion_v3", MOTION_MODULE),
])
def test_detect_classifies_the_public_model_files(tiny_tree, key, kind):
    assert detect_tcan_checkpoint(load_state_dict_file(tiny_tree.files[key])) == kind


def test_detect_classifies_diffusers_controlnet_loras_and_others(tiny_tree, models, tmp_path):
    assert detect_tcan_checkpoint(models["controlnet"].state_dict()) == CONTROLNET
    assert detect_tcan_checkpoint(models["adapter"].state_dict()) == MOTION_MODULE
    loras = write_tiny_loras(tmp_path, models["unet"])
    for path in loras.files.values():
        assert detect_tcan_checkpoint(load_state_dict_file(path)) == LORA, path
    assert detect_tcan_checkpoint(["encoder.conv_in.weight", "decoder.conv_out.weight"]) == UNKNOWN
