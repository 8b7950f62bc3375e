"""DWPose decoding on constructed outputs with known answers, and the tiny ONNX models end to end."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tcan_core import onnx_session  # noqa: E402
from tcan_core.pose import dwpose  # noqa: E402
from tcan_core.tiny import pose_onnx  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dwpose")
    det, pose = pose_onnx.write_dwpose_models(folder)
    batched = pose_onnx.write_dwpose_models(folder / "batched", batch="batch")[1]
    wrong = pose_onnx.write_wrong_models(folder / "wrong")
    return types.SimpleNamespace(det=det, pose=pose, batched_pose=batched, wrong=wrong, folder=folder)


def _person_image(height=256, width=192, rect=(70, 60, 130, 200), background=20, bright=230):
    img = np.full((height, width, 3), background, np.uint8)
    x0, y0, x1, y1 = rect
    img[y0:y1, x0:x1] = bright
    return img


def _expected_points(rect, indices):
    x0, y0, x1, y1 = rect
    return np.array([x0, y0]) + pose_onnx.TEMPLATE_UV[indices] * np.array([x1 - x0, y1 - y0])


# --- SimCC -----------------------------------------------------------------------------------

def test_simcc_decode_finds_known_peaks():
    rng = np.random.default_rng(0)
    m, k = 2, 133
    sx = rng.uniform(0, 0.1, (m, k, 576)).astype(np.float32)
    sy = rng.uniform(0, 0.1, (m, k, 768)).astype(np.float32)
    px = rng.integers(0, 576, (m, k))
    py = rng.integers(0, 768, (m, k))
    vx = rng.uniform(0.4, 1.0, (m, k)).astype(np.float32)
    vy = rng.uniform(0.4, 1.0, (m, k)).astype(np.float32)
    i, j = np.meshgrid(np.arange(m), np.arange(k), indexing="ij")
    sx[i, j, px] = vx
    sy[i, j, py] = vy
    points, scores = dwpose.simcc_decode(sx, sy)
    np.testing.assert_allclose(points[..., 0], px / 2.0)
    np.testing.assert_allclose(points[..., 1], py / 2.0)
    np.testing.assert_allclose(scores, np.minimum(vx, vy))


def test_simcc_decode_marks_non_positive_responses():
    sx = np.full((1, 3, 8), -1.0, np.float32)
    sy = np.full((1, 3, 8), -1.0, np.float32)
    sx[0, 0, 5] = sy[0, 0, 2] = 0.9
    points, scores = dwpose.simcc_decode(sx, sy)
    np.testing.assert_allclose(points[0, 0], [2.5, 1.0])
    assert (points[0, 1:] == -1).all() and (scores[0, 1:] <= 0).all()


# --- YOLOX -----------------------------------------------------------------------------------

def _anchor_index(stride, gx, gy, size=(640, 640)):
    h, w = size
    offset = 0
    for s in dwpose.DET_STRIDES:
        if s == stride:
            return offset + gy * (w // s) + gx
        offset += (h // s) * (w // s)
    raise AssertionError(stride)


def _raw_box(raw, stride, box, objectness, class_scores):
    """Write an xyxy box (letterbox pixels) as a raw YOLOX prediction at the cell of its centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    gx, gy = int(cx // stride), int(cy // stride)
    i = _anchor_index(stride, gx, gy)
    raw[0, i, :4] = [cx / stride - gx, cy / stride - gy,
                     np.log((box[2] - box[0]) / stride), np.log((box[3] - box[1]) / stride)]
    raw[0, i, 4] = objectness
    raw[0, i, 5:] = class_scores
    return i


def test_yolox_anchor_layout():
    cells, strides = dwpose.yolox_anchors(640, 640)
    assert cells.shape == (8400, 2) and strides.shape == (8400,)
    assert (strides[:6400] == 8).all() and (strides[6400:8000] == 16).all() and (strides[8000:] == 32).all()
    np.testing.assert_array_equal(cells[81], [1, 1])  # row-major: 80 cells per row at stride 8
    np.testing.assert_array_equal(cells[8000 + 20 * 3 + 7], [7, 3])


def test_decode_yolox_recovers_boxes_and_suppresses_duplicates():
    raw = np.zeros((1, 8400, 85), np.float32)
    person = np.zeros(80, np.float32)
    person[0] = 0.9
    other = np.zeros(80, np.float32)
    other[15] = 0.99
    a = np.array([100.0, 120.0, 180.0, 400.0])
    b = np.array([400.0, 200.0, 480.0, 360.0])
    _raw_box(raw, 32, a, 0.95, person)
    _raw_box(raw, 16, a + [2, -2, 2, 1], 0.8, person)       # duplicate of a, lower score: suppressed
    _raw_box(raw, 8, b, 0.7, person)
    _raw_box(raw, 32, [300.0, 40.0, 360.0, 90.0], 0.99, other)  # a cat: not a person
    _raw_box(raw, 16, [10.0, 10.0, 50.0, 60.0], 0.3, person)    # score 0.27 < 0.3
    ratio = 2.5
    boxes, scores = dwpose.decode_yolox(raw, (640, 640), ratio)
    assert boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes[0], a / ratio, atol=1e-3)
    np.testing.assert_allclose(boxes[1], b / ratio, atol=1e-3)
    np.testing.assert_allclose(scores, [0.95 * 0.9, 0.7 * 0.9], rtol=1e-5)


