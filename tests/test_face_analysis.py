"""Face analysis on tiny insightface packs routed by insightface itself: detection, alignment, identity, errors."""

from __future__ import annotations

import importlib
import os
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")

from tcan_core.face import analysis  # noqa: E402
from tcan_core.face.analysis import (  # noqa: E402
    CHOSEN_COLOR,
    MIN_USEFUL_FACE,
    FaceAnalyzer,
    FaceToolsMissing,
    analyze_images,
    draw_faces,
    face_similarity,
    list_face_packs,
    require_face_tools,
    resolve_face_pack,
)
from tcan_core.face.identity import FaceIdentity, combine_faces  # noqa: E402
from tcan_core.tiny.face_onnx import ARCFACE_TEMPLATE, draw_test_faces, write_tiny_face_pack  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def image(*faces, width: int = 640, height: int = 640, seed: int = 0) -> torch.Tensor:
    """IMAGE [1,H,W,3] with the drawn test faces ``(cx, cy, size)``."""
    return torch.from_numpy(draw_test_faces(width, height, list(faces), seed=seed)).float().div(255).unsqueeze(0)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("face_models")
    write_tiny_face_pack(root, "buffalo_l")
    return root


@pytest.fixture(scope="module")
def insightface_dirs(models_root):
    return [str(models_root / "insightface")]


@pytest.fixture(scope="module")
def analyzer(insightface_dirs):
    return FaceAnalyzer.load(resolve_face_pack(insightface_dirs, "buffalo_l"))


def test_tiny_pack_loads_through_insightface_routing(analyzer, insightface_dirs):
    assert type(analyzer.detector).__name__ == "RetinaFace"
    assert type(analyzer.recognizer).__name__ == "ArcFaceONNX"
    assert analyzer.recognizer.input_mean == 127.5  # read as an ONNX ArcFace, not an MXNet export
    assert (analyzer.detector_file, analyzer.recognizer_file) == ("det_10g.onnx", "w600k_r50.onnx")
    assert analyzer.provider == "CPUExecutionProvider"
    assert analyzer.embedding_dim == 512
    assert list_face_packs(insightface_dirs) == ["buffalo_l"]
    assert FaceAnalyzer.load(resolve_face_pack(insightface_dirs, "buffalo_l")) is analyzer  # cached


@pytest.mark.parametrize("cx, cy, size", [(200, 180, 32), (300, 260, 64), (330, 320, 128), (101, 457, 90)])
def test_detector_finds_each_face_size_at_its_place(analyzer, cx, cy, size):
    faces = analyzer.detect(draw_test_faces(640, 640, [(cx, cy, size)]))
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].bbox
    assert abs((x1 + x2) / 2 - cx) <= 1.5 and abs((y1 + y2) / 2 - cy) <= 1.5
    assert abs(faces[0].width - size) <= 2 and abs(faces[0].height - size) <= 2
    assert faces[0].score > 0.9


def test_detector_maps_boxes_back_through_the_letterbox(analyzer):
    # 960 x 540 is scaled by 2/3 to fit 640: the 96 px face is 64 px for the detector
    faces = analyzer.detect(draw_test_faces(960, 540, [(700, 300, 96)]))
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].bbox, [652, 252, 748, 348], atol=2)


def test_detector_black_image_and_two_faces(analyzer):
    assert analyzer.detect(np.zeros((480, 640, 3), np.uint8)) == []
    faces = analyzer.detect(draw_test_faces(640, 640, [(150, 150, 64), (450, 400, 128)]))
    assert [round(f.width) for f in faces] == [128, 64]  # largest first


