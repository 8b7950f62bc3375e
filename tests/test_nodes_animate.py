"""The TCAN model nodes and the TCAN Sampler node on the tiny model tree, through the host's model folders:
each patch node returns a clone, files of every layout load, and bad inputs get their clear errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from tcan_core.animation.text import encode_empty_prompt
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.models.errors import ModelFormatError, WrongBaseModelError

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(pack, tmp_path_factory):
    """The complete tiny tree as the host's models root."""
    from tcan_core.tiny.tree import write_demo_tree

    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    tree = write_demo_tree(tmp_path_factory.mktemp("animate_models"))
    host.set_models_root(tree.root)
    yield tree
    host.set_models_root(None)


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def result(out):
    """(result tuple, report text) of a node return value."""
    return out["result"], out["ui"]["text"][0]


def rel(tree, key, folder):
    return tree.files[key].relative_to(tree.root / folder).as_posix()


@pytest.fixture(scope="module")
def loaded(pack, models):
    (model,), report = result(node(pack, "TCANLoadModel").load(rel(models, "sd15_safetensors", "checkpoints"),
                                                               "none (training-free: base UNet)"))
    assert "Training-free" in report and model.appearance_unet is None and model.vae is None
    return model


@pytest.fixture(scope="module")
def full(pack, models, loaded):
    (model,), _ = result(node(pack, "TCANMotionModule").patch(loaded, rel(models, "motion_v2", "animatediff_models"),
                                                              "none", 1.0))
    (model,), _ = result(node(pack, "TCANTemporalControlNet").patch(
        model, rel(models, "controlnet_ldm", "controlnet"), "from motion module", 1.0, 0.0, 1.0))
    (model, _maps), _ = result(node(pack, "TCANPTM").patch(model, 3.0))
    return model


def test_load_with_an_appearance_unet_file(pack, models):
    (model,), report = result(node(pack, "TCANLoadModel").load(
        rel(models, "sd15_ckpt", "checkpoints"), rel(models, "tcan_appearance_ckpt", "tcan")))
    assert model.appearance_unet is not None and "Appearance UNet from" in report
    assert model.appearance_unet is not model.unet


def test_patch_nodes_return_clones_and_leave_the_input_alone(pack, models, loaded, full):
    assert loaded.patches == ()
    assert [p.key for p in full.patches] == ["motion", "controlnet", "ptm"]
    assert full.unet is loaded.unet


def test_motion_module_from_a_tcan_stage2_checkpoint_brings_its_lora(pack, models, loaded):
    (model,), report = result(node(pack, "TCANMotionModule").patch(
        loaded, rel(models, "motion_v2", "animatediff_models"), rel(models, "tcan_unet_stage2_ckpt", "tcan"), 0.5))
    assert [p.key for p in model.patches] == ["motion", "lora"]
    assert model.patch("lora").lora.strength == 0.5 and "APPA LoRA at strength 0.5" in report


def test_appa_lora_node(pack, models, loaded):
    (model,), report = result(node(pack, "TCANAppaLora").patch(loaded, rel(models, "lora_peft", "loras"), 0.7))
    assert model.patch("lora").lora.strength == pytest.approx(0.7) and "peft" in report


