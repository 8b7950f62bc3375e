"""TCAN training runs people can trust: two processes equal one with twice the batch, a resumed run
equals the run without the stop, and Ctrl-C saves a checkpoint and stops cleanly (issue 13).

The two-process run is launched as a user launches it on GPUs, ``torchrun -m tcan_core train``
(``accelerate launch --multi_gpu`` runs the same torchrun). On a machine without a GPU accelerate
joins the processes over gloo (``DistributedType.MULTI_CPU``) only when told to use the CPU
(``Accelerator(cpu=True)`` or ``ACCELERATE_USE_CPU=1``); the trainer asks for it itself when the
launcher started several processes and torch sees no accelerator, so the test sets nothing.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tcan_core.training.checkpoint import TRAINABLE, checkpoint_folders
from tcan_core.training.outputs import STAGE_FILES
from tcan_core.training.trainer import LOG_FILE, TrainOptions, Trainer, train

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATE = 1e-3
# 128 x 128, not 64 x 64: at 64 the tiny UNet's deepest level is 1 x 1 with 2 channels per GroupNorm
# group, where the normalised value is +-1 decided by the float32 rounding of two nearly equal
# numbers; the appearance UNet's gradient then differs by ~10% between a batch of 2 and two
# batches of 1 (float64: 1e-11), and AdamW turns that into weights ~lr apart. At 128 (2 x 2, 8
# values per group) the same comparison differs by ~2e-5.
DIST_SIZE = 128
FAST = dict(learning_rate=LEARNING_RATE, num_workers=0, checkpoint_every=0, validate_every=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_videos(root: Path, videos: int = 3, frames: int = 12, size: int = 64) -> Path:
    """The authors' layout (train/<video>/images, dwpose): a random texture sliding by one pixel a
    frame, its pose image a white bar that moves with it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for v in range(videos):
        folder = root / "train" / f"video{v}"
        (folder / "images").mkdir(parents=True)
        (folder / "dwpose").mkdir(parents=True)
        texture = rng.integers(0, 256, (size, size + frames, 3), dtype=np.uint8)
        for f in range(frames):
            pose = np.zeros((size, size, 3), np.uint8)
            x, y = 8 + (2 * f + 7 * v) % (size - 24), 16 + 6 * v
            pose[y:y + 12, x:x + 6] = 255
            Image.fromarray(np.ascontiguousarray(texture[:, f:f + size])).save(folder / "images" / f"{f:04d}.png")
            Image.fromarray(pose).save(folder / "dwpose" / f"{f:04d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_videos(tmp_path_factory.mktemp("dist_data"))


def options(tiny_tree, data, out, stage: int = 1, **extra) -> TrainOptions:
    values = dict(FAST, base=tiny_tree.files["sd15_safetensors"], controlnet=tiny_tree.files["controlnet_ldm"],
                  width=64, height=64, steps=4)
    values.update(extra)
    return TrainOptions(stage=stage, data=data, out=out, **values)


def log_rows(out: Path) -> list[dict[str, str]]:
    with (Path(out) / LOG_FILE).open(newline="") as handle:
        return list(csv.DictReader(handle))


def last_trainable(out: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, float32 trained tensors) of the newest checkpoint in ``out``."""
    step, folder = checkpoint_folders(out)[-1]
    return step, load_file(folder / TRAINABLE)


def leftovers(out: Path) -> list[Path]:
    """Temporary files or folders (``.name...partial`` or ``.step-N.xxx``) anywhere under ``out``."""
    return [p for p in Path(out).rglob(".*")]


def train_command(tiny_tree, data, out: Path, *extra: str) -> list[str]:
    files = tiny_tree.files
    return ["-m", "tcan_core", "train", "--stage", "1", "--data", str(data), "--base", str(files["sd15_safetensors"]),
            "--controlnet", str(files["controlnet_ldm"]), "--out", str(out), "--learning-rate", str(LEARNING_RATE),
            "--num-workers", "0", "--checkpoint-every", "0", "--validate-every", "0", "--no-progress", *extra]


def command_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    # The trainer, not the environment, must make the processes join (see the module docstring).
    env.pop("ACCELERATE_USE_CPU", None)
    return env


# --- many processes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_with_batch_1_equal_one_process_with_batch_2(tiny_tree, data, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 1 each == 1 process, batch 2: same samples
    (sample ((s*A + a)*W + r)*B + b), same losses, same weights; only rank 0 writes."""
    steps = 2
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    trainer = Trainer(options(tiny_tree, data, one_out, width=DIST_SIZE, height=DIST_SIZE, steps=steps, batch_size=2),
                      progress=False)
    initial = {name: p.detach().clone() for name, p in zip(trainer.trainable_names, trainer.trainable)}
    trainer.run()

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *train_command(tiny_tree, data, two_out, "--width", str(DIST_SIZE), "--height", str(DIST_SIZE),
                              "--steps", str(steps), "--batch-size", "1")]
    done = subprocess.run(command, cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Only the main process writes: one log with one header and each step once, one checkpoint, each
    # weight file reported once, no temporary file left behind.
    rows = log_rows(two_out)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert (two_out / LOG_FILE).read_text().count("step,loss") == 1
    assert [step for step, _ in checkpoint_folders(two_out)] == [steps]
    for name in STAGE_FILES[1]:
        assert (two_out / name).is_file()
        assert done.stdout.count(f"wrote {two_out / name}") == 1, done.stdout
    assert leftovers(two_out) == []
    assert '"world_size": 2' in (two_out / "run.json").read_text()

    # The loss of a step is the mean over the same two samples; the processes gather it.
    losses = [float(r["loss"]) for r in log_rows(one_out)]
    np.testing.assert_allclose([float(r["loss"]) for r in rows], losses, rtol=1e-4)

    _, one = last_trainable(one_out)
    _, two = last_trainable(two_out)
    assert one.keys() == two.keys() == initial.keys()
    moved = torch.cat([(one[k] - initial[k]).flatten() for k in one])
    apart = torch.cat([(two[k] - one[k]).flatten() for k in one])
    # Equal up to float32 rounding: DDP averages per-process gradients of batch 1 (conv and attention
    # kernels on batch 1, a gloo all-reduce) where one process computes them on batch 2. Measured:
    # |apart| / |moved| = 3e-4, largest element 2.5e-4. AdamW moves each weight by about lr a step
    # whatever the gradient's size, so a weight whose gradient is near 0 can land up to lr from the
    # other run's; hence atol = lr for single weights and 1% for the whole update. Training each
    # process alone, or on the wrong samples, moves the weights apart by the size of the update.
    assert float(moved.norm()) > steps * LEARNING_RATE * moved.numel() ** 0.5 * 0.25
    assert float(apart.norm()) < 1e-2 * float(moved.norm())
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=LEARNING_RATE, msg=name)


