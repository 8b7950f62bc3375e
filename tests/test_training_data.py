"""Training data: the three folder layouts, the two stages' datasets (the authors' sampling rules, one crop
for every image of an item, items fixed by (seed, n) alone) and ``prepare-data`` with the tiny DWPose models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from tcan_core.training import data as training_data
from tcan_core.training.data import ClipDataset, PairDataset, crop_params, load_clips, size_check

H, W = 48, 64


def _png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def index_value(i: int) -> int:
    """Red value of frame ``i`` of an indexed clip (its pose image has that value + 2)."""
    return 8 * i + 4


def indexed_clip(folder, frames: int, poses: int | None = None, names=None) -> None:
    """Flat-coloured frames whose red channel tells the frame index (a flat image stays flat under any crop)."""
    names = names or [f"{i:04d}.png" for i in range(frames)]
    for i in range(frames):
        _png(folder / "images" / names[i], np.full((H, W, 3), (index_value(i), 50, 60)))
    for i in range(frames if poses is None else poses):
        _png(folder / "dwpose" / names[i], np.full((H, W, 3), (index_value(i) + 2, 0, 0)))


def textured_clip(folder, frames: int, seed: int = 0) -> None:
    """Every frame and every pose image is the same random texture: one crop makes them all equal."""
    texture = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    for i in range(frames):
        _png(folder / "images" / f"{i:03d}.png", texture)
        _png(folder / "dwpose" / f"{i:03d}.png", texture)


def red(image: torch.Tensor, images: bool = True) -> float:
    """The red value (0..255) of a flat [3,H,W] image in -1..1 (``images``) or 0..1."""
    value = (image[0] + 1) / 2 if images else image[0]
    assert float(value.max() - value.min()) < 1e-5
    return float(value.mean()) * 255


# --- layouts ---------------------------------------------------------------------------------------

def test_authors_layout_in_natural_order(tmp_path):
    indexed_clip(tmp_path / "train" / "video_10", 3, names=["1.png", "2.png", "10.png"])
    indexed_clip(tmp_path / "train" / "video_2", 4)
    clips = load_clips(tmp_path)
    assert [c.name for c in clips.clips] == ["video_2", "video_10"]
    assert [p.name for p in clips.clips[1].images] == ["1.png", "2.png", "10.png"]
    assert [p.name for p in clips.clips[1].poses] == ["1.png", "2.png", "10.png"]
    assert clips.clips[0].keypoints is None and clips.layout == training_data.LAYOUT_AUTHORS
    assert "2 clip(s)" in clips.describe() and "7 frames in all" in clips.describe()


def test_clip_folders_and_one_clip_folder(tmp_path):
    indexed_clip(tmp_path / "a", 2)
    (tmp_path / "notes").mkdir()
    clips = load_clips(tmp_path)
    assert [c.name for c in clips.clips] == ["a"]
    assert clips.skipped[0][0] == "notes" and "no images/ and no dwpose/ folder" in clips.skipped[0][1]
    assert "Left out 1: notes" in clips.describe()
    one = load_clips(tmp_path / "a")
    assert [c.name for c in one.clips] == ["a"] and len(one.clips[0]) == 2


def test_count_mismatch_names_the_clip_and_both_counts(tmp_path):
    indexed_clip(tmp_path / "train" / "dance", 5, poses=4)
    with pytest.raises(ValueError, match=r"clip 'dance' has 5 image frame\(s\) .* but 4 pose frame\(s\)"):
        load_clips(tmp_path)


def test_missing_empty_and_clipless_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*prepare-data"):
        load_clips(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no sub-folders.*accepted layouts.*authors"):
        load_clips(tmp_path)
    (tmp_path / "x" / "images").mkdir(parents=True)
    (tmp_path / "x" / "dwpose").mkdir()
    with pytest.raises(ValueError, match=r"no usable clip .*x: no image files"):
        load_clips(tmp_path)
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        load_clips(tmp_path / "file.txt")


def test_size_check_names_the_nearest_valid_sizes():
    size_check(512, 64)
    with pytest.raises(ValueError, match="width must be a multiple of 8 and at least 64, got 500; the nearest "
                                         "valid widths are 496 and 504"):
        size_check(500, 512)
    with pytest.raises(ValueError, match="height must be .* got 30; use 64"):
        size_check(512, 30)
    with pytest.raises(ValueError, match="width must be a multiple of 8"):
        PairDataset([], width=500)


# --- stage 1 ---------------------------------------------------------------------------------------

@pytest.fixture
def four_clips(tmp_path):
    for k, frames in enumerate((5, 6, 7, 8)):
        indexed_clip(tmp_path / "train" / f"clip{k}", frames)
    return load_clips(tmp_path).clips


def test_pairs_load_the_frames_they_name(four_clips):
    dataset = PairDataset(four_clips, width=96, height=64, margin=2)
    assert len(dataset) == 4
    for n in range(6):
        item = dataset[n]
        ref, target = item["frames"]
        assert item["reference"].shape == (3, 64, 96) and item["target"].shape == (1, 3, 64, 96)
        assert item["poses"].shape == (1, 3, 64, 96) and item["reference"].dtype == torch.float32
        assert red(item["reference"]) == pytest.approx(index_value(ref), abs=1e-3)
        assert red(item["target"][0]) == pytest.approx(index_value(target), abs=1e-3)
        assert red(item["poses"][0], images=False) == pytest.approx(index_value(target) + 2, abs=1e-3)
        assert ref != target


def test_one_crop_for_reference_target_and_pose(tmp_path):
    textured_clip(tmp_path / "a", 3)
    dataset = PairDataset(load_clips(tmp_path).clips, width=64, height=64, scale=(0.3, 0.5))
    crops = []
    for n in range(3):
        item = dataset[n]
        assert torch.allclose(item["reference"], item["target"][0], atol=1e-6)
        assert torch.allclose((item["target"][0] + 1) / 2, item["poses"][0], atol=1e-6)
        assert item["reference"].min() >= -1 and item["reference"].max() <= 1
        crops.append(item["poses"][0])
    # Different items are cropped differently (the texture is the same in every frame).
    assert not torch.allclose(crops[0], crops[1]) and not torch.allclose(crops[1], crops[2])


def _fingerprint(item: dict) -> str:
    digest = hashlib.sha256()
    for key in ("reference", "target", "poses"):
        digest.update(item[key].numpy().tobytes())
    return f"{item['clip']} {item['frames']} {digest.hexdigest()}"


def test_items_depend_on_seed_and_n_only(tmp_path):
    for k in range(3):
        textured_clip(tmp_path / f"c{k}", 6 + k, seed=k)
    clips = load_clips(tmp_path).clips
    first = PairDataset(clips, width=64, height=64, margin=2, seed=7)
    state = torch.get_rng_state()
    wanted = [_fingerprint(first[n]) for n in (0, 5, 2)]
    assert torch.equal(torch.get_rng_state(), state), "reading an item changed the global RNG"
    torch.manual_seed(1234)
    torch.rand(10)
    other = PairDataset(clips, width=64, height=64, margin=2, seed=7)
    other[11]
    assert [_fingerprint(other[n]) for n in (2, 0, 5)] == [wanted[2], wanted[0], wanted[1]]
    assert len(set(wanted)) == 3
    assert _fingerprint(PairDataset(clips, width=64, height=64, margin=2, seed=8)[0]) != wanted[0]
    # A fresh process gives the same items.
    code = ("import sys, hashlib; sys.path.insert(0, sys.argv[1]);"
            "from tcan_core.training.data import load_clips, PairDataset;"
            "item = PairDataset(load_clips(sys.argv[2]).clips, width=64, height=64, margin=2, seed=7)[5];"
            "digest = hashlib.sha256(); [digest.update(item[k].numpy().tobytes()) for k in ('reference', 'target', "
            "'poses')]; print(item['clip'], item['frames'], digest.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == wanted[1]


def test_each_epoch_is_its_own_permutation(four_clips):
    dataset = PairDataset(four_clips, width=96, height=64)
    epochs = [[dataset.clip_of(e * 4 + k).name for k in range(4)] for e in range(6)]
    assert all(sorted(e) == [f"clip{k}" for k in range(4)] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1, "every epoch has the same order"
    assert dataset[3]["clip"] == epochs[0][3] and dataset[7]["clip"] == epochs[1][3]
    with pytest.raises(IndexError, match="whole numbers from 0"):
        dataset.clip_of(-1)


@pytest.mark.parametrize("length, low, high", [(80, 30, 49), (61, 30, 30), (60, 1, 59), (40, 1, 39), (2, 1, 1)])
def test_margin_rule(four_clips, length, low, high):
    dataset = PairDataset(four_clips, width=96, height=64, margin=30)
    offsets = set()
    for n in range(400):
        ref, target = dataset.pair(length, dataset.generator(n))
        assert 0 <= ref < length and 0 <= target < length
        offsets.add((target - ref) % length)
    assert min(offsets) == low and max(offsets) == high


def test_one_frame_clips_are_left_out_of_stage_1(tmp_path):
    indexed_clip(tmp_path / "still", 1)
    indexed_clip(tmp_path / "moving", 3)
    clips = load_clips(tmp_path).clips
    dataset = PairDataset(clips, width=96, height=64)
    assert [c.name for c in dataset.clips] == ["moving"] and dataset.skipped[0][0] == "still"
    with pytest.raises(ValueError, match="no clip has the 2 frames stage 1 needs"):
        PairDataset([c for c in clips if c.name == "still"])


def test_aspect_ratio_of_the_crop_follows_the_output(four_clips):
    # A 2:1 output draws crops of width/height 1.8-2.0 (the authors' 0.9-1.0 of a square).
    assert PairDataset(four_clips, width=128, height=64).ratio == pytest.approx((1.8, 2.0))
    for seed in range(20):
        top, left, h, w = crop_params(400, 1000, (0.9, 1.0), (1.8, 2.0), seed)
        assert 1.8 * 0.98 <= w / h <= 2.0 * 1.02 and 0 <= top <= 400 - h and 0 <= left <= 1000 - w


def test_frames_that_cannot_hold_a_random_crop_are_named(tmp_path, caplog):
    indexed_clip(tmp_path / "wide", 3)
    clips = load_clips(tmp_path).clips
    with caplog.at_level("WARNING", logger="tcan_core.training.data"):
        PairDataset(clips, width=96, height=64)[0]
    assert not caplog.records
    with caplog.at_level("WARNING", logger="tcan_core.training.data"):
        square = PairDataset(clips, width=64, height=64)
        crops = {tuple(square[n]["target"].shape) for n in range(3)}
    assert len(caplog.records) == 1 and "frames of 64x48 (aspect 1.33) cannot hold a crop of 90%" in caplog.text
    assert crops == {(1, 3, 64, 64)}


# --- stage 2 ---------------------------------------------------------------------------------------

def test_clips_of_consecutive_frames_with_the_first_frame_as_reference(tmp_path):
    indexed_clip(tmp_path / "short", 3)
    indexed_clip(tmp_path / "long", 9)
    dataset = ClipDataset(load_clips(tmp_path).clips, width=96, height=64, frames=4, seed=3)
    assert [c.name for c in dataset.clips] == ["long"]
    assert dataset.skipped == [("short", "3 frame(s), stage 2 with --frames 4 needs at least 4")]
    starts = set()
    for n in range(12):
        item = dataset[n]
        start, stop = item["frames"]
        assert stop - start == 4 and 0 <= start <= 5
        starts.add(start)
        assert item["target"].shape == (4, 3, 64, 96) and item["poses"].shape == (4, 3, 64, 96)
        assert red(item["reference"]) == pytest.approx(index_value(0), abs=1e-3)
        assert [round(red(f)) for f in item["target"]] == [index_value(i) for i in range(start, stop)]
        assert [round(red(f, images=False)) for f in item["poses"]] == [index_value(i) + 2 for i in range(start, stop)]
    assert len(starts) > 2


def test_stage_2_crop_is_shared_and_repeatable(tmp_path):
    textured_clip(tmp_path / "a", 5)
    dataset = ClipDataset(load_clips(tmp_path).clips, width=64, height=64, frames=3, scale=(0.3, 0.6))
    item = dataset[1]
    for f in range(3):
        assert torch.allclose(item["reference"], item["target"][f], atol=1e-6)
        assert torch.allclose((item["target"][f] + 1) / 2, item["poses"][f], atol=1e-6)
    torch.manual_seed(99)
    assert _fingerprint(ClipDataset(dataset.clips, width=64, height=64, frames=3, scale=(0.3, 0.6))[1]) == \
        _fingerprint(item)


def test_no_clip_long_enough_for_stage_2(tmp_path):
    indexed_clip(tmp_path / "a", 3)
    indexed_clip(tmp_path / "b", 5)
    with pytest.raises(ValueError, match=r"no clip has the 16 frames stage 2 needs: the 2 clip\(s\) have 3 to 5 "
                                         r"frames.*lower --frames to at most 5"):
        ClipDataset(load_clips(tmp_path).clips, width=64, height=64)
    with pytest.raises(ValueError, match="frames per clip must be .* at least 1, got 0"):
        ClipDataset(load_clips(tmp_path).clips, frames=0)


# --- prepare-data ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pose_models(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tcan_core.tiny.pose_onnx import write_dwpose_models

    root = tmp_path_factory.mktemp("models")
    write_dwpose_models(root / "tcan" / "pose")
    return root


def _person_frames(frames: int, person: bool = True) -> np.ndarray:
    """A bright upright rectangle on a dark background that moves right: what the tiny detector finds."""
    out = np.full((frames, H, W, 3), 20, np.uint8)
    if person:
        for i in range(frames):
            out[i, 6:44, 20 + 2 * i:40 + 2 * i] = 230
    return out


@pytest.fixture
def videos(tmp_path):
    from tcan_core.video_io import write_frames

    folder = tmp_path / "videos"
    folder.mkdir()
    write_frames(str(folder / "walk.mp4"), _person_frames(6))
    write_frames(str(folder / "empty room.mp4"), _person_frames(4, person=False))
    (folder / "broken.mp4").write_bytes(b"this is not a video")
    (folder / "notes.txt").write_text("ignored")
    for i, frame in enumerate(_person_frames(5)):
        _png(folder / "frames_clip" / f"{i}.png", frame)
    return folder


def _prepare(videos, out, models, **kw):
    from tcan_core.model_folders import ModelFolders
    from tcan_core.training.prepare import prepare_data

    lines: list[str] = []
    report = prepare_data(videos, out, ModelFolders(models).paths("tcan_pose"), say=lines.append, **kw)
    return report, lines


def test_prepare_data_end_to_end_and_resume(videos, tmp_path, pose_models):
    from tcan_core.pose.pose_json import load_pose_json

    out = tmp_path / "data"
    done: list[int] = []
    report, lines = _prepare(videos, out, pose_models, progress=done.append)
    assert report.written == ["frames_clip", "walk"] and report.clips == 2
    assert dict(report.skipped).keys() == {"broken", "empty_room"}
    assert "no person found in any of its 4 frame(s)" in dict(report.skipped)["empty_room"]
    assert "cannot read the video" in dict(report.skipped)["broken"]
    assert any(line.startswith("skipped empty_room: no person") for line in lines)
    assert sum(done) == 4 + 5 + 6
    assert not (out / "clips" / "empty_room").exists() and not (out / "clips" / "broken").exists()

    manifest = json.loads((out / "manifest.json").read_text())
    walk = next(c for c in manifest["clips"] if c["name"] == "walk")
    assert (walk["frames"], walk["width"], walk["height"], walk["fps"]) == (6, W, H, 12.0)
    assert walk["source_size"] == (videos / "walk.mp4").stat().st_size and walk["frames_with_person"] == 6
    assert {s["name"] for s in manifest["skipped"]} == {"broken", "empty_room"}

    clips = load_clips(out)
    assert [c.name for c in clips.clips] == ["frames_clip", "walk"] and clips.layout == training_data.LAYOUT_PACK
    clip = clips.clips[1]
    assert len(clip.images) == len(clip.poses) == 6 and clip.keypoints == out / "clips" / "walk" / "poses.json"
    assert len(load_pose_json(clip.keypoints)) == 6
    pose = np.asarray(Image.open(clip.poses[0]))
    assert pose.shape == (H, W, 3) and (pose.max(-1) > 0).sum() > 20, "the rendered pose is empty"
    assert "Left out 2" in clips.describe()
    item = ClipDataset(clips.clips, width=64, height=64, frames=4)[0]
    assert item["target"].shape == (4, 3, 64, 64)

    # A second run reads nothing again and writes the same manifest.
    before = (out / "manifest.json").read_bytes()
    done.clear()
    report, lines = _prepare(videos, out, pose_models, progress=done.append)
    assert report.written == [] and report.cached == ["frames_clip", "walk"] and not done
    assert {n for n, _ in report.skipped} == {"broken", "empty_room"}
    assert (out / "manifest.json").read_bytes() == before

    # A changed source is prepared again, alone.
    stat = (videos / "walk.mp4").stat()
    os.utime(videos / "walk.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    report, _ = _prepare(videos, out, pose_models)
    assert report.written == ["walk"] and report.cached == ["frames_clip"]

    # A clip folder deleted by hand is listed as missing, and the next run makes it again.
    shutil.rmtree(out / "clips" / "frames_clip")
    clips = load_clips(out)
    assert [c.name for c in clips.clips] == ["walk"]
    assert ("frames_clip", f"listed in manifest.json but {out / 'clips' / 'frames_clip'} is missing; run "
            "prepare-data again") in clips.skipped
    report, _ = _prepare(videos, out, pose_models)
    assert report.written == ["frames_clip"] and report.cached == ["walk"]


def test_prepare_data_scales_frames_down(tmp_path, pose_models):
    for i, frame in enumerate(_person_frames(5)):
        _png(tmp_path / "videos" / "big" / f"{i}.png", frame.repeat(2, 0).repeat(2, 1))
    report, _ = _prepare(tmp_path / "videos", tmp_path / "data", pose_models, max_side=64, max_frames=3)
    assert report.written == ["big"]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert [(c["frames"], c["width"], c["height"]) for c in manifest["clips"]] == [(3, 64, 48)]
    assert Image.open(load_clips(tmp_path / "data").clips[0].poses[0]).size == (64, 48)


def test_an_interrupted_clip_leaves_no_folder(videos, tmp_path, pose_models, monkeypatch):
    import tcan_core.pose.pose_json as pose_json

    out = tmp_path / "data"
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(pose_json, "save_pose_json", fail)
    with pytest.raises(KeyboardInterrupt):
        _prepare(videos, out, pose_models)
    assert calls and sorted(p.name for p in (out / "clips").iterdir()) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clips"] == []
    monkeypatch.undo()
    # What a killed run would leave behind is cleared, and the next run finishes the job.
    (out / "clips" / ".tmp-0123-walk" / "images").mkdir(parents=True)
    report, _ = _prepare(videos, out, pose_models)
    assert report.written == ["frames_clip", "walk"]
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["frames_clip", "walk"]


def test_prepare_data_bad_inputs(tmp_path, pose_models, videos):
    with pytest.raises(FileNotFoundError, match="videos folder .* does not exist"):
        _prepare(tmp_path / "none", tmp_path / "data", pose_models)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no video files \(.mp4, .mov.*sub-folders of frames"):
        _prepare(tmp_path / "empty", tmp_path / "data", pose_models)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "thesis.pdf").write_text("")
    with pytest.raises(ValueError, match="already holds files but no manifest.json"):
        _prepare(videos, tmp_path / "used", pose_models)
    with pytest.raises(ValueError, match="--max-side must be 0 .* got 10"):
        _prepare(videos, tmp_path / "data", pose_models, max_side=10)
    with pytest.raises(FileNotFoundError, match=r"yolox_l.onnx, dw-ll_ucoco_384.onnx not found .*tcan"):
        _prepare(videos, tmp_path / "data", tmp_path / "no_models")
    assert not (tmp_path / "data" / "clips" / "walk").exists()


def test_prepare_data_command(tmp_path, pose_models, videos, capsys):
    from tcan_core.cli import main

    args = ["prepare-data", "--videos", str(videos), "--models", str(pose_models), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "prepared walk: 6 frames 64x48" in out and "skipped empty_room: no person" in out
    assert "2 clip(s) prepared, 0 already done, 2 skipped" in out
    assert main([*args, "--out", str(tmp_path / "data")]) == 0
    assert "0 clip(s) prepared, 2 already done" in capsys.readouterr().out

    assert main(["prepare-data", "--videos", str(tmp_path / "none"), "--out", str(tmp_path / "d2")]) == 2
    assert "error: the videos folder" in capsys.readouterr().err
    assert main([*args[:2], str(videos), "--models", str(tmp_path / "no_models"), "--out", str(tmp_path / "d3")]) == 2
    assert "DWPose" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "prepare-data" in capsys.readouterr().out

    import tcan_core.pose.pose_json as pose_json

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pose_json, "save_pose_json", interrupt)
        assert main([*args, "--out", str(tmp_path / "d5")]) == 130
    assert "interrupted: the clips finished so far are kept" in capsys.readouterr().err
    assert not any((tmp_path / "d5" / "clips").iterdir())

    nobody = tmp_path / "nobody"
    nobody.mkdir()
    (nobody / "broken.mp4").write_bytes(b"x")
    assert main(["prepare-data", "--videos", str(nobody), "--out", str(tmp_path / "d4"),
                 "--models", str(pose_models)]) == 1
    assert "error: no clip could be prepared" in capsys.readouterr().err
