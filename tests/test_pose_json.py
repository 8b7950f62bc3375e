"""POSE_KEYPOINT JSON files: Pose Save -> Pose Load, foreign files, malformed files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tcan_core.paths import safe_join
from tcan_core.pose import pose_json


def clip(frames: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for f in range(frames):
        people = []
        for _ in range(f % 3):
            body = np.c_[rng.uniform(10, 500, (18, 2)).round(3), rng.uniform(0.2, 1, 18).round(3)]
            body[4] = 0.0
            people.append({
                "pose_keypoints_2d": body.reshape(-1).tolist(),
                "face_keypoints_2d": np.c_[rng.uniform(10, 500, (70, 2)).round(3), np.ones(70)].reshape(-1).tolist(),
                "hand_left_keypoints_2d": [0.0] * 63,
                "hand_right_keypoints_2d": np.c_[rng.uniform(10, 500, (21, 2)).round(3), np.ones(21)].reshape(-1).tolist(),
            })
        out.append({"canvas_width": 640, "canvas_height": 480, "people": people})
    return out


def test_save_then_load_nodes_give_identical_poses(pack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save = pack.NODE_CLASS_MAPPINGS["TCANPoseSave"]()
    load = pack.NODE_CLASS_MAPPINGS["TCANPoseLoad"]
    poses = clip(5)
    first = save.save(poses, "poses/run")
    assert "saved 5 frames" in save.save(poses, "poses/run")["ui"]["text"][0]
    assert "saved 5 frames" in first["ui"]["text"][0] and first["result"] == ()
    assert sorted(os.listdir(tmp_path / "poses")) == ["run_00001.json", "run_00002.json"]
    assert "poses/run_00002.json" in load.INPUT_TYPES()["required"]["file"][0]
    loaded = load().load("poses/run_00002.json", "")["result"][0]
    assert loaded == poses
    assert load().load("ignored.json", "poses/run_00001.json")["result"][0] == poses
    assert load.IS_CHANGED("poses/run_00001.json", "") == os.path.getmtime(tmp_path / "poses/run_00001.json")


def test_controlnet_aux_style_file_with_normalised_coordinates_loads(tmp_path):
    body = [0.5, 0.25, 0.9] + [0.0, 0.0, 0.0] * 16 + [0.75, 0.5, 0.8]
    frame = {"people": [{"pose_keypoints_2d": body, "face_keypoints_2d": None,
                         "hand_left_keypoints_2d": None, "hand_right_keypoints_2d": None}],
             "canvas_height": 400, "canvas_width": 600, "animals": []}
    path = tmp_path / "aux.json"
    path.write_text(json.dumps([frame, {"people": [], "canvas_height": 400, "canvas_width": 600, "animals": []}]))
    loaded = pose_json.load_pose_json(path)
    assert len(loaded) == 2 and loaded[1]["people"] == []
    person = loaded[0]["people"][0]
    assert person["pose_keypoints_2d"][:3] == [300.0, 100.0, 0.9]
    assert person["pose_keypoints_2d"][-3:] == [450.0, 200.0, 0.8]
    assert person["face_keypoints_2d"] == [0.0] * 210
    assert "animals" not in loaded[0]


def test_single_frame_dict_is_accepted(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(clip(2)[1]))
    assert pose_json.load_pose_json(path) == [clip(2)[1]]


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2, 3]", "frame 0 is int, not a pose frame"),
    ('"hello"', "holds a JSON str"),
    ("[]", "empty list"),
    ('{"last_node_id": 3, "nodes": [], "links": []}', "not a pose frame"),
    ('[{"people": [], "canvas_width": 64}]', "canvas_width/canvas_height"),
    ('[{"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": [1, 2, 1]}]}]',
     "must hold 18 points"),
    ('[{"canvas_width": 64, "canvas_height": 64, "people": []}, '
     '{"canvas_width": 32, "canvas_height": 64, "people": []}]', "different canvas sizes"),
])
def test_malformed_or_foreign_json_says_what_was_expected(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        pose_json.load_pose_json(path)
    assert "bad.json" in str(err.value)


def test_binary_and_missing_files(tmp_path):
    path = tmp_path / "img.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="not a text file"):
        pose_json.load_pose_json(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        pose_json.load_pose_json(tmp_path / "nope.json")


def test_names_cannot_leave_the_folder(tmp_path):
    inside = tmp_path / "input"
    inside.mkdir()
    (tmp_path / "secret.json").write_text("[]")
    os.symlink(tmp_path / "secret.json", inside / "link.json")
    for name in ("../secret.json", str(tmp_path / "secret.json"), "link.json", ""):
        with pytest.raises(ValueError):
            safe_join(inside, name)
    assert safe_join(inside, "sub/a.json") == (inside / "sub/a.json").resolve()


def test_load_node_refuses_paths_outside_the_input_folder(pack, tmp_path, monkeypatch):
    (tmp_path / "input").mkdir()
    (tmp_path / "outside.json").write_text(json.dumps(clip(1)))
    monkeypatch.chdir(tmp_path / "input")
    load = pack.NODE_CLASS_MAPPINGS["TCANPoseLoad"]()
    with pytest.raises(ValueError, match="no absolute paths"):
        load.load("", "../outside.json")
    with pytest.raises(ValueError, match="no pose file chosen"):
        load.load("", "  ")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load.load("missing.json", "")


def test_next_numbered_path_continues_after_the_highest_number(tmp_path):
    (tmp_path / "pose_00007.json").write_text("[]")
    (tmp_path / "pose_extra_00009.json").write_text("[]")
    assert pose_json.next_numbered_path(tmp_path, "pose").name == "pose_00008.json"
    with pytest.raises(ValueError):
        pose_json.next_numbered_path(tmp_path, "../pose")
