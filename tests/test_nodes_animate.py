"""The TCAN model nodes and the TCAN Sampler node on the tiny model tree, through the host's model folders:
each patch node returns a clone, files of every layout load, and bad inputs get their clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import node, rel, result
from tcan_core.animation.text import encode_empty_prompt
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.models.errors import ModelFormatError, WrongBaseModelError

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(pack, demo_models):
    (model,), report = result(node(pack, "TCANLoadModel").load(rel(demo_models, "sd15_safetensors", "checkpoints"),
                                                               "none (training-free: base UNet)"))
    assert "Training-free" in report and model.appearance_unet is None and model.vae is None
    return model


@pytest.fixture(scope="module")
def full(pack, demo_models, loaded):
    motion = rel(demo_models, "motion_v2", "animatediff_models")
    (model,), _ = result(node(pack, "TCANMotionModule").patch(loaded, motion,
                                                              "none", 1.0))
    (model,), _ = result(node(pack, "TCANTemporalControlNet").patch(
        model, rel(demo_models, "controlnet_ldm", "controlnet"), "from motion module", 1.0, 0.0, 1.0))
    (model, _maps), _ = result(node(pack, "TCANPTM").patch(model, 3.0))
    return model


def test_load_with_an_appearance_unet_file(pack, demo_models):
    (model,), report = result(node(pack, "TCANLoadModel").load(
        rel(demo_models, "sd15_ckpt", "checkpoints"), rel(demo_models, "tcan_appearance_ckpt", "tcan")))
    assert model.appearance_unet is not None and "Appearance UNet from" in report
    assert model.appearance_unet is not model.unet


def test_patch_nodes_return_clones_and_leave_the_input_alone(pack, demo_models, loaded, full):
    assert loaded.patches == ()
    assert [p.key for p in full.patches] == ["motion", "controlnet", "ptm"]
    assert full.unet is loaded.unet


def test_motion_module_from_a_tcan_stage2_checkpoint_brings_its_lora(pack, demo_models, loaded):
    (model,), report = result(node(pack, "TCANMotionModule").patch(
        loaded, rel(demo_models, "motion_v2", "animatediff_models"), rel(demo_models, "tcan_unet_stage2_ckpt", "tcan"),
        0.5))
    assert [p.key for p in model.patches] == ["motion", "lora"]
    assert model.patch("lora").lora.strength == 0.5 and "APPA LoRA at strength 0.5" in report


def test_appa_lora_node(pack, demo_models, loaded):
    (model,), report = result(node(pack, "TCANAppaLora").patch(loaded, rel(demo_models, "lora_peft", "loras"), 0.7))
    assert model.patch("lora").lora.strength == pytest.approx(0.7) and "peft" in report


def test_a_lora_whose_keys_match_no_layer_is_an_error(pack, demo_models, loaded):
    from safetensors.torch import save_file

    path = demo_models.root / "loras" / "unrelated.safetensors"
    save_file({"some_other_net.layer.lora_A.weight": torch.zeros(4, 8),
               "some_other_net.layer.lora_B.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(ModelFormatError, match="does not fit this UNet.*some_other_net.layer"):
        node(pack, "TCANAppaLora").patch(loaded, "unrelated.safetensors", 1.0)


def test_temporal_controlnet_from_a_tcan_checkpoint_and_off(pack, demo_models, loaded):
    cn = node(pack, "TCANTemporalControlNet")
    (model,), report = result(cn.patch(loaded, rel(demo_models, "controlnet_ldm", "controlnet"),
                                       rel(demo_models, "tcan_controlnet_t_ckpt", "tcan"), 0.8, 0.1, 0.9))
    patch = model.patch("controlnet")
    assert patch.temporal is not None and (patch.strength, patch.start, patch.end) == (0.8, 0.1, 0.9)
    (model,), report = result(cn.patch(loaded, rel(demo_models, "controlnet_ldm", "controlnet"), "off", 1.0, 0.0, 1.0))
    assert model.patch("controlnet").temporal is None and "off" in report


def test_temporal_layers_from_the_motion_module_need_one(pack, demo_models, loaded):
    with pytest.raises(ValueError, match="connect TCAN Motion Module before TCAN Temporal ControlNet"):
        node(pack, "TCANTemporalControlNet").patch(loaded, rel(demo_models, "controlnet_ldm", "controlnet"),
                                                   "from motion module", 1.0, 0.0, 1.0)


def test_ptm_needs_a_motion_module_and_previews_each_window(pack, demo_models, loaded, full):
    with pytest.raises(ValueError, match="connect TCAN Motion Module before TCAN PTM"):
        node(pack, "TCANPTM").patch(loaded, 3.0)
    poses = torch.zeros(20, 32, 48, 3)
    poses[:, 10:20, 20:28] = 1.0
    (model, maps), report = result(node(pack, "TCANPTM").patch(full, 3.0, poses, 16, 4))
    assert maps.shape == (2, 32, 48, 3) and "2 window(s)" in report
    assert float(maps[0, 15, 24, 0]) == 1.0 and float(maps[0, 0, 0, 0]) < 1.0
    (_, flat), _ = result(node(pack, "TCANPTM").patch(full, 0.0, poses, 16, 4))
    assert bool((flat == 1.0).all())


def test_motion_module_for_another_base_is_refused_by_the_node(pack, demo_models, loaded):
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    from tcan_core.models.ldm_keys import motion_to_animatediff

    adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=2, use_motion_mid_block=False)
    save_file({k: v.contiguous() for k, v in motion_to_animatediff(adapter.state_dict()).items()},
              str(demo_models.root / "animatediff_models" / "mm_sdxl.safetensors"))
    with pytest.raises(WrongBaseModelError, match="SDXL"):
        node(pack, "TCANMotionModule").patch(loaded, "mm_sdxl.safetensors", "none", 1.0)


def sampler_inputs(demo_models, full, frames=3):
    vae = demo_models.modules["vae"]
    context = encode_empty_prompt(demo_models.modules["text_encoder"])
    conditioning = [[context, {"pooled_output": None}]]
    reference = torch.rand(1, SIZE, SIZE, 3)
    poses = torch.zeros(frames, SIZE, SIZE, 3)
    poses[:, 16:48, 24:32] = 1.0
    return dict(tcan_model=full, reference=reference, pose_images=poses, positive=conditioning,
                negative=conditioning, vae=DiffusersVAE(vae), seed=1, steps=2, cfg=7.5, scheduler="DDIM",
                width=SIZE, height=SIZE, context_length=16, context_overlap=4, closed_loop=False,
                initial_noise="independent per frame", reference_out_of_uncond=True)


def test_sampler_node_gives_frames_and_latent(pack, demo_models, full):
    (frames, latent), report = result(node(pack, "TCANSampler").sample(**sampler_inputs(demo_models, full)))
    assert frames.shape == (3, SIZE, SIZE, 3) and latent["samples"].shape == (3, 4, SIZE // 8, SIZE // 8)
    assert "3 frames at 64x64, 2 DDIM steps x 1 window(s)" in report
    assert full.patches and all(p.key in report for p in full.patches)


def test_sampler_node_refuses_a_bad_size_before_any_work(pack, demo_models, full):
    inputs = sampler_inputs(demo_models, full)
    inputs["height"] = 100
    with pytest.raises(ValueError, match="height must be a multiple of 8.*got 100.*96 and 104"):
        node(pack, "TCANSampler").sample(**inputs)


def test_sampler_node_refuses_conditioning_that_is_not_a_list(pack, demo_models, full):
    inputs = sampler_inputs(demo_models, full)
    inputs["positive"] = torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="CONDITIONING from CLIPTextEncode"):
        node(pack, "TCANSampler").sample(**inputs)


def test_appa_lora_node_reads_the_lora_inside_a_tcan_stage1_unet(pack, demo_models, loaded):
    name = "tcan/" + rel(demo_models, "tcan_unet_stage1_ckpt", "tcan")
    (model,), report = result(node(pack, "TCANAppaLora").patch(loaded, name, 1.0))
    assert model.patch("lora") is not None and "inside the TCAN UNet checkpoint" in report


def test_motion_module_node_needs_a_file(pack, demo_models, loaded):
    with pytest.raises(ValueError, match="has no file"):
        node(pack, "TCANMotionModule").patch(loaded, "none", "none", 1.0)
    (model,), _ = result(node(pack, "TCANMotionModule").patch(loaded, "none", rel(demo_models, "tcan_unet_stage2_ckpt",
                                                                                   "tcan"), 1.0))
    assert model.patch("motion") is not None
