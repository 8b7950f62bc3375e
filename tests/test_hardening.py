"""Issue 11: what failed when the pack was tried as a new user would; one test per failure, each named
after what the user does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import node, result
from tcan_core.animation.sampler import SamplerSettings, fit_images, sample_animation
from tcan_core.animation.vae import DiffusersVAE
from tcan_core.pose_format import parse_pose_keypoint

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


# --- 9: every seed the node allows ------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 2**64 - 2, 2**64 - 1])
def test_the_largest_seed_the_sampler_node_allows_samples(pack, tiny_model, tiny_parts, seed):
    top = pack.NODE_CLASS_MAPPINGS["TCANSampler"].INPUT_TYPES()["required"]["seed"][1]["max"]
    assert seed <= top
    poses = torch.zeros(2, SIZE, SIZE, 3)
    poses[:, 16:48, 24:40] = 1.0
    # Euler ancestral draws fresh noise every step from a second generator.
    settings = SamplerSettings(seed=seed, steps=2, width=SIZE, height=SIZE, scheduler="Euler ancestral",
                               context_length=2, context_overlap=0)
    out = sample_animation(tiny_model, None, poses, tiny_parts["context"], tiny_parts["context"],
                           DiffusersVAE(tiny_parts["vae"]), settings).frames
    assert out.shape == (2, SIZE, SIZE, 3) and bool(torch.isfinite(out).all())


# --- 5: Pose Smooth on poses without a person --------------------------------------------------

def _empty_poses(frames: int = 3) -> list[dict]:
    return [{"canvas_width": 64, "canvas_height": 64, "people": []} for _ in range(frames)]


def test_pose_smooth_without_a_person_in_any_frame_says_so(pack):
    with pytest.raises(ValueError, match="no person in any of its 3 frame"):
        node(pack, "TCANPoseSmooth").smooth(_empty_poses(), 5, True, 1.0, 0.05, 30.0)


def test_pose_smooth_with_people_whose_points_are_all_unseen_says_so(pack):
    frames = [{"canvas_width": 64, "canvas_height": 64,
               "people": [{"pose_keypoints_2d": [0.0, 0.0, 0.0] * 18}]} for _ in range(2)]
    assert parse_pose_keypoint(frames).body.shape[1] == 1
    with pytest.raises(ValueError, match="no person in any of its 2 frame"):
        node(pack, "TCANPoseSmooth").smooth(frames, 5, False, 1.0, 0.05, 30.0)


# --- 6: empty batches into the face nodes, and the aspect error's grammar ----------------------

def test_an_empty_batch_into_the_face_analysis_says_the_batch_is_empty():
    from tcan_core.face.analysis import check_images

    with pytest.raises(ValueError, match="empty batch"):
        check_images(torch.zeros(0, 64, 64, 3), "face image")
    with pytest.raises(ValueError, match=r"must be an IMAGE \[B,H,W,3\].*drop the alpha"):
        check_images(torch.zeros(1, 64, 64, 4), "face image")


def test_the_aspect_error_of_one_image_says_is():
    with pytest.raises(ValueError, match="reference image is 1x1 "):
        fit_images(torch.zeros(1, 1, 1, 3), 64, 32, "reference image")
    with pytest.raises(ValueError, match="pose images are 64x64 "):
        fit_images(torch.zeros(2, 64, 64, 3), 64, 32, "pose images")


# --- 1, 2: models reached through symbolic links; Model Check goes on past a bad file -----------

import argparse  # noqa: E402
import importlib  # noqa: E402
import shutil  # noqa: E402

from tcan_core.doctor import format_report, run_doctor  # noqa: E402
from tcan_core.model_folders import ModelFolders, resolve_in_folders, with_sub_folders  # noqa: E402
from tcan_core.models.errors import ModelFileError, ModelFormatError  # noqa: E402
from tcan_core.models.sd15 import load_sd15  # noqa: E402


@pytest.fixture
def linked_root(tiny_tree, tmp_path):
    """A models root whose checkpoint is a link to a file on 'another drive', plus a linked sub-folder
    and a broken link."""
    elsewhere = tmp_path / "other_drive"
    shutil.copytree(tiny_tree.root / "checkpoints", elsewhere / "checkpoints", symlinks=True)
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "linked.safetensors").symlink_to(elsewhere / "checkpoints" / "tiny_sd15.safetensors")
    (root / "checkpoints" / "linked_dir").symlink_to(elsewhere / "checkpoints", target_is_directory=True)
    (root / "checkpoints" / "broken.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    (root / "checkpoints" / "loop").symlink_to(root / "checkpoints", target_is_directory=True)
    return root


def test_a_linked_model_file_and_folder_are_listed_and_load(pack, linked_root):
    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    host.set_models_root(linked_root)
    try:
        names = host.list_models("checkpoints")
        assert "linked.safetensors" in names and "linked_dir/tiny_sd15.safetensors" in names
        assert "linked_dir/tiny_sd15_diffusers" in names
        assert "broken.safetensors" not in names, "a broken link cannot be loaded, so it is not listed"
        assert not any(n.startswith("loop/loop/") for n in names)
        # Every listed name resolves: the dropdown and the loader agree.
        for name in names:
            assert Path(host.model_path("checkpoints", name)).exists()
        assert load_sd15(host.model_path("checkpoints", "linked.safetensors"), unet_only=True).unet is not None
        (report,), _ = result(node(pack, "TCANModelCheck").check(True))
        assert "+ linked.safetensors: checkpoint for SD1.5" in report
        for name in ("../models/checkpoints/linked.safetensors", str(linked_root / "checkpoints" / "linked.safetensors")):
            with pytest.raises(ValueError, match="no absolute paths, no '..'"):
                host.model_path("checkpoints", name)
    finally:
        host.set_models_root(None)


def test_model_check_reads_linked_files_and_goes_on_past_a_bad_one(linked_root, monkeypatch):
    from tcan_core import doctor

    real = doctor.check_sd15

    def fail_on_one(path):
        if Path(path).name == "tiny_sd15.ckpt":
            raise RuntimeError("disk read error")
        return real(path)

    monkeypatch.setattr(doctor, "check_sd15", fail_on_one)
    report = {r.slot.key: r for r in run_doctor(ModelFolders(linked_root))}["sd15"]
    files = {f.name: f for f in report.files}
    assert files["linked.safetensors"].usable and files["linked_dir/tiny_sd15.safetensors"].usable
    assert not files["linked_dir/tiny_sd15.ckpt"].usable
    assert "unreadable: RuntimeError: disk read error" in files["linked_dir/tiny_sd15.ckpt"].what
    assert files["linked_dir/tiny_sd15_diffusers"].usable


def test_the_doctor_command_reports_a_linked_model(linked_root, capsys):
    from tcan_core.cli import main

    main(["doctor", "--models", str(linked_root)])
    out = capsys.readouterr().out
    assert "+ linked.safetensors: checkpoint for SD1.5" in out


# --- 3: an SD1.5 checkpoint with missing UNet keys; Model Check uses the loaders' checks ---------

def _incomplete_checkpoint(tiny_tree, tmp_path) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_tree.files["sd15_safetensors"]))
    for key in [k for k in sd if k.startswith("model.diffusion_model.output_blocks.2.1.conv.")]:
        del sd[key]
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    path = tmp_path / "checkpoints" / "pruned.safetensors"
    save_file(sd, str(path))
    return path


def test_a_checkpoint_with_missing_unet_keys_names_them(tiny_tree, tmp_path):
    path = _incomplete_checkpoint(tiny_tree, tmp_path)
    with pytest.raises(ModelFormatError, match=r"2 missing key\(s\): model\.diffusion_model\.output_blocks\.2\.1\.conv"
                                               r"\.bias, .*\.weight\. The file is incomplete"):
        load_sd15(path)
    sd15 = {r.slot.key: r for r in run_doctor(ModelFolders(tmp_path))}["sd15"]
    (found,) = sd15.files
    assert not found.usable and "refused by the loader" in found.what and "2 missing key(s)" in found.what


def test_model_check_refuses_a_diffusers_folder_with_pickled_weights(tiny_tree, tmp_path):
    folder = tmp_path / "checkpoints" / "pickled_sd15"
    shutil.copytree(tiny_tree.files["sd15_diffusers"], folder)
    from safetensors.torch import load_file

    unet = folder / "unet"
    weights = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({**weights, "training_args": argparse.Namespace(lr=1e-5)}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFileError, match="pickled Python objects"):
        load_sd15(folder)
    (found,) = {r.slot.key: r for r in run_doctor(ModelFolders(tmp_path))}["sd15"].files
    assert not found.usable and "pickled Python objects" in found.what


def test_model_check_and_the_loaders_agree_on_every_tiny_file(tiny_tree):
    from tcan_core.models.controlnet import load_controlnet
    from tcan_core.models.motion_module import load_motion_module

    loaders = {"sd15": lambda p: load_sd15(p, unet_only=False), "controlnet": load_controlnet,
               "motion": load_motion_module}
    reports = {r.slot.key: r for r in run_doctor(ModelFolders(tiny_tree.root))}
    for key, load in loaders.items():
        for found in reports[key].files:
            assert found.usable, found
            load(found.path)


# --- 7: a diffusers motion-adapter folder -------------------------------------------------------

def test_a_diffusers_motion_adapter_folder_is_listed_checked_and_loaded(tiny_parts, tmp_path):
    from tcan_core.models.motion_module import load_motion_module

    folder = tmp_path / "animatediff_models" / "animatediff-motion-adapter-v1-5-2"
    tiny_parts["adapter"].save_pretrained(str(folder))
    folders = ModelFolders(tmp_path)
    assert folders.list("animatediff_models") == ["animatediff-motion-adapter-v1-5-2"]
    (found,) = {r.slot.key: r for r in run_doctor(folders)}["motion"].files
    assert found.usable and "diffusers folder" in found.what and "version=v2" in found.what
    adapter, det = load_motion_module(folders.resolve("animatediff_models", found.name))
    reference = tiny_parts["adapter"].state_dict()
    assert all(torch.equal(reference[k], v) for k, v in adapter.state_dict().items())


# --- 8: DWPose under the folder set for `tcan` in extra_model_paths.yaml -------------------------

def test_dwpose_files_under_a_tcan_folder_from_extra_model_paths_are_found(tmp_path):
    from tcan_core.pose.extract import find_model_files

    tcan = tmp_path / "drive" / "tcan"
    (tcan / "pose").mkdir(parents=True)
    for name in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"):
        (tcan / "pose" / name).write_bytes(b"onnx")
    folders = ModelFolders(tmp_path / "models", {"tcan": [str(tcan)]})
    assert str(tcan) in folders.paths("tcan_pose")
    found = find_model_files(["yolox_l.onnx", "dw-ll_ucoco_384.onnx"], folders.paths("tcan_pose"))
    assert set(found) == {"yolox_l.onnx", "dw-ll_ucoco_384.onnx"}
    # Inside ComfyUI the same rule runs over folder_paths' own lists.
    paths = {"tcan_pose": ["/m/tcan/pose", "/m/annotator"], "tcan": ["/m/tcan", str(tcan)]}
    assert with_sub_folders("tcan_pose", paths["tcan_pose"], paths.get) == [
        "/m/tcan/pose", "/m/annotator", "/m/tcan", str(tcan)]


# --- 18: the doctor report explains its marks and why a file was not taken ----------------------

def test_the_report_explains_marks_reasons_and_tcan_kinds(tmp_path):
    from tcan_core.tiny.tree import write_demo_tree

    tree = write_demo_tree(tmp_path / "models")
    text = format_report(run_doctor(ModelFolders(tree.root)))
    assert "How to read this report" in text and "'-' a file that is there but not taken" in text
    assert "+ [ControlNetT]_tiny.ckpt: a TCAN temporal ControlNet (ControlNetT)" in text
    assert "AnimateDiff motion module" not in text.split("[ok] TCAN trained parts")[1].split("\n[")[0]
    assert "CLIP vision encoder width 128; not taken: ID-Animator and IP-Adapter FaceID need ViT-H/14" in text
    assert "ID-Animator face adapter (cross-attention width 64); not taken: SD1.5 needs" in text


# --- 9-17: the command line ---------------------------------------------------------------------

import sys  # noqa: E402

import numpy as np  # noqa: E402

from tcan_core import cli, pipeline, video_io  # noqa: E402
from tcan_core.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """The demo's character image, its pose and the driving dance as files, as `animate` reads them."""
    from tcan_core.demo_scene import character_image, character_pose, driving_dance
    from tcan_core.pose.pose_json import save_pose_json
    from tcan_core.pose_format import to_pose_keypoint
    from tcan_core.video_io import write_frames

    root = tmp_path_factory.mktemp("cli_inputs")
    character = character_pose()
    write_frames(root / "reference", character_image(character)[None])
    save_pose_json(to_pose_keypoint(character), root / "reference_pose.json")
    save_pose_json(to_pose_keypoint(driving_dance(frames=6)), root / "driving_pose.json")
    return root


