"""TCAN Character Image (TIFF's first stage): motion and reference attention off, the pose and face patches on."""

from __future__ import annotations

import pytest
import torch

from tcan_core.animation.controlnet_t import TemporalLayers
from tcan_core.animation.model import TCANModel
from tcan_core.animation.patches import ControlNetPatch, MotionPatch, PTMPatch
from tcan_core.animation.sampler import SamplerSettings, sample_animation
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.face import FaceIDPatch, clip_image_embeddings, load_id_animator
from tcan_core.face.character import character_image
from tcan_core.tiny.face_adapter import build_tiny_clip_vision, write_tiny_id_animator
from tcan_core.tiny.sd15 import build_tiny_sd15

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def animation_model(tiny_parts, tiny_model):
    adapter = tiny_parts["adapter"]
    return (tiny_model.with_patch(MotionPatch(adapter, "tiny motion"))
            .with_patch(ControlNetPatch(tiny_parts["controlnet"], "tiny controlnet",
                                        TemporalLayers.from_motion_adapter(adapter)))
            .with_patch(PTMPatch(3.0)))


def poses(frames: int = 2) -> torch.Tensor:
    out = torch.zeros(frames, SIZE, SIZE, 3)
    for f in range(frames):
        out[f, 16:48, 8 + 12 * f:16 + 12 * f] = 1.0
    return out


def make(model, tiny_parts, pose_images, **settings):
    options = dict(width=SIZE, height=SIZE, steps=2)
    options.update(settings)
    return character_image(model, pose_images, tiny_parts["context"], tiny_parts["context"],
                           DiffusersVAE(tiny_parts["vae"]),
                           SamplerSettings(**options))


def test_motion_module_and_temporal_controlnet_are_off(animation_model, tiny_model, tiny_parts):
    frozen = tiny_model.with_patch(ControlNetPatch(tiny_parts["controlnet"], "tiny controlnet", None))
    images = make(animation_model, tiny_parts, poses()).frames
    assert images.shape == (2, SIZE, SIZE, 3)
    assert torch.equal(images, make(frozen, tiny_parts, poses()).frames)


def test_each_pose_gives_its_own_image(animation_model, tiny_parts):
    first = make(animation_model, tiny_parts, poses()).frames
    moved = poses()
    moved[1] = moved[1].flip(1)
    second = make(animation_model, tiny_parts, moved).frames
    assert torch.equal(first[0], second[0])
    assert not torch.equal(first[1], second[1])


def test_no_reference_attention_and_no_appearance_pass(tiny_parts, tiny_model):
    appearance, _, _ = build_tiny_sd15()
    calls = []
    appearance.register_forward_hook(lambda *_: calls.append(1))
    model = TCANModel(tiny_parts["unet"], tiny_parts["vae"], tiny_parts["text"], "tiny", appearance_unet=appearance)
    processors = {k: type(v) for k, v in tiny_parts["unet"].attn_processors.items()}
    make(model, tiny_parts, poses(1))
    assert calls == []
    assert {k: type(v) for k, v in tiny_parts["unet"].attn_processors.items()} == processors


def test_the_pose_and_the_face_change_the_image(tiny_parts, tiny_model, tmp_path):
    plain = make(tiny_model, tiny_parts, poses(1)).frames
    posed = tiny_model.with_patch(ControlNetPatch(tiny_parts["controlnet"], "tiny controlnet", None))
    assert not torch.equal(plain, make(posed, tiny_parts, poses(1)).frames)
    unet = tiny_parts["unet"]
    weights = load_id_animator(write_tiny_id_animator(tmp_path / "animator.ckpt", unet), unet)
    crops = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(2))
    face = FaceIDPatch(weights, clip_image_embeddings(build_tiny_clip_vision(), crops), scale=0.8)
    assert not torch.equal(plain, make(tiny_model.with_patch(face), tiny_parts, poses(1)).frames)
    assert torch.equal(plain, make(tiny_model.with_patch(FaceIDPatch(weights, face.embeddings, scale=0.0)), tiny_parts,
                                   poses(1)).frames)


def test_notes_say_what_is_missing(tiny_model, tiny_parts):
    notes = " ".join(make(tiny_model, tiny_parts, poses(1), steps=1).notes)
    assert "No Face ID patch" in notes and "No ControlNet" in notes


def test_a_calibration_without_reference_is_refused(tiny_model, tiny_parts):
    class Calibration:
        num_frames = 1

    with pytest.raises(ValueError, match="calibration needs the reference"):
        sample_animation(tiny_model, None, poses(1), tiny_parts["context"], tiny_parts["context"],
                         DiffusersVAE(tiny_parts["vae"]),
                         SamplerSettings(width=SIZE, height=SIZE, steps=1), calibration=Calibration())
