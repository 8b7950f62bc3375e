"""TCAN Pose Edit (issue 15 part 4) and the scrubber's preview payload (nodes/previews.py)."""

from __future__ import annotations

import importlib
import json
import os

import cv2
import numpy as np
import pytest

from conftest import node
from tcan_core.pose.edit import apply_edits, parse_edits
from tcan_core.pose_format import parse_pose_keypoint


def person(shift: float = 0.0, drop: tuple = ()) -> dict:
    pts = []
    for k in range(18):
        pts += [0.0, 0.0, 0.0] if k in drop else [100.0 + 10 * k + shift, 50.0 + 20 * k, 0.9]
    return {"pose_keypoints_2d": pts}


def clip(frames: int = 6, empty: tuple = (), shift_per_frame: float = 4.0) -> list[dict]:
    return [{"canvas_width": 512, "canvas_height": 768,
             "people": [] if f in empty else [person(shift_per_frame * f)]} for f in range(frames)]


def edited(poses: list[dict], edits: list[dict]):
    return apply_edits(parse_pose_keypoint(poses), parse_edits(json.dumps(edits)))


def test_move_sets_the_point_and_only_that_point():
    before = parse_pose_keypoint(clip())
    res = edited(clip(), [{"op": "move", "frame": 2, "point": 4, "x": 300.5, "y": 12.0}])
    assert res.applied == 1 and not res.problems
    assert res.poses.body[2, 0, 4].tolist() == pytest.approx([300.5, 12.0, 0.9])
    changed = np.argwhere(np.any(res.poses.body != before.body, axis=-1))
    assert changed.tolist() == [[2, 0, 4]]


def test_move_of_a_missing_point_makes_it_seen():
    poses = clip()
    poses[1]["people"][0] = person(4.0, drop=(7,))
    res = edited(poses, [{"op": "move", "frame": 1, "point": 7, "x": 10, "y": 20}])
    assert res.poses.body[1, 0, 7].tolist() == [10.0, 20.0, 1.0]


def test_delete_over_a_range_reports_frames_without_the_person():
    res = edited(clip(empty=(3,)), [{"op": "delete", "frames": [1, 4], "point": 0}])
    assert (res.poses.body[[1, 2, 4], 0, 0] == 0).all()
    assert (res.poses.body[[0, 5], 0, 0, 2] > 0).all()
    assert res.applied == 1
    assert len(res.problems) == 1 and "frame(s) 3 have no person 0" in res.problems[0]
    assert "applied to the other frames" in res.problems[0]


def test_copy_puts_the_source_pose_on_frames_that_lost_the_person():
    poses = clip(empty=(3, 4))
    res = edited(poses, [{"op": "copy", "source": 2, "frames": [3, 4]}])
    assert res.poses.people.tolist() == [1] * 6
    np.testing.assert_array_equal(res.poses.body[3], res.poses.body[2])
    np.testing.assert_array_equal(res.poses.body[4], res.poses.body[2])


def test_interpolate_is_linear_between_the_ends_and_skips_points_missing_at_an_end():
    poses = clip(empty=(2,))
    poses[4]["people"][0] = person(16.0, drop=(5,))
    res = edited(poses, [{"op": "interpolate", "frames": [1, 4]}])
    body = res.poses.body
    for f in (2, 3):
        t = (f - 1) / 3
        np.testing.assert_allclose(body[f, 0, 0], (1 - t) * body[1, 0, 0] + t * body[4, 0, 0], rtol=1e-6)
    assert body[2, 0, 5, 2] == 0  # frame 2 had no person and point 5 is missing at frame 4
    assert body[3, 0, 5].tolist() == pytest.approx(parse_pose_keypoint(clip()).body[3, 0, 5].tolist())


@pytest.mark.parametrize("edit, message", [
    ({"op": "move", "frame": 9, "point": 1, "x": 1, "y": 1}, "frame 9 is past the end of the clip (6 frames, 0-5)"),
    ({"op": "move", "frame": 1, "person": 2, "point": 1, "x": 1, "y": 1}, "have no person 2 (people there: 1)"),
    ({"op": "copy", "source": 3, "frames": [0, 1]}, "source frame(s) 3 have no person 0"),
    ({"op": "interpolate", "frames": [0, 3]}, "end frame(s) 3 have no person 0"),
])
def test_an_edit_for_a_missing_frame_or_person_is_reported_not_dropped(edit, message):
    before = parse_pose_keypoint(clip(empty=(3,)))
    res = edited(clip(empty=(3,)), [edit])
    assert res.applied == 0
    assert len(res.problems) == 1 and message in res.problems[0], res.problems
    assert res.problems[0].startswith("edit 0 (")
    assert message in res.summary()
    np.testing.assert_array_equal(res.poses.body, before.body)


