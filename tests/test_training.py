"""TCAN training on the tiny models and a small synthetic set of videos: the loss falls in both stages,
the written files load through the pack's own nodes and change what the sampler makes, gradient
checkpointing gives the gradients of the plain run, and every bad input of issue 13 gets its error."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import node, result
from tcan_core.training.trainer import TrainOptions, Trainer, TrainingOutOfMemory, train

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
# Tiny random UNets learn in a few steps only with a large learning rate (the authors' 1e-5 is for SD1.5).
FAST = dict(width=SIZE, height=SIZE, learning_rate=1e-2, num_workers=0, checkpoint_every=0, validate_every=0)


def write_videos(root: Path, videos: int = 3, frames: int = 20, size: int = SIZE) -> Path:
    """The authors' layout (train/<video>/images, dwpose): a coloured block moving over a plain
    background, its pose image a white bar at the block's centre."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for v in range(videos):
        folder = root / "train" / f"video{v}"
        (folder / "images").mkdir(parents=True)
        (folder / "dwpose").mkdir(parents=True)
        color = rng.integers(60, 255, 3).astype(np.uint8)
        for f in range(frames):
            image = np.full((size, size, 3), (30, 40, 50), np.uint8)
            pose = np.zeros((size, size, 3), np.uint8)
            x, y = 8 + (2 * f + 7 * v) % (size - 24), 16 + 6 * v
            image[y:y + 16, x:x + 12] = color
            pose[y + 4:y + 12, x + 4:x + 8] = 255
            Image.fromarray(image).save(folder / "images" / f"{f:04d}.png")
            Image.fromarray(pose).save(folder / "dwpose" / f"{f:04d}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from tcan_core.tiny.sd15 import write_tiny_model_tree

    return write_tiny_model_tree(tmp_path_factory.mktemp("train_models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_videos(tmp_path_factory.mktemp("train_data"))


def options(tree, data, out, stage=1, **extra) -> TrainOptions:
    files = tree.files
    stage_files = {"motion_module": files["motion_v2"], "frames": 4} if stage == 2 else {}
    values = dict(FAST, base=files["sd15_safetensors"], controlnet=files["controlnet_ldm"], **stage_files)
    values.update(extra)
    return TrainOptions(stage=stage, data=data, out=out, **values)


HELD_OUT = list(range(5000, 5006))
# The samples of the first optimizer steps (batch 2): their loss is measured before and after training.
TRAINED = list(range(0, 6))


def _losses(trainer: Trainer) -> tuple[float, float]:
    return trainer.mean_loss(TRAINED), trainer.mean_loss(HELD_OUT)


@pytest.fixture(scope="module")
def stage1(tree, data, tmp_path_factory):
    trainer = Trainer(options(tree, data, tmp_path_factory.mktemp("stage1"), steps=20, batch_size=2), progress=False)
    before = _losses(trainer)
    run = trainer.run()
    return run, before, _losses(trainer)


@pytest.fixture(scope="module")
def stage2(tree, data, stage1, tmp_path_factory):
    files = stage1[0].files
    trainer = Trainer(options(tree, data, tmp_path_factory.mktemp("stage2"), stage=2, steps=12, batch_size=2,
                              appearance=files["appearance_unet.safetensors"], lora=files["appa_lora.safetensors"]),
                      progress=False)
    before = _losses(trainer)
    run = trainer.run()
    return run, before, _losses(trainer)


def _check_falls(run, before, after, steps: int, trained: float, held_out: float) -> None:
    """The logged loss falls, and on fixed examples (same data, timestep and noise, so no sampling noise) the
    loss of the first steps' samples falls by the factor ``trained`` and that of unseen samples by ``held_out``."""
    assert len(run.losses) == steps and np.mean(run.losses[-5:]) < np.mean(run.losses[:5]), run.losses
    assert after[0] < trained * before[0], (before, after)
    assert after[1] < held_out * before[1], (before, after)


def test_stage1_loss_falls_and_held_out_noise_is_predicted_better(stage1):
    _check_falls(*stage1, steps=20, trained=0.85, held_out=0.9)


def test_stage2_loss_falls_and_held_out_noise_is_predicted_better(stage2):
    _check_falls(*stage2, steps=12, trained=0.9, held_out=0.9)


def test_each_stage_writes_its_files_with_metadata(stage1, stage2):
    from safetensors import safe_open

    assert sorted(stage1[0].files) == ["appa_lora.safetensors", "appearance_unet.safetensors"]
    assert sorted(stage2[0].files) == ["motion_module.safetensors", "temporal_controlnet.safetensors"]
    for stage, run in ((1, stage1[0]), (2, stage2[0])):
        for path in run.files.values():
            with safe_open(path, framework="pt") as handle:
                meta = handle.metadata()
                assert meta["tcan_stage"] == str(stage) and meta["tcan_steps"] == str(run.step)
                assert meta["tcan_base"] == "tiny_sd15.safetensors"
                assert json.loads(meta["tcan_settings"])["stage"] == stage
                assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    with safe_open(stage1[0].files["appa_lora.safetensors"], framework="pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert (config["r"], config["lora_alpha"]) == (16, 16.0)


def test_log_checkpoint_and_run_file(stage1):
    import csv

    run = stage1[0]
    out = run.checkpoint.parent.parent
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert [float(r["loss"]) for r in rows] == pytest.approx(run.losses, abs=1e-6)
    assert run.checkpoint.name == "step-000020" and (run.checkpoint / "trainable.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["batch_size"] == 2
    assert any((out / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def host_root(pack, tree, stage1, stage2):
    """The tiny tree as the host's models root, with the trained files in the folders their nodes read."""
    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    root = tree.root
    places = {"appearance_unet.safetensors": "tcan", "appa_lora.safetensors": "loras",
              "motion_module.safetensors": "animatediff_models", "temporal_controlnet.safetensors": "tcan"}
    for run in (stage1[0], stage2[0]):
        for name, path in run.files.items():
            (root / places[name]).mkdir(exist_ok=True)
            shutil.copy(path, root / places[name] / f"trained_{name}")
    host.set_models_root(root)
    yield root
    host.set_models_root(None)


def _graph(pack, tree, trained: bool):
    """TCAN Load Model -> APPA LoRA -> Motion Module -> Temporal ControlNet, with the trained files or the
    untrained ones (training-free appearance, no LoRA, the AnimateDiff module, temporal layers from it)."""
    ckpt = tree.files["sd15_safetensors"].name
    (model,), report = result(node(pack, "TCANLoadModel").load(
        ckpt, "trained_appearance_unet.safetensors" if trained else "none (training-free: base UNet)"))
    if trained:
        assert "Appearance UNet from trained_appearance_unet.safetensors" in report
        (model,), report = result(node(pack, "TCANAppaLora").patch(model, "trained_appa_lora.safetensors", 1.0))
        assert "patches 96 of 96 APPA layers" in report and "rank 16, alpha 16" in report
    motion = "trained_motion_module.safetensors" if trained else tree.files["motion_v2"].name
    (model,), report = result(node(pack, "TCANMotionModule").patch(model, motion, "none", 1.0))
    temporal = "trained_temporal_controlnet.safetensors" if trained else "from motion module"
    (model,), report = result(node(pack, "TCANTemporalControlNet").patch(
        model, tree.files["controlnet_ldm"].name, temporal, 1.0, 0.0, 1.0))
    if trained:
        assert "temporal layers from trained_temporal_controlnet.safetensors" in report
    return model


def test_trained_files_load_through_their_nodes_and_change_the_frames(pack, tree, host_root):
    from tcan_core.animation.sampler import SamplerSettings, sample_animation
    from tcan_core.animation.text import encode_empty_prompt
    from tcan_core.animation.vae import DiffusersVAE

    context = encode_empty_prompt(tree.modules["text_encoder"])
    reference = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    poses = torch.zeros(4, SIZE, SIZE, 3)
    poses[:, 20:40, 24:32] = 1.0
    settings = SamplerSettings(seed=3, steps=2, width=SIZE, height=SIZE, context_length=4, context_overlap=1)
    frames = {}
    for trained in (False, True):
        model = _graph(pack, tree, trained)
        frames[trained] = sample_animation(model, reference, poses, context, context,
                                           DiffusersVAE(tree.modules["vae"]), settings).frames
    assert frames[True].shape == frames[False].shape == (4, SIZE, SIZE, 3)
    assert float((frames[True] - frames[False]).abs().mean()) > 1e-3


def test_validation_clip_and_contact_sheet(tree, data, tmp_path):
    from PIL import Image

    run = train(options(tree, data, tmp_path / "run", steps=1, validate_every=1, validation_steps=1,
                        validation_frames=3), progress=False)
    video, sheet = run.validations[0], run.validations[0].with_suffix(".png")
    assert video.name == "step-000001.mp4" and video.stat().st_size > 0
    assert Image.open(sheet).size == (8 * SIZE, 3 * SIZE)


def test_gradient_checkpointing_gives_the_same_gradients(tree, data, tmp_path):
    """Stage 1 with every UNet checkpointed: the appearance UNet is recomputed during backward, so its
    processors must not read the reference then (they only write)."""
    grads = {}
    for checkpointing in (False, True):
        trainer = Trainer(options(tree, data, tmp_path / str(checkpointing), steps=1,
                                  gradient_checkpointing=checkpointing, reference_drop=0.0), progress=False)
        loaded = next(iter(torch.utils.data.DataLoader(
            __import__("tcan_core.training.trainer", fromlist=["_Numbered"])._Numbered(trainer.dataset),
            batch_sampler=[[0]], collate_fn=__import__("tcan_core.training.trainer", fromlist=["_collate"])._collate)))
        with trainer.unwrapped.installed(trainer.accelerator.device):
            trainer.model(trainer._batch(loaded)).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys() and any("appearance." in n for n in grads[True])
    assert any("lora_B" in n for n in grads[True])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)


def test_stage1_trains_only_the_lora_and_the_read_part_of_the_appearance_unet(tree, data, tmp_path):
    trainer = Trainer(options(tree, data, tmp_path / "run", steps=1), progress=False)
    names = trainer.trainable_names
    assert all(n.startswith("appearance.") or ".lora_" in n for n in names)
    assert not any(n.startswith(("controlnet.", "appearance.conv_out", "appearance.conv_norm_out")) for n in names)
    lora = [n for n in names if ".lora_" in n]
    assert len(lora) == 2 * 96 and all(n.startswith("unet.") for n in lora)


def test_lora_only_fine_tune_writes_only_the_lora(tree, data, tmp_path):
    run = train(options(tree, data, tmp_path / "run", steps=2, lora_only=True), progress=False)
    assert sorted(run.files) == ["appa_lora.safetensors"]


# --- bad input -> clear error, nothing lost ---------------------------------------------------------


@pytest.mark.parametrize("change, error, says", [
    (dict(width=100), ValueError, "multiple of 8"),
    (dict(stage=3), ValueError, "--stage must be 1"),
    (dict(stage=2, motion_module=None), ValueError, "stage 2 needs --motion-module"),
    (dict(lora_only=True, stage=2), ValueError, "--lora-only fine-tunes the stage-1"),
    (dict(mixed_precision="fp8"), ValueError, "--mixed-precision must be one of"),
    (dict(batch_size=0), ValueError, "--batch-size must be a whole number >= 1"),
    (dict(ptm_tau=3.0), ValueError, "--ptm-tau acts on the motion module"),
])
def test_bad_options_are_named(tree, data, tmp_path, change, error, says):
    values = dict(steps=1)
    values.update(change)
    stage = values.pop("stage", 1)
    with pytest.raises(error, match=says):
        options(tree, data, tmp_path / "run", stage=stage, **values).check()


def test_missing_and_empty_data_folders(tree, tmp_path):
    with pytest.raises(FileNotFoundError):
        Trainer(options(tree, tmp_path / "nowhere", tmp_path / "run", steps=1), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        Trainer(options(tree, tmp_path / "empty", tmp_path / "run2", steps=1), progress=False)


def test_clips_shorter_than_the_window_are_refused_in_stage_2(tree, tmp_path):
    short = write_videos(tmp_path / "short", videos=2, frames=3)
    with pytest.raises(ValueError, match="--frames"):
        Trainer(options(tree, short, tmp_path / "run", stage=2, steps=1), progress=False)


def test_a_base_that_is_not_sd15_is_refused(tree, data, tmp_path):
    from safetensors.torch import save_file

    from tcan_core.models.errors import ModelFormatError
    from tcan_core.tiny.sd15 import sdxl_like_state_dict

    path = tmp_path / "sdxl.safetensors"
    save_file(sdxl_like_state_dict(), str(path))
    with pytest.raises((ModelFormatError, ValueError), match="SD"):
        Trainer(options(tree, data, tmp_path / "run", steps=1, base=path), progress=False)


def test_a_motion_module_for_another_base_is_refused(tree, data, tmp_path):
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    from tcan_core.models.ldm_keys import motion_to_animatediff

    adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=2, use_motion_mid_block=False)
    path = tmp_path / "mm_other.safetensors"
    save_file({k: v.contiguous() for k, v in motion_to_animatediff(adapter.state_dict()).items()}, str(path))
    with pytest.raises(ValueError, match="motion"):
        Trainer(options(tree, data, tmp_path / "run", stage=2, steps=1, motion_module=path), progress=False)


def test_a_finished_run_is_not_overwritten_without_resume_or_overwrite(tree, data, tmp_path):
    out = tmp_path / "run"
    first = train(options(tree, data, out, steps=1), progress=False)
    weights = first.files["appa_lora.safetensors"].read_bytes()
    with pytest.raises(FileExistsError, match="pass --resume to continue it, --overwrite"):
        Trainer(options(tree, data, out, steps=2), progress=False)
    assert first.files["appa_lora.safetensors"].read_bytes() == weights
    with pytest.raises(FileNotFoundError, match="no checkpoint to continue"):
        Trainer(options(tree, data, tmp_path / "fresh", steps=1, resume=True), progress=False)
    again = train(options(tree, data, out, steps=1, overwrite=True, seed=5), progress=False)
    assert again.files["appa_lora.safetensors"].read_bytes() != weights


def test_resume_refuses_changed_settings(tree, data, tmp_path):
    out = tmp_path / "run"
    train(options(tree, data, out, steps=1), progress=False)
    with pytest.raises(ValueError, match="batch_size 1 -> 2"):
        Trainer(options(tree, data, out, steps=2, batch_size=2, resume=True), progress=False)


def test_out_of_memory_names_the_options_and_writes_no_weights(tree, data, tmp_path, monkeypatch):
    trainer = Trainer(options(tree, data, tmp_path / "run", steps=2), progress=False)

    def no_memory(micro):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_step", no_memory)
    with pytest.raises(TrainingOutOfMemory, match="--gradient-checkpointing.*--use-8bit-adam"):
        trainer.run()
    assert not list((tmp_path / "run").glob("*.safetensors"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failed_weights_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    import safetensors.torch

    from tcan_core.training.checkpoint import save_safetensors

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(tmp_path / "appa_lora.safetensors", {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_train_command(tree, data, tmp_path, capsys):
    from tcan_core.cli import main

    files = tree.files
    argv = ["train", "--stage", "1", "--data", str(data), "--base", str(files["sd15_safetensors"]),
            "--controlnet", str(files["controlnet_ldm"]), "--out", str(tmp_path / "run"), "--width", "64",
            "--height", "64", "--steps", "1", "--num-workers", "0", "--validate-every", "0", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "appearance_unet.safetensors" in out and "stage 1: 1 steps, last loss" in out
    assert main(argv) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(argv[:-1] + ["--width", "100"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_bf16_mixed_precision_keeps_trained_weights_in_float32(tree, data, tmp_path):
    """Autocast in bfloat16 with the frozen models in bfloat16 and the trained ones in float32 (stage 2:
    the motion module's hooks run in a bfloat16 UNet); a non-square size at the same time."""
    trainer = Trainer(options(tree, data, tmp_path / "run", stage=2, steps=1, mixed_precision="bf16", width=96,
                              height=64), progress=False)
    model = trainer.unwrapped
    assert next(model.unet.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    run = trainer.run()
    assert np.isfinite(run.losses).all() and sorted(run.files) == ["motion_module.safetensors",
                                                                    "temporal_controlnet.safetensors"]


def test_8bit_adam_without_bitsandbytes_says_how_to_install(tree, data, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        Trainer(options(tree, data, tmp_path / "run", steps=1, use_8bit_adam=True), progress=False)


# A standing figure's 18 OpenPose body points around its centre (x, y in pixels), for synthetic keypoints.
FIGURE = np.array([[0, -14], [0, -10], [-4, -10], [-6, -5], [-7, 0], [4, -10], [6, -5], [7, 0], [-3, 0], [-3, 6],
                   [-3, 12], [3, 0], [3, 6], [3, 12], [-1, -15], [1, -15], [-2, -14], [2, -14]], np.float32)


def write_prepared(root: Path, videos: int = 2, frames: int = 20) -> Path:
    """The layout prepare-data writes (manifest.json, clips/<name>/images, dwpose, poses.json) for the moving
    blocks of :func:`write_videos`, with body keypoints that follow each block."""
    from tcan_core.pose.pose_json import save_pose_json
    from tcan_core.pose_format import PoseSequence, to_pose_keypoint

    source = write_videos(root / "source", videos, frames)
    names = []
    for v in range(videos):
        name = f"video{v}"
        shutil.copytree(source / "train" / name, root / "data" / "clips" / name)
        sequence = PoseSequence.empty(frames, 1, SIZE, SIZE)
        sequence.people[:] = 1
        for f in range(frames):
            x, y = 8 + (2 * f + 7 * v) % (SIZE - 24) + 6, 16 + 6 * v + 8
            sequence.body[f, 0, :, :2] = FIGURE * 0.8 + (x, y)
            sequence.body[f, 0, :, 2] = 1.0
        save_pose_json(to_pose_keypoint(sequence), root / "data" / "clips" / name / "poses.json")
        names.append({"name": name})
    (root / "data" / "manifest.json").write_text(json.dumps({"version": 1, "clips": names, "skipped": []}))
    return root / "data"


@pytest.mark.parametrize("stage", [1, 2])
def test_tpc_in_training_calibrates_each_item_and_trains(tree, tmp_path, stage):
    prepared = write_prepared(tmp_path)
    trainer = Trainer(options(tree, prepared, tmp_path / "run", stage=stage, steps=2, tpc=True), progress=False)
    loaded = __import__("tcan_core.training.trainer", fromlist=["_collate"])._collate([(0, trainer.dataset[0])])
    batch = trainer._batch(loaded)
    used, local, query, key = batch.calibrated
    frames = 1 if stage == 1 else 4
    assert local.shape == (frames,) and query.shape == (frames, SIZE // 8, SIZE // 8)
    assert batch.calibrated_latents.shape == (used.numel(), 4, SIZE // 8, SIZE // 8) and key.shape[0] == used.numel()
    assert 0 < float(query.mean()) < 1 and float(key.max()) > 0
    run = trainer.run()
    assert run.step == 2 and np.isfinite(run.losses).all()


def test_tpc_needs_keypoints_and_batch_1(tree, data, tmp_path):
    with pytest.raises(ValueError, match="--tpc needs each clip's pose keypoints"):
        Trainer(options(tree, data, tmp_path / "run", steps=1, tpc=True), progress=False)
    with pytest.raises(ValueError, match="--tpc calibrates the reference for one clip at a time"):
        options(tree, data, tmp_path / "run", steps=1, tpc=True, batch_size=2).check()