def test_a_lora_whose_keys_match_no_layer_is_an_error(pack, models, loaded):
    from safetensors.torch import save_file

    path = models.root / "loras" / "unrelated.safetensors"
    save_file({"some_other_net.layer.lora_A.weight": torch.zeros(4, 8),
               "some_other_net.layer.lora_B.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(ModelFormatError, match="does not fit this UNet.*some_other_net.layer"):
        node(pack, "TCANAppaLora").patch(loaded, "unrelated.safetensors", 1.0)


def test_temporal_controlnet_from_a_tcan_checkpoint_and_off(pack, models, loaded):
    cn = node(pack, "TCANTemporalControlNet")
    (model,), report = result(cn.patch(loaded, rel(models, "controlnet_ldm", "controlnet"),
                                       rel(models, "tcan_controlnet_t_ckpt", "tcan"), 0.8, 0.1, 0.9))
    patch = model.patch("controlnet")
    assert patch.temporal is not None and (patch.strength, patch.start, patch.end) == (0.8, 0.1, 0.9)
    (model,), report = result(cn.patch(loaded, rel(models, "controlnet_ldm", "controlnet"), "off", 1.0, 0.0, 1.0))
    assert model.patch("controlnet").temporal is None and "off" in report


def test_temporal_layers_from_the_motion_module_need_one(pack, models, loaded):
    with pytest.raises(ValueError, match="connect TCAN Motion Module before TCAN Temporal ControlNet"):
        node(pack, "TCANTemporalControlNet").patch(loaded, rel(models, "controlnet_ldm", "controlnet"),
                                                   "from motion module", 1.0, 0.0, 1.0)


def test_ptm_needs_a_motion_module_and_previews_each_window(pack, models, loaded, full):
    with pytest.raises(ValueError, match="connect TCAN Motion Module before TCAN PTM"):
        node(pack, "TCANPTM").patch(loaded, 3.0)
    poses = torch.zeros(20, 32, 48, 3)
    poses[:, 10:20, 20:28] = 1.0
    (model, maps), report = result(node(pack, "TCANPTM").patch(full, 3.0, poses, 16, 4))
    assert maps.shape == (2, 32, 48, 3) and "2 window(s)" in report
    assert float(maps[0, 15, 24, 0]) == 1.0 and float(maps[0, 0, 0, 0]) < 1.0
    (_, flat), _ = result(node(pack, "TCANPTM").patch(full, 0.0, poses, 16, 4))
    assert bool((flat == 1.0).all())


def test_motion_module_for_another_base_is_refused_by_the_node(pack, models, loaded):
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    from tcan_core.models.ldm_keys import motion_to_animatediff

    adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=2, use_motion_mid_block=False)
    save_file({k: v.contiguous() for k, v in motion_to_animatediff(adapter.state_dict()).items()},
              str(models.root / "animatediff_models" / "mm_sdxl.safetensors"))
    with pytest.raises(WrongBaseModelError, match="SDXL"):
        node(pack, "TCANMotionModule").patch(loaded, "mm_sdxl.safetensors", "none", 1.0)


def sampler_inputs(models, full, frames=3):
    vae = models.modules["vae"]
    context = encode_empty_prompt(models.modules["text_encoder"])
    conditioning = [[context, {"pooled_output": None}]]
    reference = torch.rand(1, SIZE, SIZE, 3)
    poses = torch.zeros(frames, SIZE, SIZE, 3)
    poses[:, 16:48, 24:32] = 1.0
    return dict(tcan_model=full, reference=reference, pose_images=poses, positive=conditioning,
                negative=conditioning, vae=DiffusersVAE(vae), seed=1, steps=2, cfg=7.5, scheduler="DDIM",
                width=SIZE, height=SIZE, context_length=16, context_overlap=4, closed_loop=False,
                initial_noise="independent per frame", reference_out_of_uncond=True)


def test_sampler_node_gives_frames_and_latent(pack, models, full):
    (frames, latent), report = result(node(pack, "TCANSampler").sample(**sampler_inputs(models, full)))
    assert frames.shape == (3, SIZE, SIZE, 3) and latent["samples"].shape == (3, 4, SIZE // 8, SIZE // 8)
    assert "3 frames at 64x64, 2 DDIM steps x 1 window(s)" in report
    assert full.patches and all(p.key in report for p in full.patches)


def test_sampler_node_refuses_a_bad_size_before_any_work(pack, models, full):
    inputs = sampler_inputs(models, full)
    inputs["height"] = 100
    with pytest.raises(ValueError, match="height must be a multiple of 8.*got 100.*96 and 104"):
        node(pack, "TCANSampler").sample(**inputs)


def test_sampler_node_refuses_conditioning_that_is_not_a_list(pack, models, full):
    inputs = sampler_inputs(models, full)
    inputs["positive"] = torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="CONDITIONING from CLIPTextEncode"):
        node(pack, "TCANSampler").sample(**inputs)


def test_appa_lora_node_reads_the_lora_inside_a_tcan_stage1_unet(pack, models, loaded):
    name = "tcan/" + rel(models, "tcan_unet_stage1_ckpt", "tcan")
    (model,), report = result(node(pack, "TCANAppaLora").patch(loaded, name, 1.0))
    assert model.patch("lora") is not None and "inside the TCAN UNet checkpoint" in report


def test_motion_module_node_needs_a_file(pack, models, loaded):
    with pytest.raises(ValueError, match="has no file"):
        node(pack, "TCANMotionModule").patch(loaded, "none", "none", 1.0)
    (model,), _ = result(node(pack, "TCANMotionModule").patch(loaded, "none", rel(models, "tcan_unet_stage2_ckpt",
                                                                                   "tcan"), 1.0))
    assert model.patch("motion") is not None