def _animate_args(cli_inputs, models, out, *extra):
    return ["animate", "--reference", str(cli_inputs / "reference" / "00000.png"), "--reference-pose",
            str(cli_inputs / "reference_pose.json"), "--driving", str(cli_inputs / "driving_pose.json"),
            "--models", str(models), "--out", str(out), *extra]


def test_animate_with_width_alone_writes_every_frame_and_shows_progress_when_piped(cli_inputs, tiny_tree,
                                                                                   tmp_path, capsys):
    out = tmp_path / "clip.gif"
    assert main(_animate_args(cli_inputs, tiny_tree.root, out, "--width", "96", "--steps", "1", "--max-frames",
                              "3", "--tau", "0", "--no-tpc", "--seed", str(2**64 - 1))) == 0
    printed = capsys.readouterr()
    from PIL import Image

    with Image.open(out) as gif:
        # The reference is 384x512 (3:4): width 96 keeps the aspect with height 128.
        assert gif.n_frames == 3 and gif.size == (96, 128)
    assert "SD1.5 checkpoint: tiny_sd15.ckpt (the first usable file in checkpoints)" in printed.out
    assert "sampled 3 frames at 96x128" in printed.out and "animated GIF" in printed.out
    assert "TCAN sampling" in printed.err, "progress must show when stderr is not a terminal"