def test_decode_yolox_rejects_wrong_anchor_count():
    with pytest.raises(ValueError, match="8400"):
        dwpose.decode_yolox(np.zeros((1, 100, 85), np.float32), (640, 640), 1.0)


def test_nms_keeps_best_of_overlapping_and_all_separate():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 4]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.7], np.float32)
    keep = dwpose.nms(boxes, scores, 0.45)
    # box 1 beats its near-copy 0; box 3 overlaps 1 with IoU 0.3 and stays
    assert keep.tolist() == [1, 2, 3]


# --- letterbox and crop geometry ---------------------------------------------------------------

def test_letterbox_scales_into_the_top_left_and_pads_with_114():
    img = np.zeros((100, 200, 3), np.uint8)
    img[40:60, 100:140] = 255
    tensor, ratio = dwpose.letterbox(img, (640, 640))
    assert tensor.shape == (1, 3, 640, 640) and tensor.dtype == np.float32
    assert ratio == pytest.approx(3.2)
    assert (tensor[0, :, 320:, :] == 114).all()          # below the scaled image
    assert (tensor[0, :, :320, :] != 114).all()
    assert (tensor[0, :, 140:180, 330:440] == 255).all()  # the block, scaled by 3.2
    assert (tensor[0, :, 100:120, :300] == 0).all()


def test_box_center_scale_pads_and_fixes_aspect():
    boxes = np.array([[10, 20, 50, 220], [0, 0, 300, 100]], np.float32)
    centers, scales = dwpose.box_center_scale(boxes, aspect=0.75)
    np.testing.assert_allclose(centers, [[30, 120], [150, 50]])
    np.testing.assert_allclose(scales[0], [250 * 0.75, 250])   # tall: width grows
    np.testing.assert_allclose(scales[1], [375, 375 / 0.75])   # wide: height grows


def test_crop_matrix_and_inverse_agree():
    rng = np.random.default_rng(1)
    center, scale = np.array([91.0, 133.0], np.float32), np.array([150.0, 200.0], np.float32)
    m = dwpose.crop_matrix(center, scale, (384, 288))
    pts = rng.uniform(0, 250, (1, 20, 2)).astype(np.float32)
    crop = pts @ m[:, :2].T + m[:, 2]
    back = dwpose.crop_to_image(crop, center[None], scale[None], (384, 288))
    np.testing.assert_allclose(back, pts, atol=1e-3)
    np.testing.assert_allclose(np.array([*center, 1.0]) @ m.T, [144, 192], atol=1e-4)
    # the warped image really puts the box centre at the crop centre
    img = np.zeros((300, 200, 3), np.uint8)
    img[132:135, 90:93] = 255
    warped = cv2.warpAffine(img, m, (288, 384), flags=cv2.INTER_LINEAR)
    y, x = np.unravel_index(warped[..., 0].argmax(), warped.shape[:2])
    assert abs(x - 144) <= 1 and abs(y - 192) <= 1


# --- COCO-WholeBody -> OpenPose ----------------------------------------------------------------

def test_wholebody_to_openpose_index_map_neck_face_hands():
    m = 2
    idx = np.arange(133, dtype=np.float32)
    points = np.stack([np.stack([idx, 1000 + idx], -1)] * m)
    scores = np.full((m, 133), 0.9, np.float32)
    scores[1, 6] = 0.1           # person 1: right shoulder unseen -> no neck
    scores[0, 100] = 0.2         # a left-hand point below the threshold
    body, face, hands = dwpose.wholebody_to_openpose(points, scores)
    assert body.shape == (m, 18, 3) and face.shape == (m, 70, 3) and hands.shape == (m, 2, 21, 3)
    coco = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
    for k, c in enumerate(coco):
        if c is not None:
            assert body[0, k, 0] == c and body[0, k, 1] == 1000 + c, k
    np.testing.assert_allclose(body[0, 1], [5.5, 1005.5, 0.9])
    np.testing.assert_array_equal(body[1, 1], [0, 0, 0])
    np.testing.assert_array_equal(body[1, 2], [0, 0, 0])
    np.testing.assert_array_equal(face[0, :68, 0], np.arange(23, 91))
    np.testing.assert_array_equal(face[0, 68], body[0, 14])
    np.testing.assert_array_equal(face[0, 69], body[0, 15])
    np.testing.assert_array_equal(hands[0, 0, :, 0][hands[0, 0, :, 2] > 0], [i for i in range(91, 112) if i != 100])
    np.testing.assert_array_equal(hands[0, 1, :, 0], np.arange(112, 133))
    used = np.concatenate([body[..., 0].ravel(), face[..., 0].ravel(), hands[..., 0].ravel()])
    assert not np.isin(np.arange(17, 23), used).any()   # feet are dropped