def test_analyze_images_builds_the_identity(analyzer):
    result = analyze_images(analyzer, image((300, 280, 100)))
    face = result.identity
    assert isinstance(face, FaceIdentity)
    assert face.crops.shape == (1, 224, 224, 3) and 0 <= float(face.crops.min()) and float(face.crops.max()) <= 1
    assert face.embedding.shape == (512,)
    assert float(torch.linalg.vector_norm(face.embedding)) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(face.bbox.numpy(), [250, 230, 350, 330], atol=2)
    x1, y1, x2, y2 = face.bbox.tolist()
    assert ((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2) & (face.kps[:, 1] > y1) & (face.kps[:, 1] < y2)).all()
    assert face.image_size == (640, 640) and face.weights.tolist() == [1.0]
    assert face.source == "buffalo_l"
    assert result.chosen == [0] and result.notes == ["face analysis ran on CPUExecutionProvider"]
    # the crop is aligned to the ArcFace template: the drawn eye marks land on the template's eyes
    crop = face.crops[0].mean(-1)
    for x, y in ARCFACE_TEMPLATE[:2] * 2:
        assert float(crop[round(y), round(x)]) < 0.45
    assert float(crop[20, 112]) > 0.55  # forehead: face texture, not a mark or background


def test_analyze_images_averages_several_images(analyzer):
    a, b = image((300, 300, 100), seed=1), image((320, 300, 110), seed=2)
    both = analyze_images(analyzer, torch.cat([a, b])).identity
    one_a, one_b = analyze_images(analyzer, a).identity, analyze_images(analyzer, b).identity
    assert both.crops.shape[0] == 2 and both.weights.tolist() == [0.5, 0.5]
    mix = (one_a.embedding + one_b.embedding) / torch.linalg.vector_norm(one_a.embedding + one_b.embedding)
    torch.testing.assert_close(both.embedding, mix, atol=1e-5, rtol=0)
    assert both.source == "buffalo_l, 2 images"


def test_largest_face_is_used_and_index_picks_another(analyzer):
    two = image((180, 200, 64), (450, 400, 128))
    largest = analyze_images(analyzer, two)
    np.testing.assert_allclose(largest.identity.bbox.numpy(), [386, 336, 514, 464], atol=2)
    assert "image 1: 2 faces, used the largest (index 0)" in largest.notes
    assert largest.identity.source == "buffalo_l, largest of 2 faces"
    assert len(largest.detections[0]) == 2 and largest.chosen == [0]
    other = analyze_images(analyzer, two, index=1)
    np.testing.assert_allclose(other.identity.bbox.numpy(), [148, 168, 212, 232], atol=2)
    assert "image 1: 2 faces, used index 1" in other.notes and other.chosen == [1]
    assert not torch.equal(other.identity.embedding, largest.identity.embedding)
    with pytest.raises(ValueError, match=r"face index 5 .* has 2 faces \(indices 0 to 1"):
        analyze_images(analyzer, two, index=5)
    with pytest.raises(ValueError, match="face index must be -1"):
        analyze_images(analyzer, two, index=-2)


def test_no_face_error_names_the_image_and_the_threshold(analyzer):
    black = torch.zeros(1, 320, 480, 3)
    with pytest.raises(ValueError, match=r"no face found in image 1 \(of 1\) at detection threshold 0.5; use a "
                                         "closer crop of the face or lower the detection threshold"):
        analyze_images(analyzer, black)
    with pytest.raises(ValueError, match=r"no face found in image 2 \(of 2\) at detection threshold 0.7"):
        analyze_images(analyzer, torch.cat([image((300, 300, 100)), torch.zeros(1, 640, 640, 3)]), threshold=0.7)


def test_small_face_gets_a_size_warning(analyzer):
    result = analyze_images(analyzer, image((200, 200, 32)))
    warning = [n for n in result.notes if "smaller than" in n]
    assert warning == [f"image 1: the face is 32x32 px, smaller than the {MIN_USEFUL_FACE} px the detector and "
                       "ID-Animator's 224 crop work well with; use a closer crop"]
    assert not any("smaller" in n for n in analyze_images(analyzer, image((300, 300, 100))).notes)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 64, 64, 4), r"IMAGE \[B,H,W,3\], got shape \[1, 64, 64, 4\] \(drop the alpha"),
    (torch.zeros(64, 64, 3), r"got shape \[64, 64, 3\]"),
    (np.zeros((1, 64, 64, 3), np.float32), "IMAGE tensor .* got ndarray"),
])
def test_non_image_input_is_refused(analyzer, bad, message):
    with pytest.raises(ValueError, match=message):
        analyze_images(analyzer, bad)


