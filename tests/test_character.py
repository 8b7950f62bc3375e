"""TCAN Character Image (TIFF's first stage): motion and reference attention off, the pose and face patches on."""

from __future__ import annotations

import pytest
import torch

from tcan_core.animation.controlnet_t import TemporalLayers
from tcan_core.animation.model import TCANModel
from tcan_core.animation.patches import ControlNetPatch, MotionPatch, PTMPatch
from tcan_core.animation.sampler import SamplerSettings, sample_animation
from tcan_core.animation.text import encode_empty_prompt
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.face import FaceIDPatch, clip_image_embeddings, load_id_animator
from tcan_core.face.character import character_image
from tcan_core.tiny.face_adapter import build_tiny_clip_vision, write_tiny_id_animator
from tcan_core.tiny.sd15 import build_tiny_controlnet, build_tiny_motion_adapter, build_tiny_sd15

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    unet, vae, text = build_tiny_sd15()
    return dict(unet=unet, vae=vae, text=text, controlnet=build_tiny_controlnet(),
                adapter=build_tiny_motion_adapter("v2"), context=encode_empty_prompt(text))


@pytest.fixture(scope="module")
def base(parts):
    return TCANModel(parts["unet"], parts["vae"], parts["text"], "tiny")


@pytest.fixture(scope="module")
def animation_model(parts, base):
    adapter = parts["adapter"]
    return (base.with_patch(MotionPatch(adapter, "tiny motion"))
            .with_patch(ControlNetPatch(parts["controlnet"], "tiny controlnet", TemporalLayers.from_motion_adapter(adapter)))
            .with_patch(PTMPatch(3.0)))


def poses(frames: int = 2) -> torch.Tensor:
    out = torch.zeros(frames, SIZE, SIZE, 3)
    for f in range(frames):
        out[f, 16:48, 8 + 12 * f:16 + 12 * f] = 1.0
    return out


def make(model, parts, pose_images, **settings):
    options = dict(width=SIZE, height=SIZE, steps=2)
    options.update(settings)
    return character_image(model, pose_images, parts["context"], parts["context"], DiffusersVAE(parts["vae"]),
                           SamplerSettings(**options))


def test_motion_module_and_temporal_controlnet_are_off(animation_model, base, parts):
    frozen = base.with_patch(ControlNetPatch(parts["controlnet"], "tiny controlnet", None))
    images = make(animation_model, parts, poses()).frames
    assert images.shape == (2, SIZE, SIZE, 3)
    assert torch.equal(images, make(frozen, parts, poses()).frames)


def test_each_pose_gives_its_own_image(animation_model, parts):
    first = make(animation_model, parts, poses()).frames
    moved = poses()
    moved[1] = moved[1].flip(1)
    second = make(animation_model, parts, moved).frames
    assert torch.equal(first[0], second[0])
    assert not torch.equal(first[1], second[1])


def test_no_reference_attention_and_no_appearance_pass(parts, base):
    appearance, _, _ = build_tiny_sd15()
    calls = []
    appearance.register_forward_hook(lambda *_: calls.append(1))
    model = TCANModel(parts["unet"], parts["vae"], parts["text"], "tiny", appearance_unet=appearance)
    processors = {k: type(v) for k, v in parts["unet"].attn_processors.items()}
    make(model, parts, poses(1))
    assert calls == []
    assert {k: type(v) for k, v in parts["unet"].attn_processors.items()} == processors


def test_the_pose_and_the_face_change_the_image(parts, base, tmp_path):
    plain = make(base, parts, poses(1)).frames
    posed = base.with_patch(ControlNetPatch(parts["controlnet"], "tiny controlnet", None))
    assert not torch.equal(plain, make(posed, parts, poses(1)).frames)
    weights = load_id_animator(write_tiny_id_animator(tmp_path / "animator.ckpt", parts["unet"]), parts["unet"])
    crops = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(2))
    face = FaceIDPatch(weights, clip_image_embeddings(build_tiny_clip_vision(), crops), scale=0.8)
    assert not torch.equal(plain, make(base.with_patch(face), parts, poses(1)).frames)
    assert torch.equal(plain, make(base.with_patch(FaceIDPatch(weights, face.embeddings, scale=0.0)), parts,
                                   poses(1)).frames)


def test_notes_say_what_is_missing(base, parts):
    notes = " ".join(make(base, parts, poses(1), steps=1).notes)
    assert "No Face ID patch" in notes and "No ControlNet" in notes


def test_a_calibration_without_reference_is_refused(base, parts):
    class Calibration:
        num_frames = 1

    with pytest.raises(ValueError, match="calibration needs the reference"):
        sample_animation(base, None, poses(1), parts["context"], parts["context"], DiffusersVAE(parts["vae"]),
                         SamplerSettings(width=SIZE, height=SIZE, steps=1), calibration=Calibration())