# --- model signatures and providers ------------------------------------------------------------

def test_tiny_models_have_the_real_signatures(tiny_models):
    det, _ = dwpose.open_session(tiny_models.det)
    pose, _ = dwpose.open_session(tiny_models.pose)
    assert [(i.name, i.shape) for i in det.get_inputs()] == [("images", [1, 3, 640, 640])]
    assert [(o.name, o.shape) for o in det.get_outputs()] == [("output", [1, 8400, 85])]
    assert [(i.name, i.shape) for i in pose.get_inputs()] == [("input", [1, 3, 384, 288])]
    assert [(o.name, o.shape) for o in pose.get_outputs()] == [("simcc_x", [1, 133, 576]), ("simcc_y", [1, 133, 768])]
    assert dwpose.check_detector(det, tiny_models.det).size == (640, 640)
    spec = dwpose.check_pose_model(pose, tiny_models.pose)
    assert (spec.size, spec.x_name, spec.y_name, spec.batched) == ((384, 288), "simcc_x", "simcc_y", False)


@pytest.mark.parametrize("name, as_detector, match", [
    ("detector_6", True, r"output \[1, 8400, 6\]"),
    ("detector_nms", True, r"num_dets \[1, 1\], det_boxes"),
    ("pose_17", False, r"simcc_x \[1, 17, 576\]"),
    ("pose_one_output", False, "whole-body model"),
])
def test_wrong_signature_is_refused(tiny_models, name, as_detector, match):
    path = tiny_models.wrong[name]
    session, _ = dwpose.open_session(path)
    check = dwpose.check_detector if as_detector else dwpose.check_pose_model
    with pytest.raises(ValueError, match=match) as err:
        check(session, path)
    assert "https://huggingface.co/yzd-v/DWPose" in str(err.value)


def test_swapped_files_are_refused(tiny_models):
    with pytest.raises(ValueError, match="not the YOLOX person detector"):
        dwpose.DWPose(tiny_models.pose, tiny_models.pose)
    with pytest.raises(ValueError, match="not the DWPose whole-body model"):
        dwpose.DWPose(tiny_models.det, tiny_models.det)


def test_damaged_and_missing_files(tmp_path):
    bad = tmp_path / "yolox_l.onnx"
    bad.write_bytes(b"this is not an onnx file")
    with pytest.raises(ValueError, match="could not be opened as an ONNX model"):
        dwpose.open_session(str(bad))
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        dwpose.open_session(str(tmp_path / "nothing.onnx"))


class _FakeSession:
    def __init__(self, used, fail_run):
        self._used, self._fail = used, fail_run

    def get_providers(self):
        return self._used

    def get_inputs(self):
        return [types.SimpleNamespace(name="x", shape=["batch", 3, 8, 8], type="tensor(float)")]

    def run(self, *_):
        if self._fail:
            raise RuntimeError("CUDNN_STATUS_NOT_INITIALIZED")
        return []


def _fake_ort(monkeypatch, loads_cuda, cuda_runs):
    calls = []

    def session(path, providers):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        calls.append(names)
        cuda = dwpose.CUDA in names and loads_cuda
        used = [dwpose.CUDA, dwpose.CPU] if cuda else [dwpose.CPU]
        return _FakeSession(used, fail_run=cuda and not cuda_runs)

    fake = types.SimpleNamespace(get_available_providers=lambda: [dwpose.CUDA, dwpose.CPU], InferenceSession=session)
    monkeypatch.setattr(onnx_session, "_onnxruntime", lambda: fake)
    return calls


@pytest.mark.parametrize("loads_cuda, cuda_runs, expected, tries", [
    (True, True, dwpose.CUDA, 1),     # CUDA really works
    (False, True, dwpose.CPU, 1),     # listed, but its libraries did not load: CPU-only session
    (True, False, dwpose.CPU, 2),     # loads, but fails on its first run: rebuilt on the CPU
])
def test_provider_actually_used(monkeypatch, tiny_models, loads_cuda, cuda_runs, expected, tries):
    calls = _fake_ort(monkeypatch, loads_cuda, cuda_runs)
    _, provider = dwpose.open_session(tiny_models.det, device="cuda")
    assert provider == expected
    assert len(calls) == tries and calls[0][0] == dwpose.CUDA


