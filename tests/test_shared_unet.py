"""A TCAN model whose UNet shares a host's LDM weights (the MODEL path's library half): the same frames as
the file path, no copy while bound, nothing held after, and the host's tensors unchanged by sampling."""

from __future__ import annotations

import pytest
import torch

from tcan_core.animation.build import load_tcan_model
from tcan_core.animation.patches import AppaLoraPatch, MotionPatch, PTMPatch
from tcan_core.animation.sampler import SamplerSettings, sample_animation
from tcan_core.animation.shared_unet import tcan_model_sharing_unet, unet_weights_bound
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.models.detect import UNET
from tcan_core.models.lora import LoraPatch, appa_targets, parse_lora_state_dict
from tcan_core.models.state_dict import LazyTensors, is_bound
from tcan_core.tiny.lora import peft_state_dict, tiny_lora_factors

from test_sampler import pose_images, reference_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def host_weights(tiny_tree):
    """The tiny checkpoint's UNet tensors under LDM names without prefix, as ComfyUI's diffusion_model holds them."""
    lazy = LazyTensors(tiny_tree.files["sd15_safetensors"])
    return {k[len(UNET):]: lazy[k] for k in lazy if k.startswith(UNET)}


def _settings():
    return SamplerSettings(width=64, height=64, steps=2, context_length=4, context_overlap=1)


def _patched(model, tiny_parts):
    return model.with_patch(MotionPatch(tiny_parts["adapter"], "tiny motion")).with_patch(PTMPatch(3.0))


def _sample(model, tiny_parts):
    return sample_animation(model, reference_image(), pose_images(4), tiny_parts["context"], tiny_parts["context"],
                            DiffusersVAE(tiny_parts["vae"]), _settings()).frames


def test_shared_unet_gives_the_file_paths_frames_without_copying(tiny_tree, tiny_parts, host_weights):
    from_file, _ = load_tcan_model(tiny_tree.files["sd15_safetensors"])
    shared, key_map, report = tcan_model_sharing_unet({k: tuple(v.shape) for k, v in host_weights.items()},
                                                      torch.float32, "ComfyUI MODEL")
    assert "no copy" in report and not is_bound(shared.unet)
    before = {k: v.clone() for k, v in host_weights.items()}
    expected = _sample(_patched(from_file, tiny_parts), tiny_parts)
    with unet_weights_bound(shared.unet, key_map, host_weights.__getitem__):
        for name, param in shared.unet.named_parameters():
            assert param.data_ptr() == host_weights[key_map[name]].data_ptr(), name
        frames = _sample(_patched(shared, tiny_parts), tiny_parts)
    assert torch.equal(frames, expected)
    assert not is_bound(shared.unet), "the UNet still holds the host's tensors after the call"
    assert all(torch.equal(host_weights[k], before[k]) for k in before), "sampling changed the host's weights"


def test_lora_on_a_shared_unet_restores_the_hosts_tensors_exactly(tiny_tree, tiny_parts, host_weights):
    shared, key_map, _ = tcan_model_sharing_unet({k: tuple(v.shape) for k, v in host_weights.items()},
                                                 torch.float32, "ComfyUI MODEL")
    before = {k: v.clone() for k, v in host_weights.items()}
    with unet_weights_bound(shared.unet, key_map, host_weights.__getitem__):
        factors = tiny_lora_factors(shared.unet, appa_targets(shared.unet), seed=3)
        lora = parse_lora_state_dict(peft_state_dict(factors), shared.unet, source="tiny lora")
        plain = _sample(_patched(shared, tiny_parts), tiny_parts)
        with_lora = _sample(_patched(shared, tiny_parts).with_patch(AppaLoraPatch(LoraPatch(lora, 1.0))), tiny_parts)
    assert not torch.equal(plain, with_lora)
    assert all(torch.equal(host_weights[k], before[k]) for k in before)


def test_a_float8_host_weight_is_cast_for_the_call_only(host_weights):
    shared, key_map, _ = tcan_model_sharing_unet({k: tuple(v.shape) for k, v in host_weights.items()},
                                                 torch.float32, "ComfyUI MODEL")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in host_weights.items()}
    with unet_weights_bound(shared.unet, key_map, fp8.__getitem__) as unet:
        assert {p.dtype for p in unet.parameters()} == {torch.float32}
    assert not is_bound(shared.unet)


