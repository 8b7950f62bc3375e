"""TCAN Pose Extract as ComfyUI runs it: contract, the tiny DWPose models end to end, errors."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest
import torch

from tcan_core.model_folders import ModelFolders
from tcan_core.pose_format import parse_pose_keypoint

NODE_ID = "TCANPoseExtract"


@pytest.fixture()
def node_cls(pack):
    return pack.NODE_CLASS_MAPPINGS[NODE_ID]


@pytest.fixture()
def host(pack):
    return sys.modules[f"{pack.__name__}.nodes.host"]


@pytest.fixture()
def models_root(tmp_path, host, monkeypatch):
    """An empty ComfyUI-style models folder that the host bridge searches."""
    root = tmp_path / "ComfyUI" / "models"
    root.mkdir(parents=True)
    monkeypatch.setattr(host, "_fallback_folders", ModelFolders(root))
    return root


@pytest.fixture()
def dwpose_in_aux_ckpts(models_root):
    """The tiny DWPose pair where comfyui_controlnet_aux keeps it: ckpts/yzd-v/DWPose/."""
    pose_onnx = pytest.importorskip("tcan_core.tiny.pose_onnx")
    pytest.importorskip("onnxruntime")
    folder = models_root.parent / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts" / "yzd-v" / "DWPose"
    pose_onnx.write_dwpose_models(folder)
    return folder


def call(node_cls, image, **overrides):
    kwargs = dict(backend="dwpose", detect_resolution=0, person="largest", person_index=0,
                  body=True, hands=True, face=True)
    kwargs.update(overrides)
    return getattr(node_cls(), node_cls.FUNCTION)(image=image, **kwargs)


def clip(frames=3, height=192, width=160):
    """A bright 'person' rectangle moving right on a dark background; the last frame is empty."""
    img = torch.full((frames, height, width, 3), 20 / 255)
    rects = []
    for f in range(frames - 1):
        x0 = 30 + 10 * f
        rect = (x0, 30, x0 + 50, 170)
        img[f, rect[1] : rect[3], rect[0] : rect[2]] = 230 / 255
        rects.append(rect)
    return img, rects


def test_node_contract(pack, node_cls):
    assert NODE_ID.startswith("TCAN") and pack.NODE_DISPLAY_NAME_MAPPINGS[NODE_ID] == "TCAN Pose Extract"
    spec = node_cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    inputs = {**spec["required"], **spec.get("optional", {})}
    for name, entry in inputs.items():
        assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
        kind = entry[0]
        assert isinstance(kind, (str, list)), name
        assert entry[1].get("tooltip"), f"input {name} has no tooltip"
        if isinstance(kind, list):
            assert entry[1]["default"] in kind
    params = list(inspect.signature(getattr(node_cls, node_cls.FUNCTION)).parameters)[1:]
    assert params == list(inputs)
    assert node_cls.CATEGORY == "TCAN/pose" and node_cls.DESCRIPTION
    assert node_cls.RETURN_TYPES == ("POSE_KEYPOINT", "IMAGE")
    assert len(node_cls.RETURN_NAMES) == len(node_cls.RETURN_TYPES)
    assert inputs["backend"][0] == ["dwpose", "openpose"]
    assert inputs["person"][0] == ["largest", "most central", "index"]


def test_dwpose_end_to_end_through_the_node(node_cls, dwpose_in_aux_ckpts):
    from tcan_core.tiny.pose_onnx import TEMPLATE_UV

    image, rects = clip()
    out = call(node_cls, image)
    poses, preview = out["result"]
    report = out["ui"]["text"][0]
    assert "dwpose on CPUExecutionProvider" in report
    assert "person found in 2" in report and "1 frame(s) without the person" in report
    assert len(poses) == 3 and poses[2]["people"] == []
    assert all((p["canvas_width"], p["canvas_height"]) == (160, 192) for p in poses)
    seq = parse_pose_keypoint(poses)
    for f, (x0, y0, x1, y1) in enumerate(rects):
        nose = np.array([x0, y0]) + TEMPLATE_UV[0] * [x1 - x0, y1 - y0]
        np.testing.assert_allclose(seq.body[f, 0, 0, :2], nose, atol=1.5)
        assert seq.body[f, 0, 1, 2] > 0 and seq.body[f, 0, 16, 2] == 0
        assert (seq.hands[f, 0, :, :, 2] > 0).all() and (seq.face[f, 0, :, 2] > 0).all()
    assert isinstance(preview, torch.Tensor) and preview.shape == image.shape and preview.dtype == torch.float32
    assert float(preview.min()) >= 0 and float(preview.max()) <= 1
    colourful = (preview.max(-1).values - preview.min(-1).values) > 0.2
    assert colourful[:2].any() and not colourful[2].any()


def test_toggles_and_detection_resolution_through_the_node(node_cls, dwpose_in_aux_ckpts):
    image, rects = clip(frames=2, height=256, width=192)
    poses, _ = call(node_cls, image, hands=False, face=False, detect_resolution=128)["result"]
    person = poses[0]["people"][0]
    assert not any(person["hand_left_keypoints_2d"][2::3]) and not any(person["face_keypoints_2d"][2::3])
    neck = np.array(person["pose_keypoints_2d"][3:5])
    x0, y0, x1, y1 = rects[0]
    assert abs(neck[0] - (x0 + x1) / 2) < 3 and abs(neck[1] - (y0 + 0.22 * (y1 - y0))) < 3


def test_missing_models_say_where_to_put_them(node_cls, models_root):
    pytest.importorskip("onnxruntime")
    image, _ = clip()
    with pytest.raises(FileNotFoundError) as err:
        call(node_cls, image)
    text = str(err.value)
    assert "yolox_l.onnx" in text and "https://huggingface.co/yzd-v/DWPose" in text
    assert str(models_root / "tcan" / "pose") in text and "comfyui_controlnet_aux" in text


def test_wrong_onnx_under_the_right_name(node_cls, models_root):
    pose_onnx = pytest.importorskip("tcan_core.tiny.pose_onnx")
    pytest.importorskip("onnxruntime")
    folder = models_root / "tcan" / "pose"
    pose_onnx.write_dwpose_models(folder)
    (folder / "dw-ll_ucoco_384.onnx").write_bytes(pose_onnx.build_pose(keypoints=17).SerializeToString())
    with pytest.raises(ValueError, match="not the DWPose whole-body model"):
        call(node_cls, clip()[0])


def test_empty_batch_and_no_person(node_cls, dwpose_in_aux_ckpts):
    with pytest.raises(ValueError, match="empty"):
        call(node_cls, torch.zeros((0, 64, 64, 3)))
    with pytest.raises(ValueError, match="no person was found in any of the 2 frame"):
        call(node_cls, torch.full((2, 64, 64, 3), 0.1))


def test_openpose_without_controlnet_aux_gives_the_install_hint(node_cls, models_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    with pytest.raises(RuntimeError, match="pip install controlnet_aux"):
        call(node_cls, clip()[0], backend="openpose")


def test_cancel_between_frames(node_cls, dwpose_in_aux_ckpts, host, monkeypatch):
    class Cancelled(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    monkeypatch.setattr(host, "check_interrupt", check)
    with pytest.raises(Cancelled):
        call(node_cls, clip(frames=4)[0])
    assert len(calls) == 2