def test_cpu_requested_never_asks_for_cuda(monkeypatch, tiny_models):
    calls = _fake_ort(monkeypatch, True, True)
    assert dwpose.open_session(tiny_models.det, device="cpu")[1] == dwpose.CPU
    assert calls == [[dwpose.CPU]]


def test_cuda_device_index_reaches_onnxruntime(monkeypatch, tiny_models):
    seen = []
    fake = types.SimpleNamespace(get_available_providers=lambda: [dwpose.CUDA, dwpose.CPU],
                                 InferenceSession=lambda path, providers: seen.append(providers) or
                                 _FakeSession([dwpose.CUDA, dwpose.CPU], fail_run=False))
    monkeypatch.setattr(onnx_session, "_onnxruntime", lambda: fake)
    dwpose.open_session(tiny_models.det, device="cuda:1")
    assert seen == [[(dwpose.CUDA, {"device_id": 1}), dwpose.CPU]]
    assert [dwpose.cuda_device_id(d) for d in ("cuda", "cuda:2", "cpu", "mps")] == [0, 2, None, None]


def test_real_onnxruntime_reports_cpu_here(tiny_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test checks the fallback where there is none")
    # Asked for CUDA on a machine without a GPU: both sessions must really run on the CPU and say so.
    model = dwpose.DWPose(tiny_models.det, tiny_models.pose, device="cuda")
    assert model.provider == dwpose.CPU
    assert model.detector.get_providers()[0] == dwpose.CPU and model.pose.get_providers()[0] == dwpose.CPU


# --- end to end on the tiny models -------------------------------------------------------------

@pytest.mark.parametrize("size, rect", [((256, 192), (70, 60, 130, 200)), ((200, 320), (180, 30, 240, 190))])
def test_dwpose_end_to_end_lands_keypoints_where_expected(tiny_models, size, rect):
    model = dwpose.DWPose(tiny_models.det, tiny_models.pose)
    img = _person_image(*size, rect=rect)
    boxes, scores = model.detect(img)
    assert boxes.shape == (1, 4), "the two anchors of one box must merge in NMS"
    np.testing.assert_allclose(boxes[0], rect, atol=1.0)
    people = model(img)
    assert people.count == 1
    coco = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, None, 3]
    for k, c in enumerate(coco):
        if c is None:
            continue
        np.testing.assert_allclose(people.body[0, k, :2], _expected_points(rect, [c])[0], atol=1.5)
        assert people.body[0, k, 2] > 0.3
    np.testing.assert_allclose(people.body[0, 1, :2], _expected_points(rect, [5, 6]).mean(0), atol=1.5)
    assert people.body[0, 16, 2] == 0, "the right ear has a low score in the tiny model: missing"
    np.testing.assert_allclose(people.face[0, :68, :2], _expected_points(rect, np.arange(23, 91)), atol=1.5)
    np.testing.assert_allclose(people.hands[0, 0, :, :2], _expected_points(rect, np.arange(91, 112)), atol=1.5)
    np.testing.assert_allclose(people.hands[0, 1, :, :2], _expected_points(rect, np.arange(112, 133)), atol=1.5)


def test_dwpose_no_person_gives_no_people(tiny_models):
    model = dwpose.DWPose(tiny_models.det, tiny_models.pose)
    people = model(np.full((120, 90, 3), 20, np.uint8))
    assert people.count == 0 and people.body.shape == (0, 18, 3)


def test_batched_and_per_person_pose_runs_agree(tiny_models):
    single = dwpose.DWPose(tiny_models.det, tiny_models.pose)
    batched = dwpose.DWPose(tiny_models.det, tiny_models.batched_pose)
    assert batched.pose_spec.batched and not single.pose_spec.batched
    img = np.full((240, 320, 3), 20, np.uint8)
    rects = [(30, 40, 90, 200), (200, 60, 260, 220)]
    for x0, y0, x1, y1 in rects:
        img[y0:y1, x0:x1] = 230
    boxes = np.array(rects, np.float32)
    p1, s1 = single.estimate(img, boxes)
    p2, s2 = batched.estimate(img, boxes)
    np.testing.assert_allclose(p1, p2, atol=1e-4)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    for i, rect in enumerate(rects):
        np.testing.assert_allclose(p1[i, :17], _expected_points(rect, np.arange(17)), atol=1.5)