ONE_MACHINE_DOES_NOT_SEE_OUT = """
import os, sys
import tcan_core.training.trainer as trainer
if os.environ["RANK"] == "1":
    trainer.checkpoint_folders = lambda out: []
from tcan_core.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_resume_where_a_machine_does_not_see_out_is_refused(tiny_tree, data, tmp_path):
    """--resume with an --out that process 1 does not see (its machine lacks the shared folder): every
    process stops with the error instead of training from other steps (whose collectives would not pair)."""
    out = tmp_path / "run"
    train(options(tiny_tree, data, out, steps=1), progress=False)
    # Mark the run as made by two processes (the launch below has two), so that the settings check lets it
    # through to the checkpoint lookup; this test is about that lookup, not about the samples.
    run_file = out / "run.json"
    run_file.write_text(run_file.read_text().replace('"world_size": 1', '"world_size": 2'))
    entry = tmp_path / "entry.py"
    entry.write_text(ONE_MACHINE_DOES_NOT_SEE_OUT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(entry),
               *train_command(tiny_tree, data, out, "--width", "64", "--height", "64", "--steps", "2", "--resume")[2:]]
    done = subprocess.run(command, cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("must be on a filesystem every machine sees") == 2, done.stderr[-3000:]
    assert "steps [1, 0] by process" in done.stderr
    assert [s for s, _ in checkpoint_folders(out)] == [1]
    assert [int(r["step"]) for r in log_rows(out)] == [1]


# --- resume and Ctrl-C -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tiny_tree, data, tmp_path_factory):
    """Four steps without a stop: (out, trained tensors of step 4, losses)."""
    out = tmp_path_factory.mktemp("straight")
    result = train(options(tiny_tree, data, out), progress=False)
    assert result.step == 4 and not result.interrupted
    return out, last_trainable(out)[1], [float(r["loss"]) for r in log_rows(out)]


def assert_same_run(out: Path, straight, files: tuple[str, ...] = STAGE_FILES[1]) -> None:
    """``out`` holds the straight run's step-4 weights and losses. In one process the resumed steps run the
    same kernels on the same float32 inputs (weights and AdamW state restored bit for bit from
    safetensors), so the tolerance is float32 rounding only."""
    straight_out, weights, losses = straight
    step, resumed = last_trainable(out)
    assert step == 4
    assert resumed.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(resumed[name], weights[name], rtol=1e-5, atol=1e-6, msg=name)
    np.testing.assert_allclose([float(r["loss"]) for r in log_rows(out)], losses, rtol=1e-5)
    for name in files:
        a, b = load_file(out / name), load_file(straight_out / name)
        for key in b:
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5, msg=f"{name}: {key}")


def test_resume_continues_exactly(tiny_tree, data, straight, tmp_path):
    """4 steps straight == 2 steps, stop, --resume to 4 (same losses, same weights)."""
    first = train(options(tiny_tree, data, tmp_path, steps=2), progress=False)
    assert first.step == 2 and [s for s, _ in checkpoint_folders(tmp_path)] == [2]
    second = train(options(tiny_tree, data, tmp_path, steps=4, resume=True), progress=False)
    assert second.step == 4 and len(second.losses) == 2
    assert_same_run(tmp_path, straight)


def test_stage2_resume_continues_exactly(tiny_tree, data, tmp_path):
    """Stage 2 (motion modules and temporal ControlNet, clips of 4 frames, 2 per micro-step in 2 micro-steps):
    4 steps straight == 2 steps, stop, --resume to 4."""
    stage2 = dict(motion_module=tiny_tree.files["motion_v2"], frames=4, batch_size=2, grad_accum=2)
    straight_out, half = tmp_path / "straight", tmp_path / "half"
    train(options(tiny_tree, data, straight_out, stage=2, **stage2), progress=False)
    train(options(tiny_tree, data, half, stage=2, steps=2, **stage2), progress=False)
    resumed = train(options(tiny_tree, data, half, stage=2, resume=True, **stage2), progress=False)
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert_same_run(half, (straight_out, last_trainable(straight_out)[1],
                           [float(r["loss"]) for r in log_rows(straight_out)]), STAGE_FILES[2])


def test_ctrl_c_saves_a_checkpoint_stops_and_resume_continues(tiny_tree, data, straight, tmp_path):
    """SIGINT during step 2 of 4: the step finishes, a checkpoint of step 2 is written, no weight file,
    the earlier SIGINT handler is back; --resume then ends where the straight run ends."""
    handler = signal.getsignal(signal.SIGINT)

    def interrupt(step: int, loss: float) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    stopped = train(options(tiny_tree, data, tmp_path), progress=False, on_step=interrupt)
    assert stopped.interrupted and stopped.step == 2
    assert stopped.checkpoint == tmp_path / "checkpoints" / "step-000002"
    assert [s for s, _ in checkpoint_folders(tmp_path)] == [2]
    assert [int(r["step"]) for r in log_rows(tmp_path)] == [1, 2]
    assert not any((tmp_path / name).exists() for name in STAGE_FILES[1])
    assert leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is handler

    resumed = train(options(tiny_tree, data, tmp_path, resume=True), progress=False)
    assert resumed.step == 4 and not resumed.interrupted
    assert_same_run(tmp_path, straight)


def test_second_ctrl_c_stops_at_once_and_leaves_no_weights(tiny_tree, data, tmp_path):
    """Ctrl-C twice: KeyboardInterrupt at once, no checkpoint and no weight file, the handler restored."""
    handler = signal.getsignal(signal.SIGINT)

    def interrupt_twice(step: int, loss: float) -> None:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(options(tiny_tree, data, tmp_path), progress=False, on_step=interrupt_twice)
    assert checkpoint_folders(tmp_path) == []
    assert not any((tmp_path / name).exists() for name in STAGE_FILES[1])
    assert leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_to_the_train_command(tiny_tree, data, tmp_path):
    """SIGINT to a running ``python -m tcan_core train``: exit code 130, a checkpoint of the last finished
    step, the message says to --resume; the same command with --resume finishes the run."""
    args = train_command(tiny_tree, data, tmp_path, "--width", "64", "--height", "64", "--steps", "200")
    process = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=command_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / LOG_FILE).is_file() and log_rows(tmp_path)):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no training step logged within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stdout + stderr
    steps = [int(r["step"]) for r in log_rows(tmp_path)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 200
    assert [s for s, _ in checkpoint_folders(tmp_path)] == [steps[-1]]
    assert f"interrupted at step {steps[-1]}" in stdout and "--resume" in stdout
    assert not any((tmp_path / name).exists() for name in STAGE_FILES[1])
    assert leftovers(tmp_path) == []

    args[args.index("--steps") + 1] = str(steps[-1] + 1)
    done = subprocess.run([sys.executable, *args, "--resume"], cwd=tmp_path, env=command_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [int(r["step"]) for r in log_rows(tmp_path)] == list(range(1, steps[-1] + 2))
    assert all((tmp_path / name).is_file() for name in STAGE_FILES[1])