def test_edits_name_frames_and_points_so_they_survive_a_changed_upstream():
    edits = [{"op": "move", "frame": 2, "point": 4, "x": 300.0, "y": 40.0}, {"op": "delete", "frames": [0, 5], "point": 9}]
    for shift in (4.0, -7.0):  # the detector ran again and its points moved
        res = edited(clip(shift_per_frame=shift), edits)
        assert res.poses.body[2, 0, 4, :2].tolist() == [300.0, 40.0]
        assert (res.poses.body[:, 0, 9] == 0).all()


@pytest.mark.parametrize("text, message", [
    ('[{"op": "move", "frame": 1,', "not valid JSON"),
    ('{"op": "move"}', "must be a JSON list, got a dict"),
    ('[{"op": "stretch"}]', "'op' must be one of move, delete, copy, interpolate, got 'stretch'"),
    ('[{"op": "move", "frame": 1, "point": 18, "x": 1, "y": 1}]', "'point' of the body must be 0..17, got 18"),
    ('[{"op": "move", "frame": -1, "point": 1, "x": 1, "y": 1}]', "'frame' must be a whole number >= 0, got -1"),
    ('[{"op": "move", "frame": 1, "point": 1, "x": "a", "y": 1}]', "'x' must be a number of pixels, got 'a'"),
    ('[{"op": "delete", "frames": [5, 2], "point": 1}]', "first <= last, got [5, 2]"),
    ('[{"op": "interpolate", "frames": [2, 3]}]', "no frame strictly between"),
    ('[{"op": "delete", "frames": [1, 2], "point": 1, "part": "tail"}]', "'part' must be one of"),
])
def test_bad_edit_text_is_a_clear_error(text, message):
    with pytest.raises(ValueError) as err:
        parse_edits(text)
    assert message in str(err.value)


def test_empty_text_is_no_edit():
    assert parse_edits("") == [] and parse_edits("  []  ") == []


def test_pose_edit_node_returns_the_edited_poses_and_a_scrubber_payload(pack):
    out = node(pack, "TCANPoseEdit").edit(clip(empty=(5,)), json.dumps(
        [{"op": "move", "frame": 0, "point": 1, "x": 11.0, "y": 22.0}, {"op": "move", "frame": 9, "point": 1, "x": 1, "y": 1}]))
    poses = out["result"][0]
    assert poses[0]["people"][0]["pose_keypoints_2d"][3:6] == [11.0, 22.0, 0.9]
    ui = out["ui"]
    assert "1 edit(s) applied to 6 frames; 1 not applied" in ui["text"][0] and "frame 9 is past the end" in ui["text"][0]
    assert [m["frame"] for m in ui["tcan_marks"]] == [5] and ui["tcan_marks"][0]["reasons"] == ["no person"]
    (pose,) = ui["tcan_pose"]
    assert (pose["width"], pose["height"], len(pose["frames"])) == (512, 768, 6)
    assert pose["frames"][0][0][1] == [11.0, 22.0, 0.9] and pose["frames"][5] == []
    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    assert len(ui["images"]) == 6
    for entry in ui["images"]:
        assert entry["type"] == "temp" and entry["subfolder"] == "tcan_preview"
        image = cv2.imread(os.path.join(host.temp_directory(), entry["subfolder"], entry["filename"]))
        assert image.shape == (256, 171, 3)  # longest side 256, aspect of 512 x 768 kept


def test_pose_edit_node_rejects_invalid_json(pack):
    with pytest.raises(ValueError, match="not valid JSON .* Fix the 'edits' text of TCAN Pose Edit"):
        node(pack, "TCANPoseEdit").edit(clip(), "[{")


def test_preview_nodes_serve_their_frames_as_ui_images(pack):
    """Every scrubbable node of this pack (Retarget aside: its own preview) returns ui.images, one per frame."""
    poses = clip(empty=(1,))
    outs = {
        "TCANPoseSmooth": node(pack, "TCANPoseSmooth").smooth(poses, 0, True, 1.0, 0.0, 30.0),
        "TCANPoseRender": node(pack, "TCANPoseRender").render(poses, 64, 96, True, True, True),
    }
    for name, out in outs.items():
        assert len(out["ui"]["images"]) == 6, name
        assert [m["frame"] for m in out["ui"]["tcan_marks"]] == [1], name


def test_preview_frames_are_downscaled_jpegs(pack):
    previews = importlib.import_module(f"{pack.__name__}.nodes.previews")
    frames = np.zeros((3, 40, 1000, 3), np.float32)
    frames[1] = 1.0
    entries = previews.save_preview_frames(frames, "t")
    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    images = [cv2.imread(os.path.join(host.temp_directory(), e["subfolder"], e["filename"])) for e in entries]
    assert [im.shape for im in images] == [(10, 256, 3)] * 3
    assert images[0].max() == 0 and images[1].min() == 255
    with pytest.raises(ValueError, match=r"must be \[frames, height, width, 3\], got shape \(40, 1000, 3\)"):
        previews.save_preview_frames(frames[0], "t")
