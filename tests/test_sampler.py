"""TCAN sampler on tiny models: parity with the unpatched paths, determinism, windows, no leaking patches,
the reference really conditions the frames, and a clear error for each bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tcan_core.animation.controlnet_t import TemporalLayers
from tcan_core.animation.model import TCANModel
from tcan_core.animation.patches import AppaLoraPatch, ControlNetPatch, MotionPatch, PTMPatch
from tcan_core.animation.sampler import (NOISE_REPEATED, SamplerSettings, SamplingCancelled, decode_frames,
                                         fit_images, initial_noise, sample_animation)
from tcan_core.animation.schedulers import SCHEDULERS, make_scheduler
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.models.lora import LoraPatch, appa_targets, parse_lora_state_dict
from tcan_core.tiny.lora import peft_state_dict, tiny_lora_factors

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full(tiny_parts, tiny_model):
    """Motion module, temporal ControlNet shared with it, PTM: the training-free TCAN graph."""
    adapter = tiny_parts["adapter"]
    return (tiny_model.with_patch(MotionPatch(adapter, "tiny motion"))
            .with_patch(ControlNetPatch(tiny_parts["controlnet"], "tiny controlnet",
                                        TemporalLayers.from_motion_adapter(adapter)))
            .with_patch(PTMPatch(3.0)))


def reference_image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear").movedim(1, -1)


def pose_images(frames: int, size: tuple[int, int] = (SIZE, SIZE)) -> torch.Tensor:
    """A white bar walking right on black: something a PTM and a ControlNet can see."""
    height, width = size
    poses = torch.zeros(frames, height, width, 3)
    for f in range(frames):
        x = (8 + 2 * f) % (width - 12)
        poses[f, height // 4: 3 * height // 4, x:x + 8] = 1.0
    return poses


def run(model, tiny_parts, frames=4, reference=None, poses=None, **settings):
    options = dict(width=SIZE, height=SIZE, steps=2, context_length=4, context_overlap=1)
    options.update(settings)
    return sample_animation(model, reference_image() if reference is None else reference,
                            pose_images(frames) if poses is None else poses, tiny_parts["context"],
                            tiny_parts["context"],
                            DiffusersVAE(tiny_parts["vae"]), SamplerSettings(**options)).frames


def test_output_shapes_and_range(full, tiny_parts):
    result = sample_animation(full, reference_image(), pose_images(5), tiny_parts["context"], tiny_parts["context"],
                              DiffusersVAE(tiny_parts["vae"]), SamplerSettings(width=SIZE, height=SIZE, steps=2))
    assert result.frames.shape == (5, SIZE, SIZE, 3) and result.frames.device.type == "cpu"
    assert result.latents.shape == (5, 4, SIZE // 8, SIZE // 8)
    assert float(result.frames.min()) >= 0.0 and float(result.frames.max()) <= 1.0


def test_same_seed_same_frames_other_seed_other_frames(full, tiny_parts):
    a = run(full, tiny_parts, seed=3)
    assert torch.equal(a, run(full, tiny_parts, seed=3))
    assert not torch.equal(a, run(full, tiny_parts, seed=4))


@pytest.mark.parametrize("frames", range(1, 41))
def test_any_frame_count_with_context_16_overlap_4(tiny_model, tiny_parts, frames):
    model = tiny_model.with_patch(MotionPatch(tiny_parts["adapter"], "tiny motion"))
    out = run(model, tiny_parts, frames=frames, steps=1, cfg=1.0, context_length=16, context_overlap=4)
    assert out.shape[0] == frames and bool(torch.isfinite(out).all())


def test_one_window_covering_the_clip_equals_a_longer_window(full, tiny_parts):
    exact = run(full, tiny_parts, frames=6, context_length=6)
    assert torch.equal(exact, run(full, tiny_parts, frames=6, context_length=16))
    assert torch.equal(exact, run(full, tiny_parts, frames=6, context_length=6, closed_loop=True))


def test_windows_change_a_long_clip_and_closed_loop_changes_it_again(full, tiny_parts):
    whole = run(full, tiny_parts, frames=8, context_length=8)
    windowed = run(full, tiny_parts, frames=8, context_length=4, context_overlap=2)
    looped = run(full, tiny_parts, frames=8, context_length=4, context_overlap=2, closed_loop=True)
    assert not torch.equal(whole, windowed) and not torch.equal(windowed, looped)


def test_ptm_tau_zero_equals_no_ptm(tiny_parts, tiny_model):
    motion = tiny_model.with_patch(MotionPatch(tiny_parts["adapter"], "tiny motion"))
    plain = run(motion, tiny_parts)
    assert torch.equal(plain, run(motion.with_patch(PTMPatch(0.0)), tiny_parts))
    assert not torch.equal(plain, run(motion.with_patch(PTMPatch(3.0)), tiny_parts))


def tiny_lora(unet) -> LoraPatch:
    factors = tiny_lora_factors(unet, appa_targets(unet), rank=4, seed=5)
    factors = {k: (down * 50, up * 50) for k, (down, up) in factors.items()}
    return LoraPatch(parse_lora_state_dict(peft_state_dict(factors), unet, "tiny APPA"), 1.0)


def test_lora_strength_zero_equals_no_lora(tiny_parts, tiny_model):
    lora = tiny_lora(tiny_parts["unet"])
    plain = run(tiny_model, tiny_parts)
    assert torch.equal(plain, run(tiny_model.with_patch(AppaLoraPatch(lora.with_strength(0.0))), tiny_parts))
    assert not torch.equal(plain, run(tiny_model.with_patch(AppaLoraPatch(lora)), tiny_parts))


def test_temporal_controlnet_with_zeroed_layers_equals_the_frozen_controlnet(tiny_parts, tiny_model):
    adapter = copy.deepcopy(tiny_parts["adapter"])
    zeroed = TemporalLayers.from_motion_adapter(copy.deepcopy(adapter))
    with torch.no_grad():
        for name, param in zeroed.named_parameters():
            if "proj_out" in name:
                param.zero_()
    motion = tiny_model.with_patch(MotionPatch(adapter, "tiny motion"))
    frozen = run(motion.with_patch(ControlNetPatch(tiny_parts["controlnet"], "cn")), tiny_parts)
    with_zeroed = run(motion.with_patch(ControlNetPatch(tiny_parts["controlnet"], "cn", zeroed)), tiny_parts)
    torch.testing.assert_close(with_zeroed, frozen, rtol=0, atol=1e-6)
    shared = run(motion.with_patch(ControlNetPatch(tiny_parts["controlnet"], "cn",
                                                   TemporalLayers.from_motion_adapter(adapter))),
                 tiny_parts)
    assert (shared - frozen).abs().max() > 1e-4


def test_controlnet_changes_the_frames_and_strength_zero_is_no_controlnet(tiny_parts, tiny_model):
    plain = run(tiny_model, tiny_parts)
    controlnet = tiny_parts["controlnet"]
    assert torch.equal(plain, run(tiny_model.with_patch(ControlNetPatch(controlnet, "cn", strength=0.0)), tiny_parts))
    assert not torch.equal(plain, run(tiny_model.with_patch(ControlNetPatch(controlnet, "cn", strength=2.0)),
                                      tiny_parts))


def test_the_reference_conditions_the_frames(full, tiny_parts):
    a = run(full, tiny_parts, reference=reference_image(0))
    assert not torch.equal(a, run(full, tiny_parts, reference=reference_image(1)))
    assert not torch.equal(a, run(full, tiny_parts, reference_out_of_uncond=False))


def test_appearance_unet_from_a_file_is_used(tiny_parts, full):
    other = copy.deepcopy(tiny_parts["unet"])
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    separate = TCANModel(full.unet, full.vae, full.text_encoder, "tiny", appearance_unet=other, patches=full.patches)
    assert not torch.equal(run(full, tiny_parts), run(separate, tiny_parts))
    shared_copy = TCANModel(full.unet, full.vae, full.text_encoder, "tiny",
                            appearance_unet=copy.deepcopy(tiny_parts["unet"]), patches=full.patches)
    torch.testing.assert_close(run(shared_copy, tiny_parts), run(full, tiny_parts), rtol=0, atol=1e-5)


SCHEDULER_CLASSES = {"DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler",
                     "Euler ancestral": "EulerAncestralDiscreteScheduler",
                     "DPM++ 2M": "DPMSolverMultistepScheduler", "UniPC": "UniPCMultistepScheduler"}


@pytest.fixture(scope="module")
def every_scheduler(full, tiny_parts):
    return {name: run(full, tiny_parts, scheduler=name, steps=3) for name in SCHEDULERS}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_samples(every_scheduler, scheduler):
    assert type(make_scheduler(scheduler)).__name__ == SCHEDULER_CLASSES[scheduler]
    out = every_scheduler[scheduler]
    assert bool(torch.isfinite(out).all())
    # Another integrator on the same noise and model must give other frames.
    others = [name for name in SCHEDULERS if name != scheduler]
    assert all(not torch.equal(out, every_scheduler[name]) for name in others)


def test_repeated_window_noise_repeats():
    noise = initial_noise(10, (4, 2, 2), seed=1, mode=NOISE_REPEATED, window=4)
    assert torch.equal(noise[0], noise[4]) and torch.equal(noise[1], noise[9])
    independent = initial_noise(10, (4, 2, 2), seed=1, mode="independent per frame", window=4)
    assert not torch.equal(independent[0], independent[4])


def weights(model):
    modules = [model.unet, model.patch("motion").adapter, model.patch("controlnet").controlnet]
    return [p.detach().clone() for m in modules for p in m.parameters()]


def processors(unet):
    return {name: type(p) for name, p in unet.attn_processors.items()}


def test_a_cancelled_run_leaves_nothing_behind(full, tiny_parts):
    lora = tiny_lora(tiny_parts["unet"])
    model = full.with_patch(AppaLoraPatch(lora))
    clean = run(model, tiny_parts, frames=6)
    before, procs = weights(model), processors(tiny_parts["unet"])
    hooks = sum(len(m._forward_hooks) for m in tiny_parts["unet"].modules())
    calls = {"n": 0}

    def cancel_on_third():
        calls["n"] += 1
        if calls["n"] == 3:
            raise SamplingCancelled("cancelled")

    with pytest.raises(SamplingCancelled):
        sample_animation(model, reference_image(), pose_images(6), tiny_parts["context"], tiny_parts["context"],
                         DiffusersVAE(tiny_parts["vae"]),
                         SamplerSettings(width=SIZE, height=SIZE, steps=2, context_length=4, context_overlap=1),
                         check_cancel=cancel_on_third)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert processors(tiny_parts["unet"]) == procs
    assert sum(len(m._forward_hooks) for m in tiny_parts["unet"].modules()) == hooks
    assert torch.equal(run(model, tiny_parts, frames=6), clean)


def test_two_clones_sampled_alternately_keep_their_own_results(full, tiny_parts):
    lora = tiny_lora(tiny_parts["unet"])
    a, b = full.with_patch(AppaLoraPatch(lora)), full.with_patch(PTMPatch(6.0))
    alone_a, alone_b = run(a, tiny_parts), run(b, tiny_parts)
    assert torch.equal(run(b, tiny_parts), alone_b) and torch.equal(run(a, tiny_parts), alone_a)
    assert not torch.equal(alone_a, alone_b)


def test_calibration_adds_the_calibrated_reference(full, tiny_parts):
    from tcan_core.demo_scene import character_image, character_pose, driving_dance
    from tcan_core.pose.retarget import retarget_poses
    from tcan_core.tpc import calibrate

    character = character_pose(64, 64)
    reference = character_image(character).astype(np.float32) / 255.0
    driving = retarget_poses(character, driving_dance(frames=4, width=64, height=64), canvas="reference").poses
    calibration = calibrate(reference, character, driving, keypoint_set="body", sparsity=2)
    ref = torch.from_numpy(reference)[None]
    options = SamplerSettings(width=SIZE, height=SIZE, steps=2, context_length=4, context_overlap=1)
    plain = sample_animation(full, ref, pose_images(4), tiny_parts["context"], tiny_parts["context"],
                             DiffusersVAE(tiny_parts["vae"]), options).frames
    calibrated = sample_animation(full, ref, pose_images(4), tiny_parts["context"], tiny_parts["context"],
                                  DiffusersVAE(tiny_parts["vae"]), options, calibration=calibration).frames
    assert bool(torch.isfinite(calibrated).all()) and not torch.equal(plain, calibrated)
    with pytest.raises(ValueError, match="calibration covers 4 driving frames but 3 pose images"):
        sample_animation(full, ref, pose_images(3), tiny_parts["context"], tiny_parts["context"],
                         DiffusersVAE(tiny_parts["vae"]),
                         options, calibration=calibration)


# Bad input -> clear error.

def test_width_not_a_multiple_of_8_names_the_nearest_sizes(full, tiny_parts):
    with pytest.raises(ValueError, match="width must be a multiple of 8.*got 500.*496 and 504"):
        run(full, tiny_parts, width=500)
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        run(full, tiny_parts, height=70)


def test_zero_pose_frames(full, tiny_parts):
    with pytest.raises(ValueError, match="0 frames"):
        run(full, tiny_parts, poses=torch.zeros(0, SIZE, SIZE, 3))


def test_pose_frames_of_another_aspect_are_refused_with_a_size_to_use(full, tiny_parts):
    with pytest.raises(ValueError, match=r"pose images are 64x128 .*set width x height to \d+x\d+"):
        run(full, tiny_parts, poses=pose_images(2, (128, 64)))


def test_pose_frames_of_the_same_aspect_are_resized(full, tiny_parts):
    big = pose_images(3, (128, 128))
    assert fit_images(big, SIZE, SIZE, "pose images").shape == (3, SIZE, SIZE, 3)
    assert run(full, tiny_parts, frames=3, poses=big).shape == (3, SIZE, SIZE, 3)


def test_a_reference_batch_is_refused(full, tiny_parts):
    with pytest.raises(ValueError, match="batch of 2 images.*ImageFromBatch"):
        run(full, tiny_parts, reference=torch.cat([reference_image(0), reference_image(1)]))


@pytest.mark.parametrize("width, base_name", [(2048, "SDXL"), (1024, "SD2.x")])
def test_conditioning_from_another_text_encoder(full, tiny_parts, width, base_name):
    bad = torch.zeros(1, 77, width)
    with pytest.raises(ValueError, match=f"{width} wide.*{base_name}.*SD1.5"):
        sample_animation(full, reference_image(), pose_images(2), bad, tiny_parts["context"],
                         DiffusersVAE(tiny_parts["vae"]),
                         SamplerSettings(width=SIZE, height=SIZE, steps=1))


def test_context_longer_than_the_motion_module_can_see(full, tiny_parts):
    with pytest.raises(ValueError, match="context length 40 is longer than the motion module's 32-frame"):
        run(full, tiny_parts, frames=40, context_length=40)


class NaNVAE:
    def decode(self, latents):
        return torch.full((latents.shape[0], 8, 8, 3), float("nan"))


def test_nan_from_the_vae_names_the_vae_and_suggests_fp32():
    with pytest.raises(FloatingPointError, match="VAE decoded NaN.*frames 0..1.*float32"):
        decode_frames(NaNVAE(), torch.zeros(2, 4, 1, 1))


def test_face_id_patch_in_the_sampler_scale_zero_is_no_patch(full, tiny_parts, tmp_path):
    from tcan_core.face import FaceIDPatch, clip_image_embeddings, load_id_animator
    from tcan_core.tiny.face_adapter import build_tiny_clip_vision, write_tiny_id_animator

    unet = tiny_parts["unet"]
    weights = load_id_animator(write_tiny_id_animator(tmp_path / "animator.ckpt", unet), unet)
    faces = clip_image_embeddings(build_tiny_clip_vision(), torch.rand(1, 224, 224, 3,
                                                                       generator=torch.Generator().manual_seed(2)))
    plain = run(full, tiny_parts)
    assert torch.equal(plain, run(full.with_patch(FaceIDPatch(weights, faces, scale=0.0)), tiny_parts))
    with_face = run(full.with_patch(FaceIDPatch(weights, faces, scale=0.8)), tiny_parts)
    assert not torch.equal(plain, with_face)
    assert torch.equal(run(full, tiny_parts), plain)