def test_output_size_follows_the_reference_for_the_side_left_out():
    assert pipeline.output_size(384, 512, 96, None) == (96, 128)
    assert pipeline.output_size(384, 512, None, 256) == (192, 256)
    assert pipeline.output_size(384, 512, 64, 64) == (64, 64)
    assert pipeline.output_size(1000, 100, None, 64) == (640, 64)


@pytest.mark.parametrize("extra, message", [
    (["--width", "100"], "width must be a multiple of 8 and at least 64, got 100"),
    (["--height", "60"], "height must be a multiple of 8 and at least 64, got 60"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--scheduler", "Euler a"], "unknown scheduler 'Euler a'; choose one of DDIM, Euler, Euler ancestral"),
    (["--seed", str(2**64)], "seed must be between 0 and 18446744073709551615"),
    (["--seed", "-1"], "seed must be between 0 and"),
    (["--max-frames", "0"], "max frames must be at least 1, got 0"),
    (["--fps", "0"], "--fps must be above 0, got 0.0"),
    (["--tau", "-1"], "tau must be 0 or more"),
])
def test_every_setting_is_checked_before_any_heavy_work(cli_inputs, tmp_path, monkeypatch, capsys, extra, message):
    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the settings were checked")

    monkeypatch.setattr(pipeline, "pick_models", heavy)
    monkeypatch.setattr(pipeline, "load_driving", heavy)
    monkeypatch.setattr(pipeline, "extract_poses_from", heavy)
    assert main(_animate_args(cli_inputs, tmp_path, tmp_path / "x.mp4", *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [("x.avi", "unknown output extension '.avi'; use one of .mp4, .mov, .mkv, "
                                                    ".gif, .webp"),
                                          ("x.MP3", "unknown output extension '.mp3'")])
def test_an_unknown_output_extension_is_refused_with_the_list(cli_inputs, tmp_path, capsys, out, message):
    assert main(_animate_args(cli_inputs, tmp_path, tmp_path / out)) == 2
    assert message in capsys.readouterr().err


def test_a_missing_reference_or_driving_file_says_it_does_not_exist(cli_inputs, tmp_path, capsys):
    args = _animate_args(cli_inputs, tmp_path, tmp_path / "x.mp4")
    args[args.index("--reference") + 1] = str(tmp_path / "nope.png")
    assert main(args) == 2
    assert f"the reference image {tmp_path / 'nope.png'} does not exist" in capsys.readouterr().err
    args = _animate_args(cli_inputs, tmp_path, tmp_path / "x.mp4")
    args[args.index("--driving") + 1] = str(tmp_path / "nope.mp4")
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_broken_video_gives_only_the_packs_message(cli_inputs, tiny_tree, tmp_path):
    import subprocess

    from conftest import ROOT

    bad = tmp_path / "dance.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    args = _animate_args(cli_inputs, tiny_tree.root, tmp_path / "x.mp4")
    args[args.index("--driving") + 1] = str(bad)
    out = subprocess.run([sys.executable, "-m", "tcan_core", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read the video {bad}"), out.stderr


@pytest.mark.parametrize("width, height", [(64, 48), (51, 37)])
def test_mp4_is_h264_in_yuv420p_with_every_frame_also_at_odd_sizes(tmp_path, width, height):
    import av

    frames = (np.random.default_rng(0).random((5, height, width, 3)) * 255).astype(np.uint8)
    video_io.write_frames(tmp_path / "clip.mp4", frames, fps=8)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 5 and decoded[0].shape == (height + height % 2, width + width % 2, 3)
    assert float(stream.average_rate) == 8.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_gif_webp_and_png_frames_keep_every_frame(tmp_path):
    from PIL import Image

    frames = np.stack([np.full((32, 48, 3), 40 * i, np.uint8) for i in range(5)])
    for name in ("clip.gif", "clip.webp"):
        video_io.write_frames(tmp_path / name, frames, fps=10)
        with Image.open(tmp_path / name) as image:
            assert image.n_frames == 5 and image.size == (48, 32)
        read, fps = video_io.read_video(tmp_path / name)
        assert read.shape == (5, 32, 48, 3) and abs(fps - 10) < 0.5
    video_io.write_frames(tmp_path / "frames", frames)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert np.array_equal(video_io.read_image(tmp_path / "frames" / "00003.png"), frames[3])


def test_a_failed_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    def broken(path, frames, fps):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(video_io, "_write_h264", broken)
    with pytest.raises(OSError, match="disk full"):
        video_io.write_frames(tmp_path / "clip.mp4", np.zeros((2, 8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", [("libx264",), video_io.H264_ENCODERS])
def test_h264_encoder_falls_back_to_another_that_works_or_says_what_to_do(monkeypatch, tmp_path, missing):
    import av

    real = av.codec.Codec

    def without(name, mode="r"):
        if name in missing:
            raise av.error.FFmpegError(0, f"no {name}")
        return real(name, mode)

    monkeypatch.setattr(av.codec, "Codec", without)
    if len(missing) == len(video_io.H264_ENCODERS):
        with pytest.raises(ValueError, match=r"no working H\.264 encoder; write a \.gif or \.webp"):
            video_io.write_frames(tmp_path / "clip.mp4", np.zeros((2, 16, 16, 3), np.uint8))
        assert list(tmp_path.iterdir()) == []
        return
    name = video_io.h264_encoder()
    assert name not in missing
    video_io.write_frames(tmp_path / "clip.mp4", np.zeros((2, 16, 16, 3), np.uint8))
    with av.open(str(tmp_path / "clip.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.video[0].frames == 2


# --- 14: a refused pickle quotes torch's reason without terminal codes --------------------------

def test_a_refused_pickle_names_what_it_holds_without_ansi_codes(tmp_path):
    from tcan_core.models.state_dict import load_state_dict_file

    path = tmp_path / "pickled.ckpt"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ModelFileError) as err:
        load_state_dict_file(path)
    message = str(err.value)
    assert "\x1b" not in message and "argparse.Namespace" in message
    assert "weights_only=False" not in message.split("torch said:")[1]


# --- 15: without a name, the first file the loaders accept, and the output says which -----------

def test_the_first_usable_model_is_picked_and_named(tiny_tree, tmp_path):
    for folder in ("checkpoints", "animatediff_models", "controlnet"):
        shutil.copytree(tiny_tree.root / folder, tmp_path / folder)
    (tmp_path / "checkpoints" / "a_truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "animatediff_models" / "a_lora.safetensors").symlink_to(tiny_tree.files["sd15_safetensors"])
    chosen = pipeline.pick_models(ModelFolders(tmp_path), pipeline.AnimateOptions())
    assert chosen["checkpoints"].path.name == "tiny_sd15.ckpt"
    assert "skipped 1 file(s) the loader refuses: a_truncated.safetensors" in chosen["checkpoints"].line
    assert chosen["animatediff_models"].path.name == "tiny_mm_v1.ckpt"
    assert "a_lora.safetensors" in chosen["animatediff_models"].line
    doctor = {r.slot.key: {f.name: f.usable for f in r.files} for r in run_doctor(ModelFolders(tmp_path))}
    assert doctor["sd15"]["a_truncated.safetensors"] is False and doctor["sd15"]["tiny_sd15.ckpt"] is True
    with pytest.raises(ModelFormatError, match="not an SD1.5 AnimateDiff motion module"):
        pipeline.pick_models(ModelFolders(tmp_path), pipeline.AnimateOptions(motion_module="a_lora.safetensors"))


def test_no_usable_model_lists_what_was_refused(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "broken.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(FileNotFoundError, match=r"no usable SD1.5 checkpoint found.*broken\.ckpt.*doctor"):
        pipeline.pick_model(ModelFolders(tmp_path), "checkpoints", None)


# --- 17: the demo without the onnx package --------------------------------------------------------

def test_the_demo_without_onnx_says_which_package_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'onnx' package" in err and "pip install onnx" in err
    assert main(["tiny-models", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "models").exists() and cli.MissingPackageError


# --- 4: TPC with a reference image that is not the one its pose came from ------------------------

def test_tpc_with_a_reference_of_another_aspect_names_both_sizes(caplog):
    from tcan_core.demo_scene import character_image, character_pose, driving_dance
    from tcan_core.tpc import calibrate

    pose = character_pose()
    image = character_image(pose).astype(np.float32) / 255.0
    height, width = image.shape[:2]
    dance = driving_dance(frames=2)
    square = np.zeros((width, width, 3), np.float32)
    with pytest.raises(ValueError, match=rf"on a {pose.width}x{pose.height} canvas.* reference image is {width}x{width}"
                                         r".*Connect the same image"):
        calibrate(square, pose, dance, keypoint_set="body")
    # A copy resized with rounding (here 1% taller) is still accepted.
    taller = np.zeros((round(height * 1.01), width, 3), np.float32)
    taller[:height] = image
    assert calibrate(taller, pose, dance, keypoint_set="body").num_frames == 2


# --- README ----------------------------------------------------------------------------------------

def test_readme_names_the_schedulers_the_folders_and_ignores_the_demo_output():
    from conftest import ROOT
    from tcan_core.animation.schedulers import SCHEDULERS
    from tcan_core.model_folders import FOLDERS

    readme = (ROOT / "README.md").read_text()
    sampler_row = next(line for line in readme.splitlines() if line.startswith("| TCAN Sampler |"))
    assert "/".join(SCHEDULERS) in sampler_row
    for folder in FOLDERS:
        assert f"`{folder}`" in readme, folder
    assert "`annotator`" in readme and "never installs or replaces torch" not in readme
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/demo_out/" in ignored
