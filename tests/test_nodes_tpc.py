"""TCAN TPC Calibrate node: the node contract and an end-to-end run on small inputs."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest
import torch

from tcan_core.tpc import Calibration

NODE = "TCANTPCCalibrate"

SKELETON = np.array([
    [64, 24], [64, 40], [52, 40], [47, 58], [45, 76], [76, 40], [81, 58], [83, 76], [56, 76],
    [56, 98], [56, 120], [72, 76], [72, 98], [72, 120], [60, 21], [68, 21], [56, 23], [72, 23],
], np.float64)


def frame(points: np.ndarray, width: int, height: int, normalised: bool = False) -> dict:
    """One POSE_KEYPOINT frame with one person, in pixels or in 0..1."""
    xy = points / [width, height] if normalised else points
    flat = np.concatenate([xy, np.full((18, 1), 0.9)], axis=1).reshape(-1).tolist()
    return {"canvas_width": width, "canvas_height": height, "people": [{"pose_keypoints_2d": flat}]}


def defaults(node_cls) -> dict:
    spec = node_cls.INPUT_TYPES()["required"]
    return {name: opts[1]["default"] for name, opts in spec.items() if len(opts) > 1 and "default" in opts[1]}


@pytest.fixture(scope="module")
def node_cls(pack):
    return pack.NODE_CLASS_MAPPINGS[NODE]


@pytest.fixture
def inputs(node_cls):
    reference = torch.rand(1, 128, 128, 3)
    driving = [frame(SKELETON * 0.5 + [20 + 2 * f, 30], 96, 80, normalised=f % 2 == 1) for f in range(6)]
    return {"reference": reference, "reference_pose": [frame(SKELETON, 128, 128)], "driving_pose": driving,
            **defaults(node_cls)}


def test_node_contract(pack, node_cls):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "TCAN TPC Calibrate"
    spec = node_cls.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, opts in spec.get(section, {}).items():
            assert isinstance(opts, tuple) and isinstance(opts[0], (str, list)), name
            assert opts[1].get("tooltip"), f"input {name} has no tooltip"
            names.append(name)
    params = inspect.signature(getattr(node_cls, node_cls.FUNCTION)).parameters
    assert list(params)[1:] == names
    assert all(params[n].default is None for n in spec["optional"])
    assert node_cls.CATEGORY == "TCAN/tpc" and node_cls.DESCRIPTION
    assert len(node_cls.RETURN_TYPES) == len(node_cls.RETURN_NAMES) == len(node_cls.OUTPUT_TOOLTIPS)
    assert node_cls.RETURN_TYPES == ("IMAGE", "MASK", "TCAN_CALIBRATION", "IMAGE")
    assert spec["required"]["keypoint_set"][0] == ["face", "body", "all"]


def test_node_runs_end_to_end(node_cls, inputs):
    out = node_cls().calibrate(**inputs)
    images, masks, cal, preview = out["result"]
    assert images.shape == (6, 80, 96, 3) and images.dtype == torch.float32
    assert masks.shape == (6, 80, 96) and 0 <= masks.min() and masks.max() <= 1 and masks.sum() > 0
    assert preview.shape == images.shape
    assert isinstance(cal, Calibration)
    assert cal.calibrated_frames.tolist() == [0, 4] and cal.images.shape == (2, 80, 96, 3)
    # Pixel and 0..1 driving frames describe the same motion: half size, shifted 2 px a frame.
    assert np.allclose(cal.scales, 0.5, atol=1e-3)
    assert np.allclose(cal.transforms[:, 0, 2], [20, 20, 20, 20, 28, 28], atol=0.05)
    text = out["ui"]["text"][0]
    assert "6 driving frames" in text and "segmentation mask" in text


def test_node_uses_a_given_mask_and_reports_clamps(node_cls, inputs):
    mask = torch.zeros(1, 128, 128)
    mask[:, 16:112, 40:88] = 1.0
    inputs.update(reference_mask=mask, max_scale=0.4, sparsity=1, allow_rotation=False)
    images, masks, cal, _ = node_cls().calibrate(**inputs)["result"]
    assert not cal.mask_from_pose
    assert np.allclose(cal.scales, 0.4) and cal.clamped.all()
    assert np.allclose(cal.angles, 0.0)
    text = node_cls().calibrate(**inputs)["ui"]["text"][0]
    assert "Clamped" in text and "segmentation mask" not in text


@pytest.mark.parametrize("field, value, message", [
    ("reference", torch.rand(2, 128, 128, 3), "reference must be a single image, got a batch of 2"),
    ("reference_mask", torch.ones(2, 128, 128), "reference_mask must be a single image, got a batch of 2"),
    ("reference_mask", torch.ones(1, 64, 64), "reference mask is 64x64 but the reference image is 128x128"),
    ("reference_mask", torch.zeros(1, 128, 128), "reference mask is empty"),
    ("reference_pose", [{"canvas_width": 128, "canvas_height": 128, "people": []}], "reference pose has no person"),
])
def test_node_bad_inputs(node_cls, inputs, field, value, message):
    inputs[field] = value
    with pytest.raises(ValueError, match=message):
        node_cls().calibrate(**inputs)


def test_node_checks_for_cancel_while_it_runs(pack, node_cls, inputs, monkeypatch):
    host = sys.modules[node_cls.__module__.rsplit(".", 1)[0] + ".host"]
    calls = []

    def cancel() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise InterruptedError("cancelled")

    monkeypatch.setattr(host, "check_interrupt", cancel)
    with pytest.raises(InterruptedError):
        node_cls().calibrate(**inputs)
    assert len(calls) == 2