def test_binding_twice_is_refused(host_weights):
    shared, key_map, _ = tcan_model_sharing_unet({k: tuple(v.shape) for k, v in host_weights.items()},
                                                 torch.float32, "ComfyUI MODEL")
    with unet_weights_bound(shared.unet, key_map, host_weights.__getitem__):
        with pytest.raises(RuntimeError, match="already has weights bound"):
            with unet_weights_bound(shared.unet, key_map, host_weights.__getitem__):
                pass


def test_weights_of_another_architecture_name_the_keys(host_weights):
    from tcan_core.models.errors import ModelFormatError

    shapes = {k: tuple(v.shape) for k, v in host_weights.items()}
    shapes["input_blocks.1.1.extra_layer.weight"] = (4, 4)
    with pytest.raises(ModelFormatError, match="do not fit an SD1.5 UNet.*unexpected.*extra_layer"):
        tcan_model_sharing_unet(shapes, torch.float32, "ComfyUI MODEL")


def test_an_sdxl_or_inpainting_unet_is_refused_with_what_it_is(host_weights):
    from tcan_core.models.errors import ModelFormatError, WrongBaseModelError

    shapes = {k: tuple(v.shape) for k, v in host_weights.items()}
    wide = {k: (s[:1] + (2048,) if k.endswith("attn2.to_k.weight") else s) for k, s in shapes.items()}
    with pytest.raises(WrongBaseModelError, match="SDXL checkpoint.*SD1.5 checkpoint"):
        tcan_model_sharing_unet(wide, torch.float32, "ComfyUI MODEL")
    conv_in = shapes["input_blocks.0.0.weight"]
    inpaint = {**shapes, "input_blocks.0.0.weight": (conv_in[0], 9, *conv_in[2:])}
    with pytest.raises(ModelFormatError, match="9-channel SD1.5 UNet"):
        tcan_model_sharing_unet(inpaint, torch.float32, "ComfyUI MODEL")


class _NaNUNet(torch.nn.Module):
    """Any UNet call returns NaN: what an overflow or a corrupt weight file gives."""

    def __init__(self, unet, dtype):
        super().__init__()
        self.config = unet.config
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)

    def forward(self, sample, *args, **kwargs):
        return (torch.full_like(sample, float("nan")),)


@pytest.mark.parametrize("dtype, advice", [
    (torch.float32, "float32 does not overflow here.*corrupt"),
    (torch.float16, "run the UNet in float32 or bfloat16"),
    (torch.bfloat16, r"run the UNet in float32 \(ComfyUI: --fp32-unet\)"),
])
def test_nan_latents_advice_fits_the_unet_dtype(tiny_parts, dtype, advice):
    from tcan_core.animation.model import TCANModel

    model = TCANModel(_NaNUNet(tiny_parts["unet"], dtype), None, None, "nan")
    context = tiny_parts["context"].to(dtype)
    with pytest.raises(FloatingPointError, match=f"model dtype {dtype}\\); {advice}"):
        sample_animation(model, None, pose_images(1), context, context, DiffusersVAE(tiny_parts["vae"]),
                         SamplerSettings(width=64, height=64, steps=1, context_length=1, context_overlap=0))


def test_lazy_reads_give_safetensors_own_tensors_and_shapes_without_reading(tiny_tree, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tiny_tree.files["sd15_safetensors"]
    lazy, full = LazyTensors(path), load_file(str(path))
    assert lazy.shapes == {k: tuple(v.shape) for k, v in full.items()}
    assert all(torch.equal(lazy[k], full[k]) and lazy[k].dtype == full[k].dtype for k in full)
    mixed = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "i64": torch.arange(7), "f16": torch.randn(2, 2).half()}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    again = LazyTensors(tmp_path / "mixed.safetensors")
    assert all(torch.equal(again[k], v) and again[k].dtype == v.dtype for k, v in mixed.items())
