"""TIFF's face pass on tiny insightface models: swap inside the face, bit-identical elsewhere, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")

from tcan_core.face.analysis import FaceAnalyzer, analyze_images  # noqa: E402
from tcan_core.face.face_pass import FaceSwapper, face_pass, feather_mask  # noqa: E402
from tcan_core.face.identity import FaceIdentity  # noqa: E402
from tcan_core.tiny.face_onnx import draw_test_faces, write_tiny_face_pack, write_tiny_inswapper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

W, H = 640, 480


def frame(*faces, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(draw_test_faces(W, H, list(faces), seed=seed)).float().div(255).unsqueeze(0)


def far_from(face: tuple[float, float, float], margin: float = 0.75) -> torch.Tensor:
    """[H,W] bool: pixels farther than ``margin * size`` (on either axis) from the face centre."""
    cx, cy, size = face
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return ((xs - cx).abs() > margin * size) | ((ys - cy).abs() > margin * size)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("face_pass_models")
    pack = write_tiny_face_pack(root, "buffalo_l")
    return pack, write_tiny_inswapper(root)


@pytest.fixture(scope="module")
def analyzer(models):
    return FaceAnalyzer.load(models[0])


@pytest.fixture(scope="module")
def swapper(models):
    return FaceSwapper.load(models[1])


@pytest.fixture(scope="module")
def reference(analyzer):
    return analyze_images(analyzer, frame((320, 240, 110), seed=7)).identity


def test_swapper_routes_through_insightface(swapper, models):
    assert type(swapper.model).__name__ == "INSwapper"
    assert (swapper.crop_size, swapper.embedding_dim, swapper.provider) == (128, 512, "CPUExecutionProvider")
    assert FaceSwapper.load(models[1]) is swapper  # cached


def test_face_pass_changes_the_face_and_nothing_far_from_it(analyzer, swapper, reference):
    one, two = (300, 250, 100), [(150, 150, 64), (450, 300, 128)]
    frames = torch.cat([frame(one, seed=1), torch.zeros(1, H, W, 3), frame(*two, seed=2), frame(seed=3)])
    ticks = []
    result = face_pass(analyzer, swapper, reference, frames, progress=ticks.append)
    out = result.frames
    assert out.shape == frames.shape and out.dtype == torch.float32 and ticks == [1] * 4
    assert result.swapped == [0, 2] and result.faceless == [1, 3]
    assert "2 of 4 frames" in result.report and "no face in frames 1, 3 (left unchanged)" in result.report
    assert torch.equal(out[1], frames[1]) and torch.equal(out[3], frames[3])  # faceless: bit-identical
    cx, cy, size = one
    inner = (slice(int(cy - size / 3), int(cy + size / 3)), slice(int(cx - size / 3), int(cx + size / 3)))
    assert float((out[0][inner] - frames[0][inner]).abs().mean()) > 0.05
    far = far_from(one)
    assert torch.equal(out[0][far], frames[0][far])
    # two faces: only the largest is swapped; the small one stays exactly as it was
    small, large = two
    assert torch.equal(out[2][far_from(large)], frames[2][far_from(large)])
    sx, sy, ss = small
    small_box = (slice(sy - ss // 2, sy + ss // 2), slice(sx - ss // 2, sx + ss // 2))
    assert torch.equal(out[2][small_box], frames[2][small_box])
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_feather_softens_the_edge(analyzer, swapper, reference):
    face = (300, 250, 100)
    frames = frame(face, seed=1)
    hard = face_pass(analyzer, swapper, reference, frames, feather=0.0).frames
    soft = face_pass(analyzer, swapper, reference, frames, feather=0.3).frames
    edge = (slice(245, 255), slice(248, 256))  # inside the face, near its left side
    assert float((soft[0][edge] - frames[0][edge]).abs().mean()) < float((hard[0][edge] - frames[0][edge]).abs().mean())
    centre = (slice(240, 260), slice(290, 310))
    torch.testing.assert_close(soft[0][centre], hard[0][centre])  # the mask is 1 in the middle


def test_feather_mask_shape():
    mask = feather_mask(128, 0.1)
    assert mask.shape == (128, 128) and mask.dtype == np.float32
    assert mask[64, 64] == 1.0 and mask[0, 0] < 0.01 and mask[0, 64] < 0.05
    assert np.all(np.diff(mask[64, :64]) >= 0)
    assert np.array_equal(feather_mask(128, 0.0), np.ones((128, 128), np.float32))


def test_a_recognition_model_is_not_a_swapper(models):
    with pytest.raises(ValueError, match=r"w600k_r50.onnx is a face recognition model, not a face swap model; .*"
                                         r"inswapper_128.onnx \(inputs target \[1,3,128,128\] and source \[1,512\]\)"):
        FaceSwapper.load(models[0] / "w600k_r50.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx not found; expected .*inswapper_128.onnx"):
        FaceSwapper.load(models[0] / "missing.onnx")


def test_a_truncated_swapper_file_says_download_again(models, tmp_path):
    broken = tmp_path / "inswapper_128.onnx"
    broken.write_bytes(models[1].read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not open .*inswapper_128.onnx .* download it again"):
        FaceSwapper.load(broken)


def test_cancel_propagates_before_the_next_frame(analyzer, swapper, reference):
    class Stop(Exception):
        pass

    calls = []

    def check_cancel():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    ticks = []
    with pytest.raises(Stop):
        face_pass(analyzer, swapper, reference, torch.cat([frame((300, 250, 100))] * 3), progress=ticks.append,
                  check_cancel=check_cancel)
    assert len(calls) == 2 and ticks == [1]


def test_face_pass_checks_its_inputs(analyzer, swapper, reference):
    frames = frame((300, 250, 100))
    small = FaceIdentity(crops=reference.crops, weights=reference.weights, embedding=torch.ones(256),
                         kps=reference.kps, bbox=reference.bbox, image_size=reference.image_size)
    with pytest.raises(ValueError, match="256-d embedding but inswapper_128.onnx takes 512-d"):
        face_pass(analyzer, swapper, small, frames)
    with pytest.raises(ValueError, match="feather must be between 0 .* got 0.6"):
        face_pass(analyzer, swapper, reference, frames, feather=0.6)
    with pytest.raises(ValueError, match=r"IMAGE \[B,H,W,3\]"):
        face_pass(analyzer, swapper, reference, frames[0])
    with pytest.raises(ValueError, match="must be a TCAN_FACE"):
        face_pass(analyzer, swapper, reference.embedding, frames)
