"""The training benchmark's meta-device counts (bench/bench_training.py) on the tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

bench_training = pytest.importorskip("bench_training")


def test_stage1_flops_count_the_backward_of_what_trains():
    counts = bench_training.training_flops(1, 64, 1, tiny=True)
    forward, backward = counts["forward"], counts["backward"]
    assert forward["total"] > 0 and forward["appearance UNet"] > 0 and forward["ControlNet"] > 0
    assert forward["UNet: of which APPA LoRA"] > 0
    # The frozen ControlNet's residuals need no gradient; the trained appearance UNet needs the
    # gradients of its inputs and of its weights (about twice its forward), reached only through
    # the reference tokens; the UNet with the LoRA needs about one forward's worth.
    assert backward["ControlNet"] == 0
    assert 1.5 < backward["appearance UNet"] / forward["appearance UNet"] <= 2.05
    assert 0.6 < backward["UNet"] / forward["UNet"] < 1.3
    assert backward["total"] == backward["appearance UNet"] + backward["UNet"]
    # The VAE encodes the target and the reference at every step, without gradients.
    vae = forward[bench_training.VAE_ROW]
    assert vae > 0 and backward[bench_training.VAE_ROW] == 0
    assert forward["total"] == forward["appearance UNet"] + forward["ControlNet"] + forward["UNet"] + vae


def test_checkpointing_and_8bit_adam_reduce_the_computed_memory():
    found = bench_training.activation_bytes(1, 64, 1, torch.bfloat16, tiny=True)
    assert 0 < found["checkpointed"] < found["plain"]
    assert found["largest block"] < found["plain"]
    video = bench_training.activation_bytes(2, 64, 4, torch.bfloat16, tiny=True)
    # Stage 2's temporal layers (run from hooks) are checkpointed by the trainer too.
    assert 0 < video["checkpointed"] < 0.5 * video["plain"] and video["largest temporal layer"] > 0
    sizes = [10, 5000, 1_000_000]
    assert bench_training.adam8bit_bytes(sizes) < 8 * sum(sizes)
    # Tensors under 4096 values keep 32-bit states in bitsandbytes.
    assert bench_training.adam8bit_bytes([10]) == 80
