"""Retargeting you can check (issue 15, part 3): per-frame marks, the report and the preview over the reference."""

from __future__ import annotations

import numpy as np
import pytest

from tcan_core.pose.retarget import MODE_ALGORITHM_1, MODE_AUTHORS, MODES, retarget_poses
from tcan_core.pose.retarget_check import (REPORT_LINES, check_retarget, preview_on_reference, retarget_and_check)
from tcan_core.pose_format import PoseSequence

# A standing figure (OpenPose-18, pixels): nose, neck, right arm, left arm, right leg, left leg, eyes, ears.
FIGURE = np.array([(256, 110), (256, 170), (196, 170), (170, 250), (160, 330), (316, 170), (342, 250), (352, 330),
                   (226, 320), (220, 400), (215, 480), (286, 320), (292, 400), (297, 480), (236, 95), (276, 95),
                   (216, 105), (296, 105)], np.float64)


def clip_of(frames: int) -> np.ndarray:
    """``[F,18,3]`` the figure, swaying a few pixels sideways."""
    body = np.zeros((frames, 18, 3))
    body[..., :2] = FIGURE[None] + np.stack([3.0 * np.sin(np.arange(frames)), np.zeros(frames)], -1)[:, None]
    body[..., 2] = 1.0
    return body


def seq(body: np.ndarray) -> PoseSequence:
    out = PoseSequence.empty(body.shape[0], 1, 512, 512)
    out.body[:, 0] = body
    out.people[:] = (body[..., 2] > 0).any(1)
    return out


def marks_of(body: np.ndarray, mode: str = MODE_AUTHORS, **kw) -> dict[int, list[str]]:
    ref = seq(clip_of(1))
    res = retarget_poses(ref, seq(body), mode=mode)
    return {m["frame"]: m["reasons"] for m in check_retarget(ref, seq(body), res, **kw)}


@pytest.mark.parametrize("mode", MODES)
def test_a_clean_clip_has_no_marks(mode):
    assert marks_of(clip_of(6), mode) == {}


def test_a_glitched_long_forearm_is_marked_in_its_frame():
    body = clip_of(6)
    body[3, 4, :2] = body[3, 3, :2] + 1.8 * (body[3, 4, :2] - body[3, 3, :2])  # right forearm 80% too long
    assert marks_of(body, MODE_ALGORITHM_1) == {3: ["r-elbow>r-wrist is 180% of the character's length"]}


def test_the_clip_keeps_a_glitch_inside_the_tolerance_and_a_tight_tolerance_shows_it():
    body = clip_of(6)
    body[3, 4, :2] = body[3, 3, :2] + 1.8 * (body[3, 4, :2] - body[3, 3, :2])
    assert marks_of(body, MODE_AUTHORS) == {}
    assert marks_of(body, MODE_AUTHORS, tolerance=0.05) == {3: ["r-elbow>r-wrist is 110% of the character's length"]}


def test_missing_joints_and_missing_person_are_marked():
    body = clip_of(5)
    body[1, [4, 13]] = 0.0
    body[2] = 0.0
    marks = marks_of(body, MODE_AUTHORS)
    assert marks == {1: ["missing in the driving pose: r-wrist, l-ankle"], 2: ["no person in the driving pose"]}


def test_a_joint_the_character_lacks_is_not_reported_missing():
    ref = clip_of(1)
    ref[0, 10] = 0.0  # the character's right ankle is not seen
    body = clip_of(3)
    body[1, 10] = 0.0
    res = retarget_poses(seq(ref), seq(body))
    assert check_retarget(seq(ref), seq(body), res) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_flipped_limb_is_marked_when_it_turns_past_the_threshold(mode):
    body = clip_of(5)
    # Frame 2: the left forearm points up instead of down (a 180 degree turn); frame 3 turns it back.
    body[2, 7, :2] = 2 * body[2, 6, :2] - body[2, 7, :2]
    marks = marks_of(body, mode)
    assert set(marks) == {2, 3}
    assert any("l-elbow>l-wrist turned 180 deg since frame 1" in r for r in marks[2])
    assert any("since frame 2" in r for r in marks[3])
    assert marks_of(body, mode, angle_threshold=180.0) == {}


def test_bad_thresholds_are_refused():
    ref = seq(clip_of(1))
    res = retarget_poses(ref, ref)
    with pytest.raises(ValueError, match="length tolerance must be a positive fraction .* got -0.1"):
        check_retarget(ref, ref, res, tolerance=-0.1)
    with pytest.raises(ValueError, match="angle threshold must be between 0 and 180 degrees, got 200"):
        check_retarget(ref, ref, res, angle_threshold=200)


def test_preview_draws_the_skeleton_over_the_dimmed_reference_and_downscales():
    ref = seq(clip_of(1))
    image = np.full((512, 512, 3), 200, np.uint8)
    check = retarget_and_check(ref, seq(clip_of(3)), image=image, preview_size=256)
    prev = check.preview
    assert prev.shape == (3, 256, 256, 3) and prev.dtype == np.uint8
    background = (prev == 120).all(-1)  # 200 * 0.6
    assert 0.5 < background.mean() < 0.999
    assert (prev[~background] != 120).any()
    # The skeleton is where the retargeted neck is (the clip sits on the character: neck at 256, 170).
    neck = prev[:, 85, 128]
    assert not (neck == 120).all(-1).any()
    black = preview_on_reference(check.result.poses, None, 512)
    assert black.shape == (3, 512, 512, 3) and black[0, 0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="uint8"):
        preview_on_reference(check.result.poses, image.astype(np.float32), 512)


def test_driving_canvas_still_previews_on_the_reference():
    ref = PoseSequence.empty(1, 1, 384, 512)
    ref.body[0, 0] = clip_of(1)[0]
    ref.people[:] = 1
    check = retarget_and_check(ref, seq(clip_of(2)), canvas="driving", mode=MODE_ALGORITHM_1, preview_size=512)
    assert (check.result.poses.width, check.result.poses.height) == (512, 512)
    assert check.preview.shape == (2, 512, 384, 3)


def test_report_lists_the_marked_frames_and_caps_the_list():
    body = clip_of(REPORT_LINES + 10)
    body[1:, 13] = 0.0
    check = retarget_and_check(seq(clip_of(1)), seq(body))
    lines = check.report.splitlines()
    assert f"checks: {REPORT_LINES + 9} of {REPORT_LINES + 10} frames marked" in lines
    assert "frame 1: missing in the driving pose: l-ankle" in lines
    assert lines[-1] == "... and 9 more marked frames (all are on the timeline)"
    assert len(check.marks) == REPORT_LINES + 9
