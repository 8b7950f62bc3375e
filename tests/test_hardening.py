"""Issue 11: what failed when the pack was tried as a new user would; one test per failure, each named
after what the user does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import node
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
    from tcan_core.models.motion import load_motion_module

    loaders = {"sd15": lambda p: load_sd15(p, unet_only=False), "controlnet": load_controlnet,
               "motion": load_motion_module}
    reports = {r.slot.key: r for r in run_doctor(ModelFolders(tiny_tree.root))}
    for key, load in loaders.items():
        for found in reports[key].files:
            assert found.usable, found
            load(found.path)


# --- 7: a diffusers motion-adapter folder -------------------------------------------------------

def test_a_diffusers_motion_adapter_folder_is_listed_checked_and_loaded(tiny_parts, tmp_path):
    from tcan_core.models.motion import load_motion_module

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
