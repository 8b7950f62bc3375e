"""Backend-independent extraction: person choice and tracking, toggles, errors, model lookup, OpenPose."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tcan_core.pose import extract
from tcan_core.pose.extract import FramePeople

# An 18-point body around its neck, in units of the person's height.
BODY_TEMPLATE = np.array([
    [0.0, -0.15], [0.0, 0.0], [-0.12, 0.0], [-0.18, 0.2], [-0.2, 0.4], [0.12, 0.0], [0.18, 0.2],
    [0.2, 0.4], [-0.08, 0.35], [-0.09, 0.6], [-0.1, 0.85], [0.08, 0.35], [0.09, 0.6], [0.1, 0.85],
    [-0.03, -0.18], [0.03, -0.18], [-0.06, -0.16], [0.06, -0.16],
], np.float32)


def person(neck_x: float, neck_y: float, height: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    body = np.concatenate([BODY_TEMPLATE * height + [neck_x, neck_y], np.ones((18, 1))], 1).astype(np.float32)
    face = np.zeros((70, 3), np.float32)
    face[:, :2] = [neck_x, neck_y - 0.15 * height]
    face[:, 2] = 1.0
    hands = np.zeros((2, 21, 3), np.float32)
    hands[0, :, :2], hands[1, :, :2] = body[7, :2], body[4, :2]
    hands[..., 2] = 1.0
    return body, face, hands


def frame(*people, with_boxes: bool = False) -> FramePeople:
    if not people:
        return FramePeople.empty()
    parts = [person(*p) for p in people]
    fp = FramePeople(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts]))
    if with_boxes:
        fp.boxes = fp.person_boxes()
    return fp


class Scripted:
    """A backend that returns prepared people, one FramePeople per call, and records what it saw."""

    provider = "scripted"

    def __init__(self, frames):
        self.frames = list(frames)
        self.seen_shapes = []

    def __call__(self, image):
        self.seen_shapes.append(image.shape)
        return self.frames[len(self.seen_shapes) - 1]


def blank(n: int, h: int = 240, w: int = 320) -> np.ndarray:
    return np.zeros((n, h, w, 3), np.float32)


def run(frames_people, **kw):
    kw.setdefault("detect_resolution", 0)
    return extract.extract_poses(blank(len(frames_people)), Scripted(frames_people), **kw)


def necks(result) -> np.ndarray:
    return result.poses.body[:, 0, 1, :2]


# --- person choice, kept through the clip ----------------------------------------------------

def test_largest_is_chosen_then_followed_even_when_another_grows():
    a = [(80 + 4 * f, 100, 120) for f in range(6)]
    b = [(240, 100, 90 + 15 * f) for f in range(6)]          # larger than a from frame 3 on
    frames = [frame(a[f], b[f]) if f % 2 else frame(b[f], a[f]) for f in range(6)]
    result = run(frames, person=extract.PERSON_LARGEST)
    np.testing.assert_allclose(necks(result), [p[:2] for p in a])
    assert result.people_found.tolist() == [2] * 6 and result.empty_frames == []


def test_most_central_ignores_a_larger_person_at_the_edge():
    frames = [frame((40, 100, 200), (165, 110, 100 + f)) for f in range(3)]
    result = run(frames, person=extract.PERSON_CENTRAL)
    np.testing.assert_allclose(necks(result), [[165, 110]] * 3)


def test_index_counts_left_to_right_whatever_the_detector_order():
    left, right = (60, 100, 100), (250, 100, 100)
    frames = [frame(right, left), frame(left, right), frame(right, left)]
    assert run(frames, person=extract.PERSON_INDEX, index=1).poses.body[:, 0, 1, 0].tolist() == [250] * 3
    assert run(frames, person=extract.PERSON_INDEX, index=0).poses.body[:, 0, 1, 0].tolist() == [60] * 3


def test_index_beyond_the_people_found_is_an_error():
    with pytest.raises(ValueError, match="person index 2.*no frame has more than 2"):
        run([frame((60, 100, 100), (250, 100, 100))], person=extract.PERSON_INDEX, index=2)


def test_index_starts_where_enough_people_are_and_tracks_backwards():
    left, right = (60, 100, 100), (250, 100, 100)
    only_left = [frame(left), frame(left), frame(left, right), frame(right, left)]
    result = run(only_left, person=extract.PERSON_INDEX, index=1)
    assert result.empty_frames == [0, 1]
    assert result.poses.people.tolist() == [0, 0, 1, 1]
    only_right = [frame(right), frame(right), frame(left, right), frame(right, left)]
    result = run(only_right, person=extract.PERSON_INDEX, index=1)
    assert result.empty_frames == [] and result.poses.body[:, 0, 1, 0].tolist() == [250] * 4


def test_frames_without_the_person_stay_empty_and_are_counted():
    a = (100, 100, 100)
    result = run([frame(a), frame(), frame(a), frame()])
    assert result.empty_frames == [1, 3]
    assert result.poses.people.tolist() == [1, 0, 1, 0]
    assert not result.poses.body[[1, 3]].any()
    assert "2 frame(s) without the person" in result.summary() and "1, 3" in result.summary()


def test_fast_motion_is_followed_by_neck_distance():
    # a moves 60 px per frame (its keypoint box is ~48 px wide: no overlap), b stays far right
    frames = [frame((40 + 60 * f, 100, 120), (300, 100, 130)) for f in range(4)]
    boxes = frames[0].person_boxes()
    assert extract.box_iou(boxes[0], frames[1].person_boxes())[0] == 0
    result = run(frames, person=extract.PERSON_CENTRAL)
    assert result.poses.body[:, 0, 1, 0].tolist() == [40, 100, 160, 220]


def test_a_far_stranger_is_not_taken_for_the_lost_person():
    frames = [frame((60, 100, 60)), frame((280, 100, 60))]
    result = run(frames)
    assert result.empty_frames == [1]


def test_detector_boxes_are_used_for_overlap():
    frames = [frame((60, 100, 100), (250, 100, 100), with_boxes=True) for _ in range(2)]
    frames[1].boxes = frames[1].boxes[::-1].copy()
    frames[1].body = frames[1].body[::-1].copy()
    result = run(frames, person=extract.PERSON_INDEX, index=0)
    assert result.poses.body[:, 0, 1, 0].tolist() == [60, 60]


# --- toggles, resolution, progress -------------------------------------------------------------

@pytest.mark.parametrize("body, hands, face", [(False, True, True), (True, False, True), (True, True, False)])
def test_toggles_remove_only_their_part(body, hands, face):
    result = run([frame((100, 100, 100))], body=body, hands=hands, face=face)
    seq = result.poses
    assert (seq.body[..., 2] > 0).any() == body
    assert (seq.hands[..., 2] > 0).any() == hands
    assert (seq.face[..., 2] > 0).any() == face
    assert seq.people.tolist() == [1]


def test_detection_resolution_resizes_and_maps_back():
    class Fractions:
        provider = "x"
        shapes = []

        def __call__(self, image):
            h, w = image.shape[:2]
            self.shapes.append((h, w))
            return frame((0.5 * w, 0.25 * h, 0.5 * h))

    backend = Fractions()
    result = extract.extract_poses(blank(2, 100, 200), backend, detect_resolution=50)
    assert backend.shapes == [(50, 100), (50, 100)]
    np.testing.assert_allclose(necks(result), [[100, 25]] * 2)
    assert (result.poses.width, result.poses.height) == (200, 100)
    extract.extract_poses(blank(1, 100, 200), backend, detect_resolution=0)
    assert backend.shapes[-1] == (100, 200)
    with pytest.raises(ValueError, match="-64"):
        extract.extract_poses(blank(1), backend, detect_resolution=-64)


def test_progress_after_each_frame_and_interrupt_before_each():
    ticks, checks = [], []
    run([frame((100, 100, 100))] * 3, progress=ticks.append, check_interrupt=lambda: checks.append(1))
    assert ticks == [1, 1, 1] and len(checks) == 3

    class Cancelled(Exception):
        pass

    backend = Scripted([frame((100, 100, 100))] * 5)

    def interrupt():
        if len(backend.seen_shapes) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        extract.extract_poses(blank(5), backend, check_interrupt=interrupt, detect_resolution=0)
    assert len(backend.seen_shapes) == 2


def test_float_and_uint8_frames_reach_the_backend_as_uint8():
    seen = []

    def backend(image):
        seen.append((image.dtype, int(image[0, 0, 0])))
        return frame((10, 10, 10))

    frames = np.full((1, 8, 8, 3), 0.5, np.float32)
    extract.extract_poses(frames, backend, detect_resolution=0)
    extract.extract_poses((frames * 255).astype(np.uint8), backend, detect_resolution=0)
    assert seen == [(np.uint8, 128), (np.uint8, 127)]


# --- errors --------------------------------------------------------------------------------------

def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        extract.extract_poses(np.zeros((0, 8, 8, 3), np.float32), Scripted([]))


def test_frames_of_different_sizes_are_an_error():
    frames = [np.zeros((64, 48, 3), np.uint8), np.zeros((64, 48, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"different sizes \(48 x 32, 48 x 64\)"):
        extract.extract_poses(frames, Scripted([frame()] * 3))


def test_no_person_in_any_frame_is_an_error():
    with pytest.raises(ValueError, match="no person was found in any of the 3 frame"):
        run([frame(), frame(), frame()])


def test_bad_choices_and_frames_are_errors():
    with pytest.raises(ValueError, match="'tallest'"):
        run([frame((10, 10, 10))], person="tallest")
    with pytest.raises(ValueError, match=r"\[8, 8, 4\]"):
        extract.extract_poses(np.zeros((1, 8, 8, 4), np.uint8), Scripted([frame()]))


# --- boxes and preview ---------------------------------------------------------------------------

def test_person_boxes_from_seen_points_only():
    fp = frame((100, 100, 100))
    fp.body[0, 10] = [900, 900, 0]      # an unseen point far away must not stretch the box
    fp.hands[0] = 0
    fp.face[0] = 0
    box = fp.person_boxes()[0]
    pts = fp.body[0][fp.body[0, :, 2] > 0, :2]
    np.testing.assert_allclose(box, [*pts.min(0), *pts.max(0)])
    assert extract.box_iou(box, np.array([box, box + 1000]))[0] == pytest.approx(1.0)


def test_preview_draws_skeleton_over_dimmed_frames():
    frames = np.full((2, 120, 160, 3), 0.8, np.float32)
    result = extract.extract_poses(frames, Scripted([frame((80, 40, 80)), frame()]), detect_resolution=0)
    preview = extract.preview_frames(frames, result.poses)
    assert preview.shape == frames.shape and preview.dtype == np.float32
    drawn = np.abs(preview[0] - 0.4).max(-1) > 1e-3
    assert drawn.any() and not drawn[:, :20].any()
    np.testing.assert_allclose(preview[1], 0.4, atol=1e-6)   # empty frame: only the dimmed picture


# --- model files ---------------------------------------------------------------------------------

def test_find_model_files_in_sub_folders_first_folder_wins(tmp_path):
    pack, aux = tmp_path / "models" / "tcan" / "pose", tmp_path / "custom_nodes" / "aux" / "ckpts"
    (aux / "yzd-v" / "DWPose").mkdir(parents=True)
    (aux / "yzd-v" / "DWPose" / "yolox_l.onnx").write_bytes(b"a")
    (aux / "yzd-v" / "DWPose" / "dw-ll_ucoco_384.onnx").write_bytes(b"b")
    pack.mkdir(parents=True)
    (pack / "YOLOX_L.onnx").write_bytes(b"c")
    found = extract.find_model_files(extract.DWPOSE_FILES, [str(pack), str(tmp_path / "nope"), str(aux)])
    assert found["yolox_l.onnx"] == str(pack / "YOLOX_L.onnx")
    assert found["dw-ll_ucoco_384.onnx"] == str(aux / "yzd-v" / "DWPose" / "dw-ll_ucoco_384.onnx")


def test_missing_files_name_folders_files_and_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "yolox_l.onnx").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as err:
        extract.load_backend(extract.BACKEND_DWPOSE, [str(tmp_path / "a"), str(tmp_path / "b")])
    text = str(err.value)
    assert "dw-ll_ucoco_384.onnx not found" in text and str(tmp_path / "b") in text
    assert "yolox_l.onnx, dw-ll_ucoco_384.onnx" in text and "https://huggingface.co/yzd-v/DWPose" in text


def test_openpose_asks_for_face_and_hand_files_only_when_used(tmp_path):
    (tmp_path / "body_pose_model.pth").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="hand_pose_model.pth, facenet.pth not found"):
        extract.load_backend(extract.BACKEND_OPENPOSE, [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"^[^\n]*: facenet.pth not found"):
        (tmp_path / "hand_pose_model.pth").write_bytes(b"x")
        extract.load_backend(extract.BACKEND_OPENPOSE, [str(tmp_path)], hands=True, face=True)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="'mediapipe'.*dwpose, openpose"):
        extract.load_backend("mediapipe", [])


# --- OpenPose through controlnet_aux -------------------------------------------------------------

def test_openpose_without_controlnet_aux_says_what_to_install(monkeypatch, tmp_path):
    from tcan_core.pose import openpose

    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    monkeypatch.setitem(sys.modules, "controlnet_aux.open_pose", None)
    with pytest.raises(ImportError, match="pip install controlnet_aux"):
        openpose.OpenPose(str(tmp_path / "body_pose_model.pth"))


@pytest.fixture(scope="module")
def openpose_files(tmp_path_factory):
    """The real body network's layout with zero weights (fp16 to halve the file), and a wrong file."""
    pytest.importorskip("controlnet_aux.open_pose")
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    folder = tmp_path_factory.mktemp("openpose")
    with torch.device("meta"):
        net = bodypose_model()
    state = {k.split(".", 1)[1]: torch.zeros(v.shape, dtype=torch.float16) for k, v in net.state_dict().items()}
    torch.save(state, folder / "body_pose_model.pth")
    del state["conv1_1.weight"]
    state["conv1_1.kernel"] = torch.zeros(1)
    torch.save(state, folder / "wrong.pth")
    return folder


