"""Issue 11: what failed when the pack was tried as a new user would; one test per failure, each named
after what the user does."""

from __future__ import annotations

import pytest
import torch

from conftest import node
from tcan_core.animation.sampler import SamplerSettings, fit_images, sample_animation
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.pose_format import parse_pose_keypoint

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


# --- 9: every seed the node allows ------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 2**64 - 2, 2**64 - 1])
def test_the_largest_seed_the_sampler_node_allows_samples(pack, tiny_model, tiny_parts, seed):
    top = pack.NODE_CLASS_MAPPINGS["TCANSampler"].INPUT_TYPES()["required"]["seed"][1]["max"]
    assert seed <= top
    poses = torch.zeros(2, SIZE, SIZE, 3)
    poses[:, 16:48, 24:40] = 1.0
    # Euler ancestral draws fresh noise every step from a second generator.
    settings = SamplerSettings(seed=seed, steps=2, width=SIZE, height=SIZE, scheduler="Euler ancestral",
                               context_length=2, context_overlap=0)
    out = sample_animation(tiny_model, None, poses, tiny_parts["context"], tiny_parts["context"],
                           DiffusersVAE(tiny_parts["vae"]), settings).frames
    assert out.shape == (2, SIZE, SIZE, 3) and bool(torch.isfinite(out).all())


# --- 5: Pose Smooth on poses without a person --------------------------------------------------

def _empty_poses(frames: int = 3) -> list[dict]:
    return [{"canvas_width": 64, "canvas_height": 64, "people": []} for _ in range(frames)]


def test_pose_smooth_without_a_person_in_any_frame_says_so(pack):
    with pytest.raises(ValueError, match="no person in any of its 3 frame"):
        node(pack, "TCANPoseSmooth").smooth(_empty_poses(), 5, True, 1.0, 0.05, 30.0)


def test_pose_smooth_with_people_whose_points_are_all_unseen_says_so(pack):
    frames = [{"canvas_width": 64, "canvas_height": 64,
               "people": [{"pose_keypoints_2d": [0.0, 0.0, 0.0] * 18}]} for _ in range(2)]
    assert parse_pose_keypoint(frames).body.shape[1] == 1
    with pytest.raises(ValueError, match="no person in any of its 2 frame"):
        node(pack, "TCANPoseSmooth").smooth(frames, 5, False, 1.0, 0.05, 30.0)


# --- 6: empty batches into the face nodes, and the aspect error's grammar ----------------------

def test_an_empty_batch_into_the_face_analysis_says_the_batch_is_empty():
    from tcan_core.face.analysis import check_images

    with pytest.raises(ValueError, match="empty batch"):
        check_images(torch.zeros(0, 64, 64, 3), "face image")
    with pytest.raises(ValueError, match=r"must be an IMAGE \[B,H,W,3\].*drop the alpha"):
        check_images(torch.zeros(1, 64, 64, 4), "face image")


def test_the_aspect_error_of_one_image_says_is():
    with pytest.raises(ValueError, match="reference image is 1x1 "):
        fit_images(torch.zeros(1, 1, 1, 3), 64, 32, "reference image")
    with pytest.raises(ValueError, match="pose images are 64x64 "):
        fit_images(torch.zeros(2, 64, 64, 3), 64, 32, "pose images")