def test_detect_checks_its_settings(analyzer):
    img = draw_test_faces(64, 64, [])
    with pytest.raises(ValueError, match="multiple of 32 .* got 500"):
        analyzer.detect(img, det_size=500)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        analyzer.detect(img, threshold=1.5)
    with pytest.raises(ValueError, match="RGB uint8 image"):
        analyzer.detect(img.astype(np.float32))


def test_draw_faces_marks_the_chosen_face_green(analyzer):
    two = image((180, 200, 64), (450, 400, 128))
    result = analyze_images(analyzer, two, index=1)
    preview = draw_faces(two, result.detections, result.chosen)
    assert preview.shape == two.shape and preview.dtype == torch.float32
    x1, y1, x2, y2 = (round(v) for v in result.detections[0][1].bbox.tolist())
    green = torch.tensor(CHOSEN_COLOR) / 255
    torch.testing.assert_close(preview[0, y1, (x1 + x2) // 2], green, atol=0.02, rtol=0)
    gx1, gy1, gx2, _ = (round(v) for v in result.detections[0][0].bbox.tolist())
    gray = preview[0, gy1, (gx1 + gx2) // 2]
    assert float(gray.max() - gray.min()) < 0.02 and 0.3 < float(gray[0]) < 0.8
    assert torch.equal(preview[0, :100, 560:], two[0, :100, 560:])  # away from the faces: untouched


# pack folders and their errors --------------------------------------------------------------------------


def test_pack_nested_one_folder_too_deep(tmp_path):
    folder = write_tiny_face_pack(tmp_path / "nested", "antelopev2")
    inner = folder / "antelopev2"
    inner.mkdir()
    for f in list(folder.glob("*.onnx")):
        shutil.move(str(f), str(inner / f.name))
    dirs = [str(tmp_path / "nested" / "insightface")]
    assert list_face_packs(dirs) == ["antelopev2"]
    with pytest.raises(FileNotFoundError, match="one folder too deep: move the .onnx files from ") as info:
        resolve_face_pack(dirs, "antelopev2")
    assert f"{inner}{os.sep} up to {folder}{os.sep}" in str(info.value)


def test_pack_missing_recognition_or_detector_names_the_file(tmp_path):
    folder = write_tiny_face_pack(tmp_path / "norec", "buffalo_l")
    (folder / "w600k_r50.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="no face recognition model: expected w600k_r50.onnx") as info:
        FaceAnalyzer.load(folder)
    assert str(folder.resolve()) in str(info.value) and "found: det_10g.onnx" in str(info.value)
    folder = write_tiny_face_pack(tmp_path / "nodet", "antelopev2")
    (folder / "scrfd_10g_bnkps.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="no face detector: expected scrfd_10g_bnkps.onnx") as info:
        FaceAnalyzer.load(folder)
    assert str(folder.resolve()) in str(info.value)


def test_pack_role_comes_from_routing_not_file_names(tmp_path):
    folder = write_tiny_face_pack(tmp_path / "renamed", "my_pack")
    (folder / "det_10g.onnx").rename(folder / "a.onnx")
    (folder / "w600k_r50.onnx").rename(folder / "b.onnx")
    loaded = FaceAnalyzer.load(folder)
    assert (loaded.detector_file, loaded.recognizer_file) == ("a.onnx", "b.onnx")
    (folder / "b.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="such as w600k_r50.onnx or glintr100.onnx"):
        FaceAnalyzer.load(folder)  # the changed folder is not served from the cache


def test_unknown_pack_lists_what_exists(insightface_dirs):
    with pytest.raises(FileNotFoundError, match=r"'antelopev2' not found in .* \(found: buffalo_l\); put packs in "
                                                r"models/insightface/models/<name>/"):
        resolve_face_pack(insightface_dirs, "antelopev2")
    with pytest.raises(FileNotFoundError, match="no packs found"):
        resolve_face_pack([], "buffalo_l")


@pytest.mark.parametrize("name", ["../buffalo_l", "models/buffalo_l", "a\\b", "..", ""])
def test_pack_name_with_path_parts_is_refused(insightface_dirs, name):
    with pytest.raises(ValueError, match="plain folder name"):
        resolve_face_pack(insightface_dirs, name)


def test_unavailable_provider_is_a_clear_error(models_root):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("TensorRT is available here")
    with pytest.raises(ValueError, match="TensorrtExecutionProvider.* is available here"):
        FaceAnalyzer.load(models_root / "insightface" / "models" / "buffalo_l", ["TensorrtExecutionProvider"])


# missing tools ------------------------------------------------------------------------------------------


def test_missing_insightface_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(FaceToolsMissing, match=r"insightface is not installed.*`pip install insightface "
                                               r"onnxruntime-gpu`.*`pip install insightface onnxruntime`"):
        require_face_tools()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(FaceToolsMissing, match="onnxruntime is not installed"):
        FaceAnalyzer.load("/nonexistent")


def test_analysis_module_imports_without_insightface(monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "tcan_core.face.analysis")
    monkeypatch.setattr(sys.modules["tcan_core.face"], "analysis", analysis)  # the re-import rebinds it
    fresh = importlib.import_module("tcan_core.face.analysis")
    assert fresh is not analysis and fresh.list_face_packs([]) == []


# identity metric (TIFF) and mixing ----------------------------------------------------------------------


def test_face_similarity_scores_frames_against_the_reference(analyzer):
    ref_image = image((300, 280, 100), seed=4)
    reference = analyze_images(analyzer, ref_image).identity
    other = image((320, 300, 100), seed=9)
    frames = torch.cat([ref_image, torch.zeros(1, 640, 640, 3), other])
    ticks = []
    result = face_similarity(analyzer, reference, frames, progress=ticks.append)
    assert result.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert result.scores[1] is None and result.faceless == [1]
    assert result.scores[2] < 0.999
    assert result.mean == pytest.approx((result.scores[0] + result.scores[2]) / 2)
    assert ticks == [1, 1, 1]
    assert result.plot.ndim == 4 and result.plot.shape[0] == 1 and result.plot.shape[-1] == 3
    assert 0 <= float(result.plot.min()) and float(result.plot.max()) <= 1
    assert float(result.plot.std()) > 0.05  # something is drawn
    report = result.report()
    assert "mean" in report and f"min {result.scores[2]:.3f} at frame 2" in report and "no face in frame 1" in report


def test_face_similarity_with_no_face_anywhere(analyzer):
    reference = analyze_images(analyzer, image((300, 280, 100))).identity
    result = face_similarity(analyzer, reference, torch.zeros(2, 64, 64, 3))
    assert result.scores == [None, None] and result.mean is None and result.faceless == [0, 1]
    assert result.report() == "face similarity: no face found in any of the 2 frames"


def test_face_similarity_refuses_another_embedding_size_and_cancels(analyzer):
    reference = analyze_images(analyzer, image((300, 280, 100))).identity
    small = FaceIdentity(crops=reference.crops, weights=reference.weights, embedding=torch.ones(256),
                         kps=reference.kps, bbox=reference.bbox, image_size=reference.image_size)
    with pytest.raises(ValueError, match="256-d embedding but the pack buffalo_l gives 512-d"):
        face_similarity(analyzer, small, image((300, 280, 100)))

    class Stop(Exception):
        pass

    def cancel():
        raise Stop

    with pytest.raises(Stop):
        face_similarity(analyzer, reference, image((300, 280, 100)), check_cancel=cancel)


def test_combine_faces_weight_one_zero_is_the_first_face(analyzer):
    a = analyze_images(analyzer, image((300, 280, 100), seed=1)).identity
    b = analyze_images(analyzer, image((300, 280, 100), seed=2)).identity
    first = combine_faces([a, b], [1, 0])
    assert torch.equal(first.embedding, a.embedding) and torch.equal(first.crops, a.crops)
    mix = combine_faces([a, b], [1, 1])
    assert mix.crops.shape[0] == 2
    cos_a, cos_b = float(mix.embedding @ a.embedding), float(mix.embedding @ b.embedding)
    assert cos_a == pytest.approx(cos_b, abs=1e-5) and cos_a > float(a.embedding @ b.embedding)