def test_openpose_checks_the_file_layout(openpose_files):
    from tcan_core.pose import openpose

    with pytest.raises(ValueError, match=r"missing key\(s\) \['conv1_1.weight'\].*unexpected key\(s\) \['conv1_1.kernel'\]"):
        openpose.OpenPose(str(openpose_files / "wrong.pth"))


def test_openpose_runs_from_local_files_and_reports_no_person(openpose_files):
    backend = extract.load_backend(extract.BACKEND_OPENPOSE, [str(openpose_files)], hands=False, face=False)
    assert backend.provider == "torch cpu"
    assert backend(np.zeros((64, 48, 3), np.uint8)).count == 0   # zero weights: no heatmap peaks
    with pytest.raises(ValueError, match="no person was found"):
        extract.extract_poses(np.zeros((2, 64, 48, 3), np.uint8), backend, detect_resolution=0)


def test_openpose_results_become_pixel_keypoints(openpose_files, monkeypatch):
    from controlnet_aux.open_pose.body import Keypoint

    backend = extract.load_backend(extract.BACKEND_OPENPOSE, [str(openpose_files)], hands=False, face=False)
    # one person: candidate rows (x, y, score, id), subset row = 18 candidate indices, total score, parts
    candidate = np.array([[10.0, 20.0, 0.8, 0], [12.0, 30.0, 0.9, 1], [30.0, 31.0, 0.7, 2]])
    subset = np.array([[0, 1, -1, -1, -1, 2] + [-1] * 12 + [2.4, 3]], np.float64)
    monkeypatch.setattr(type(backend.detector.body_estimation), "__call__", lambda self, img: (candidate, subset))
    people = backend(np.zeros((64, 48, 3), np.uint8))
    assert people.count == 1
    np.testing.assert_allclose(people.body[0, [0, 1, 5]], [[10, 20, 0.8], [12, 30, 0.9], [30, 31, 0.7]], rtol=1e-6)
    assert (people.body[0, [2, 3, 4, 6]] == 0).all()
    # the face: one heatmap peak per landmark; landmark 5 has none and must not shift the others
    candidate = np.array([[24.0, 20.0, 0.8, 0], [24.0, 34.0, 0.9, 1], [20.0, 17.0, 0.7, 2], [28.0, 17.0, 0.7, 3]])
    subset = np.array([[0, 1] + [-1] * 12 + [2, 3, -1, -1, 3.1, 4]], np.float64)
    monkeypatch.setattr(type(backend.detector.body_estimation), "__call__", lambda self, img: (candidate, subset))
    from controlnet_aux.open_pose import util

    body_result = backend.detector.body_estimation.format_body_result(candidate, subset)[0]
    box = util.faceDetect(body_result, np.zeros((64, 48, 3), np.uint8))
    assert box is not None
    x, y, size = box
    rng = np.random.default_rng(0)
    peaks = rng.integers(0, size, (71, 2))

    def heatmaps(crop):
        assert crop.shape[:2] == (min(size, 64 - y), min(size, 48 - x))
        maps = np.zeros((71, *crop.shape[:2]), np.float32)
        maps[np.arange(71), np.minimum(peaks[:, 1], crop.shape[0] - 1), np.minimum(peaks[:, 0], crop.shape[1] - 1)] = 0.5
        maps[5] = 0.01
        return maps

    monkeypatch.setattr(backend.detector, "face_estimation", heatmaps)
    people = backend(np.zeros((64, 48, 3), np.uint8))
    face = people.face[0]
    assert face[5, 2] == 0 and (face[np.arange(70) != 5, 2] == 0.5).all()
    crop_h, crop_w = min(size, 64 - y), min(size, 48 - x)
    expect = np.stack([np.minimum(peaks[:70, 0], crop_w - 1) + x, np.minimum(peaks[:70, 1], crop_h - 1) + y], 1)
    np.testing.assert_array_equal(face[np.arange(70) != 5, :2], expect[np.arange(70) != 5])

    hand = [Keypoint(0.5, 0.25)] * 20 + [Keypoint(-1 / 48, -1 / 64)]
    pts = type(backend)._hand_points(hand, 48, 64)
    np.testing.assert_allclose(pts[0], [24, 16, 1])
    np.testing.assert_array_equal(pts[20], [0, 0, 0])
