"""The pose nodes as ComfyUI sees them: contracts, types and shapes, and the errors issue 3 names."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

POSE_NODES = {
    "TCANPoseSmooth": "TCAN Pose Smooth",
    "TCANPoseRetarget": "TCAN Pose Retarget",
    "TCANPoseRender": "TCAN Pose Render",
    "TCANPoseSave": "TCAN Pose Save",
    "TCANPoseLoad": "TCAN Pose Load",
}

FIGURE = [(256, 110), (256, 170), (196, 170), (170, 250), (160, 330), (316, 170), (342, 250), (352, 330),
          (226, 320), (220, 400), (215, 480), (286, 320), (292, 400), (297, 480), (236, 95), (276, 95),
          (216, 105), (296, 105)]


def person(shift=(0.0, 0.0), scale=1.0, drop=()) -> dict:
    pts = []
    for k, (x, y) in enumerate(FIGURE):
        seen = k not in drop
        pts += [256 + (x - 256) * scale + shift[0], 256 + (y - 256) * scale + shift[1], 1.0] if seen else [0.0] * 3
    return {"pose_keypoints_2d": pts}


def frame(*people, size=(512, 512)) -> dict:
    return {"canvas_width": size[0], "canvas_height": size[1], "people": list(people)}


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


@pytest.mark.parametrize("name", sorted(POSE_NODES))
def test_node_contract(pack, name):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[name] == POSE_NODES[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    inputs = {}
    for group in ("required", "optional"):
        for key, value in spec.get(group, {}).items():
            assert isinstance(value, tuple) and 1 <= len(value) <= 2, key
            assert isinstance(value[0], (str, list)), key
            assert value[1].get("tooltip"), f"{name}.{key} has no tooltip"
            inputs[key] = group
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    assert set(params) - {"self"} == set(inputs)
    assert cls.CATEGORY == "TCAN/pose"
    assert cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)


def test_smooth_node_bridges_a_missing_frame(pack):
    poses = [frame(person((t * 2.0, 0.0))) for t in range(6)]
    poses[2] = frame()
    out = node(pack, "TCANPoseSmooth").smooth(poses, 3, True, 1.0, 0.05, 30.0)
    result = out["result"][0]
    assert isinstance(result, list) and len(result) == 6
    assert len(result[2]["people"]) == 1
    assert "18 points filled" in out["ui"]["text"][0]


def test_retarget_node_types_canvas_and_empty_frames(pack):
    reference = [frame(person(scale=0.5), person(scale=2.0), size=(400, 600))]
    driving = [frame(person((t * 5.0, 0.0))) for t in range(4)]
    driving[1] = frame()
    retarget = node(pack, "TCANPoseRetarget")
    out = retarget.retarget(reference, driving, "reference")
    result = out["result"][0]
    assert [len(f["people"]) for f in result] == [1, 0, 1, 1]
    assert (result[0]["canvas_width"], result[0]["canvas_height"]) == (400, 600)
    neck = result[0]["people"][0]["pose_keypoints_2d"][3:6]
    assert neck == pytest.approx([256.0, 256 + (170 - 256) * 0.5, 1.0])
    assert "1 of 4 frames without a person" in out["ui"]["text"][0]
    assert "scale 0.500" in out["ui"]["text"][0]
    kept = retarget.retarget(reference, driving, "driving")["result"][0]
    assert kept[3]["people"][0]["pose_keypoints_2d"][3:5] == pytest.approx([256 + 15.0, 170.0])


def test_retarget_node_marks_preview_and_modes(pack):
    reference = [frame(person(scale=0.8), size=(400, 600))]
    driving = [frame(person((t * 2.0, 0.0))) for t in range(5)]
    driving[2] = frame(person((4.0, 0.0), drop=(4,)))
    image = torch.full((1, 60, 40, 3), 0.5)
    retarget = node(pack, "TCANPoseRetarget")
    out = retarget.retarget(reference, driving, "reference", "authors_code", 1.1, "first frame", 0, 0.25, 45.0,
                            64, reference_image=image)
    assert out["ui"]["tcan_marks"] == [{"frame": 2, "reasons": ["missing in the driving pose: r-wrist"]}]
    assert "frame 2: missing in the driving pose: r-wrist" in out["ui"]["text"][0]
    assert "mode authors_code, proportions from frame 0" in out["ui"]["text"][0]
    # The scrubber gets the preview frames (over the reference) as ui.images, one per frame.
    assert len(out["ui"]["images"]) == 5 and out["ui"]["images"][0]["type"] == "temp"
    poses, preview = out["result"]
    assert len(poses) == 5 and isinstance(preview, torch.Tensor) and preview.dtype == torch.float32
    assert preview.shape == (5, 60, 40, 3)  # the reference image's size (under preview_size)
    assert torch.isclose(preview, torch.tensor(0.6 * 0.5), atol=1 / 255).all(-1).float().mean() > 0.3
    chosen = retarget.retarget(reference, driving, "reference", "algorithm_1", 1.1, "chosen frame", 3, 0.25, 45.0, 64)
    assert "mode algorithm_1, proportions from frame 3" in chosen["ui"]["text"][0]
    assert chosen["result"][1].shape == (5, 64, 43, 3)  # no image: the pose canvas (400 x 600), long side 64
    with pytest.raises(ValueError, match=r"proportions frame must be a frame of the driving pose \(0..4\), got 9"):
        retarget.retarget(reference, driving, "reference", "authors_code", 1.1, "chosen frame", 9, 0.25, 45.0, 64)


@pytest.mark.parametrize("reference, match", [
    ([frame(person(drop=(1,)))], "missing the neck keypoint"),
    ([frame(person(drop=(0, 1)))], "missing the neck and nose keypoints"),
    ([frame()], "reference pose has no person"),
    ([], "POSE_KEYPOINT is empty"),
])
def test_retarget_node_bad_reference(pack, reference, match):
    with pytest.raises(ValueError, match=match):
        node(pack, "TCANPoseRetarget").retarget(reference, [frame(person())], "reference")


def test_retarget_node_driving_without_any_person(pack):
    with pytest.raises(ValueError, match="no person in any"):
        node(pack, "TCANPoseRetarget").retarget([frame(person())], [frame(), frame()], "driving")


def test_render_node_gives_an_image_batch(pack):
    poses = [frame(person()), frame(), frame(person((10.0, 0.0)))]
    out = node(pack, "TCANPoseRender").render(poses, 128, 96, True, True, True)
    images = out["result"][0]
    assert isinstance(images, torch.Tensor) and images.dtype == torch.float32
    assert images.shape == (3, 96, 128, 3)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert images[0].max() > 0 and images[1].max() == 0
    assert "1 without a person" in out["ui"]["text"][0]
    same = node(pack, "TCANPoseRender").render(poses, 0, 0, True, False, False)["result"][0]
    assert same.shape == (3, 512, 512, 3)


@pytest.mark.parametrize("poses, match", [
    ([], "POSE_KEYPOINT is empty"),
    ([frame(person()), frame(person(), size=(256, 512))], "different canvas sizes"),
    ([{"canvas_width": 64, "canvas_height": 64}], "not a pose dict"),
])
def test_render_node_bad_input(pack, poses, match):
    with pytest.raises(ValueError, match=match):
        node(pack, "TCANPoseRender").render(poses, 64, 64, True, True, True)


def test_nodes_accept_normalised_coordinates(pack):
    pixels = person()
    normalised = {"pose_keypoints_2d": (np.array(pixels["pose_keypoints_2d"]).reshape(18, 3)
                                        / [512, 512, 1]).reshape(-1).tolist()}
    render = node(pack, "TCANPoseRender")
    a = render.render([frame(pixels)], 64, 64, True, True, True)["result"][0]
    b = render.render([frame(normalised)], 64, 64, True, True, True)["result"][0]
    assert torch.equal(a, b)
