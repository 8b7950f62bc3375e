"""APPA LoRA: the three key layouts land on the right UNet layers with the file's deltas, the patch
is exact and reversible, and bad files get errors that name the bad keys."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from tcan_core.models.errors import ModelFormatError
from tcan_core.models.lora import (LoraPatch, appa_coverage, appa_targets, detect_lora_layout, load_lora,
                                   parse_lora_state_dict)
from tcan_core.models.state_dict import load_state_dict_file
from tcan_core.tiny.lora import TINY_LORA_LAYOUTS, kohya_state_dict, peft_state_dict, write_tiny_loras
from tcan_core.tiny.sd15 import build_tiny_motion_adapter, build_tiny_sd15

LAYOUT = {"peft": "peft", "peft_ckpt": "peft", "diffusers": "diffusers", "diffusers_processor": "diffusers",
          "kohya": "kohya"}
APPA_SUFFIXES = {f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")}


@pytest.fixture(scope="module")
def unet():
    model, _, _ = build_tiny_sd15(seed=0)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def tiny(unet, tmp_path_factory):
    return write_tiny_loras(tmp_path_factory.mktemp("loras"), unet)


def forward(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 5, 64, generator=g)
    with torch.no_grad():
        return model(x, 10, encoder_hidden_states=context).sample


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", TINY_LORA_LAYOUTS)
def test_each_layout_maps_onto_the_appa_layers_with_the_right_deltas(unet, tiny, layout):
    parsed = load_lora(tiny.files[layout], unet)
    assert parsed.layout == LAYOUT[layout]
    assert sorted(parsed.weights) == sorted(appa_targets(unet)) == sorted(tiny.expected)
    for path, lora in parsed.weights.items():
        torch.testing.assert_close(lora.delta().double(), tiny.expected[path], rtol=1e-5, atol=1e-7)
    assert parsed.coverage.complete and not parsed.coverage.extra
    assert parsed.coverage.ranks == (4,) and parsed.coverage.alphas == (4.0,)


# File key of A (down), of B (up), alpha key or None, and the diffusers layer it must land on; the
# kohya names are SD1.5's LDM names, written out here independently of the converter.
KEYS = [
    ("peft", "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
     "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight", None,
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("peft_ckpt", "module.mid_block.attentions.0.transformer_blocks.0.attn1.to_v.lora_A.default.weight",
     "module.mid_block.attentions.0.transformer_blocks.0.attn1.to_v.lora_B.default.weight", None,
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"),
    ("diffusers", "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.lora.down.weight",
     "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.lora.up.weight",
     "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.alpha",
     "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q"),
    ("diffusers_processor", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.to_v_lora.down.weight",
     "up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.to_v_lora.up.weight", None,
     "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"),
    ("kohya", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("kohya", "lora_unet_input_blocks_8_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
     "lora_unet_input_blocks_8_1_transformer_blocks_0_attn1_to_q.lora_up.weight",
     "lora_unet_input_blocks_8_1_transformer_blocks_0_attn1_to_q.alpha",
     "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q"),
    ("kohya", "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_down.weight",
     "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_up.weight",
     "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.alpha",
     "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"),
    ("kohya", "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_k.lora_down.weight",
     "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_k.lora_up.weight",
     "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_k.alpha",
     "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k"),
    ("kohya", "lora_unet_output_blocks_9_1_transformer_blocks_0_attn2_to_q.lora_down.weight",
     "lora_unet_output_blocks_9_1_transformer_blocks_0_attn2_to_q.lora_up.weight",
     "lora_unet_output_blocks_9_1_transformer_blocks_0_attn2_to_q.alpha",
     "up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_q"),
]


@pytest.mark.parametrize("layout,key_a,key_b,key_alpha,module", KEYS)
def test_file_keys_land_on_the_named_layer_with_alpha_over_r_times_b_a(unet, tiny, layout, key_a, key_b,
                                                                      key_alpha, module):
    raw = load_state_dict_file(tiny.files[layout])
    a, b = raw[key_a], raw[key_b]
    alpha = float(raw[key_alpha]) if key_alpha else float(a.shape[0])
    want = (b.double() @ a.double()) * alpha / a.shape[0]
    lora = load_lora(tiny.files[layout], unet).weights[module]
    assert torch.equal(lora.down, a) and torch.equal(lora.up, b)
    torch.testing.assert_close(lora.delta().double(), want, rtol=1e-5, atol=1e-7)


def test_all_layouts_of_one_lora_give_identical_patched_weights(unet, tiny):
    before = snapshot(unet)
    patched = {}
    for layout, path in tiny.files.items():
        model = copy.deepcopy(unet)
        with LoraPatch(load_lora(path, model), strength=0.8).applied(model):
            patched[layout] = snapshot(model)
    reference = patched.pop("peft")
    changed = {k for k in before if not torch.equal(before[k], reference[k])}
    assert changed == {f"{path}.weight" for path in appa_targets(unet)}
    for layout, sd in patched.items():
        assert all(torch.equal(sd[k], reference[k]) for k in reference), layout


def test_kohya_file_with_diffusers_module_names_loads_like_the_ldm_names(unet, tiny):
    """sd-scripts names SD1.x layers after the diffusers UNet (lora_unet_down_blocks_0_...)."""
    sd = {}
    for path, (down, up) in tiny.factors.items():
        name = "lora_unet_" + path.replace(".", "_")
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                   f"{name}.alpha": torch.tensor(4.0)})
    parsed = parse_lora_state_dict(sd, unet, "sd-scripts LoRA")
    ldm = load_lora(tiny.files["kohya"], unet)
    assert parsed.layout == "kohya" and set(parsed.weights) == set(ldm.weights)
    assert all(torch.equal(parsed.weights[p].delta(), ldm.weights[p].delta()) for p in ldm.weights)


def test_strength_zero_is_bit_identical_and_strength_one_changes_the_output(unet, tiny):
    model = copy.deepcopy(unet)
    plain = forward(model)
    lora = load_lora(tiny.files["peft_ckpt"], model)
    versions = [p._version for p in model.parameters()]
    with LoraPatch(lora, strength=0.0).applied(model) as patched:
        assert patched is model
        assert torch.equal(forward(model), plain)
    assert [p._version for p in model.parameters()] == versions, "strength 0 must not write any weight"
    with LoraPatch(lora, strength=1.0).applied(model):
        changed = forward(model)
    assert (changed - plain).abs().max() > 1e-3
    assert torch.equal(forward(model), plain)


def test_patched_weight_is_w_plus_strength_alpha_over_r_b_a(unet, tiny):
    model = copy.deepcopy(unet)
    layers = dict(model.named_modules())
    before = {path: layers[path].weight.detach().clone() for path in tiny.expected}
    with LoraPatch(load_lora(tiny.files["diffusers"], model), strength=-0.5).applied(model):
        for path, delta in tiny.expected.items():
            want = before[path].double() - 0.5 * delta
            torch.testing.assert_close(layers[path].weight.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fail_inside", [False, True])
def test_weights_are_restored_exactly_after_the_block(unet, tiny, fail_inside):
    model = copy.deepcopy(unet)
    before = snapshot(model)
    params = dict(model.named_parameters())
    pointers = {name: p.data_ptr() for name, p in params.items()}
    patch = LoraPatch(load_lora(tiny.files["kohya"], model), strength=1.7)

    def run() -> None:
        with patch.applied(model):
            assert sum(not torch.equal(before[k], v) for k, v in model.state_dict().items()) == 96
            if fail_inside:
                raise KeyboardInterrupt("cancelled by the user")

    if fail_inside:
        with pytest.raises(KeyboardInterrupt):
            run()
    else:
        run()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[name] and p.data_ptr() == pointers[name] for name, p in model.named_parameters())


def test_half_precision_weights_are_patched_in_their_dtype_and_restored(unet, tiny):
    model = copy.deepcopy(unet).to(torch.bfloat16)
    before = snapshot(model)
    lora = load_lora(tiny.files["peft"], model)
    path = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    weight = dict(model.named_modules())[path].weight
    with LoraPatch(lora).applied(model):
        assert weight.dtype == torch.bfloat16
        want = (before[path + ".weight"].float() + lora.weights[path].delta()).to(torch.bfloat16)
        assert torch.equal(weight, want)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_alpha_scales_the_delta_in_every_layout(unet, tmp_path):
    tiny = write_tiny_loras(tmp_path, unet, rank=4, alpha=8.0, layouts=("peft", "diffusers", "kohya"))
    path = "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v"
    down, up = tiny.factors[path]
    for layout, file in tiny.files.items():
        lora = load_lora(file, unet).weights[path]
        assert lora.scale == 2.0, layout
        torch.testing.assert_close(lora.delta().double(), 2.0 * (up.double() @ down.double()), rtol=1e-5, atol=1e-7)


def test_peft_metadata_alpha_pattern_and_rslora(unet, tiny):
    sd = peft_state_dict(tiny.factors)
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2}})}
    weights = parse_lora_state_dict(sd, unet, "peft LoRA", meta).weights
    assert weights["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].scale == 0.5
    assert weights["mid_block.attentions.0.transformer_blocks.0.attn2.to_q"].scale == 2.0
    rslora = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8, "use_rslora": True})}
    weights = parse_lora_state_dict(sd, unet, "rsLoRA", rslora).weights
    assert weights["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].scale == pytest.approx(8 / 4 ** 0.5)


def test_text_encoder_keys_are_reported_and_ignored(unet, tiny, tmp_path, caplog):
    with_te = write_tiny_loras(tmp_path, unet, text_encoder=True)
    for layout, file in with_te.files.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tcan_core.models.lora"):
            parsed = load_lora(file, unet)
        te_keys = [k for k in load_state_dict_file(file) if "text_model" in k]
        assert te_keys and parsed.ignored_keys == tuple(sorted(te_keys)), layout
        assert "text-encoder" in caplog.text and te_keys[0] in caplog.text
        plain = load_lora(tiny.files[layout], unet)
        assert set(parsed.weights) == set(plain.weights)
        assert all(torch.equal(parsed.weights[p].delta(), plain.weights[p].delta()) for p in plain.weights)


def test_text_encoder_only_file_is_an_error(unet, tmp_path):
    file = tmp_path / "te_only.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 64),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(64, 4)}, str(file))
    with pytest.raises(ModelFormatError, match="only text-encoder"):
        load_lora(file, unet)


@pytest.mark.parametrize("keys,named", [
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"],
     "model.diffusion_model.input_blocks.0.0.weight"),
    (["down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
      "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"],
     "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"),
    (["lora_unet_input_blocks_4_1_transformer_blocks_3_attn1_to_q.lora_down.weight",
      "lora_unet_input_blocks_4_1_transformer_blocks_3_attn1_to_q.lora_up.weight"],
     "lora_unet_input_blocks_4_1_transformer_blocks_3_attn1_to_q.lora_down.weight"),
])
def test_file_whose_keys_match_no_layer_is_an_error_naming_them(unet, tmp_path, keys, named):
    file = tmp_path / "nothing.safetensors"
    save_file({k: torch.ones(4, 4) for k in keys}, str(file))
    with pytest.raises(ModelFormatError) as err:
        load_lora(file, unet)
    assert named in str(err.value) and str(file) in str(err.value)


def test_shape_mismatch_is_an_error_naming_the_layer(unet, tiny):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    sd = peft_state_dict(tiny.factors)
    sd[f"base_model.model.{path}.lora_A.weight"] = torch.ones(4, 2048)
    with pytest.raises(ModelFormatError, match=re.escape(path)) as err:
        parse_lora_state_dict(sd, unet, "SDXL LoRA")
    assert "2048" in str(err.value) and "shape" in str(err.value)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.update({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(4, 32)}), "mixes"),
    (lambda sd: sd.pop("base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"),
     r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q \(has down\)"),
    (lambda sd: sd.update({"base_model.model.conv_in.lora_A.other.weight": torch.ones(4, 4, 3, 3),
                           "base_model.model.conv_in.lora_A.default.weight": torch.ones(4, 4, 3, 3)}),
     "several peft adapters"),
    (lambda sd: sd.update({"base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight":
                           torch.ones(64, 64)}), "to_q.base_layer.weight"),
    (lambda sd: sd["base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight"]
     .__setitem__((0, 0), float("nan")), "NaN"),
    (lambda sd: sd.update({"base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_v.lora_B.weight":
                           torch.ones(64, 3)}), "same rank"),
])
def test_malformed_lora_files_are_errors(unet, tiny, edit, message):
    sd = {k: v.clone() for k, v in peft_state_dict(tiny.factors).items()}
    edit(sd)
    with pytest.raises(ModelFormatError, match=message):
        parse_lora_state_dict(sd, unet, "bad LoRA")


def test_layout_is_detected_from_keys_not_file_names(unet, tiny, tmp_path):
    misnamed = tmp_path / "my_kohya_lora.safetensors"
    misnamed.write_bytes(tiny.files["peft"].read_bytes())
    assert load_lora(misnamed, unet).layout == "peft"
    assert detect_lora_layout(["lora_unet_x.lora_down.weight", "lora_unet_x.alpha"]) == "kohya"
    assert detect_lora_layout(["a.processor.to_out_lora.up.weight"]) == "diffusers"


def test_appa_targets_are_six_per_spatial_transformer_block(unet):
    targets = appa_targets(unet)
    block = re.compile(r".*attentions\.\d+\.transformer_blocks\.\d+")
    blocks = [name for name, _ in unet.named_modules() if block.fullmatch(name)]
    assert len(blocks) == 16 and len(targets) == 6 * len(blocks)
    for block in blocks:
        assert {t[len(block) + 1:] for t in targets if t.startswith(block + ".")} == APPA_SUFFIXES


def test_appa_targets_leave_motion_modules_out(unet):
    from diffusers import UNetMotionModel

    motion_unet = UNetMotionModel.from_unet2d(copy.deepcopy(unet), build_tiny_motion_adapter("v2"))
    temporal = [n for n, _ in motion_unet.named_modules() if "motion_modules" in n and n.endswith("attn1.to_q")]
    assert temporal
    assert appa_targets(motion_unet) == appa_targets(unet)
    with pytest.raises(ValueError, match="no spatial transformer blocks"):
        appa_targets(torch.nn.Linear(4, 4))


def test_coverage_reports_missing_and_other_layers_and_patches_convolutions(unet, tmp_path, caplog):
    appa = appa_targets(unet)
    others = ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1"]
    tiny = write_tiny_loras(tmp_path, unet, targets=appa[:6] + others, alpha=2.0, layouts=("peft", "kohya"))
    for layout, file in tiny.files.items():
        with caplog.at_level(logging.WARNING, logger="tcan_core.models.lora"):
            parsed = load_lora(file, unet)
        coverage = parsed.coverage
        assert coverage.covered == tuple(appa[:6]) and coverage.missing == tuple(appa[6:]), layout
        assert coverage.extra == tuple(sorted(others)) and not coverage.complete
        assert "90 APPA layer(s) left unpatched" in coverage.describe()
        assert "2 other layer(s)" in coverage.describe()
        assert "APPA layer(s) are not in the LoRA" in caplog.text
        model = copy.deepcopy(unet)
        conv = model.down_blocks[0].resnets[0].conv1.weight
        before = conv.detach().clone()
        with LoraPatch(parsed).applied(model):
            torch.testing.assert_close((conv - before).double(), tiny.expected[others[1]], rtol=1e-4, atol=1e-6)
        assert torch.equal(conv, before)
    assert appa_coverage(parsed.weights, unet) == coverage


def test_patch_is_immutable_and_checks_its_strength_and_unet(unet, tiny):
    lora = load_lora(tiny.files["peft"], unet)
    patch = LoraPatch(lora, strength=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        patch.strength = 1.0
    with pytest.raises(TypeError):
        lora.weights["conv_in"] = lora.weights[appa_targets(unet)[0]]
    stronger = patch.with_strength(2)
    assert stronger.lora is lora and stronger.strength == 2.0 and patch.strength == 0.5
    with pytest.raises(ValueError, match="nan"):
        LoraPatch(lora, strength=float("nan"))
    with pytest.raises(ModelFormatError, match="does not have"):
        with patch.applied(torch.nn.Sequential(torch.nn.Linear(4, 4))):
            pass


def test_kohya_writer_uses_ldm_names(unet, tiny):
    sd = kohya_state_dict(tiny.factors, 4.0, unet)
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in sd)
