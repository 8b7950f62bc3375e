"""Torch-archive motion modules and ControlNets load tensor by tensor, cast on the way in, and give back the mapped
file pages of every tensor they copied, so a float16 load of an fp32 .ckpt never holds both copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tcan_core.models.motion_module import load_motion_module
from tcan_core.models.state_dict import LazyTensors, release_mapped_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def test_fp16_motion_ckpt_has_no_fp32_tensor_and_same_weights(tiny_tree):
    path = tiny_tree.files["motion_v2"]
    assert path.suffix == ".ckpt"
    half, _ = load_motion_module(path, dtype=torch.float16)
    tensors = dict(half.named_parameters()) | dict(half.named_buffers())
    assert [n for n, t in tensors.items() if t.dtype == torch.float32] == []
    # Bit-identical to loading in float32 and casting the whole module afterwards.
    full, _ = load_motion_module(path, dtype=torch.float32)
    reference = full.half().state_dict()
    loaded = half.state_dict()
    assert set(loaded) == set(reference)
    for key, value in loaded.items():
        assert value.dtype == reference[key].dtype and torch.equal(value, reference[key]), key


@pytest.mark.parametrize("kind", ["controlnet_ldm_bare", "controlnet_ldm", "controlnet_diffusers"])
def test_fp16_controlnet_loads_tensor_by_tensor_with_the_same_weights(tiny_tree, kind):
    """ControlNet files (the published fp32 .pth among them) stream the same way, with the weights of a
    float32 load cast afterwards."""
    from tcan_core.models.controlnet import load_controlnet

    half, _ = load_controlnet(tiny_tree.files[kind], dtype=torch.float16)
    assert [n for n, t in half.state_dict().items() if t.dtype == torch.float32] == []
    reference = load_controlnet(tiny_tree.files[kind], dtype=torch.float32)[0].half().state_dict()
    loaded = half.state_dict()
    assert set(loaded) == set(reference)
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key


@linux_only
def test_released_pages_read_back_from_the_file(tmp_path):
    path = tmp_path / "two.ckpt"
    a, b = torch.randn(1 << 20), torch.randn(1 << 20)
    torch.save({"a": a, "b": b}, path)
    lazy = LazyTensors(path)
    assert torch.equal(lazy["a"], a) and torch.equal(lazy["b"], b)
    assert release_mapped_pages(lazy["a"]) > 0
    lazy.release("b")
    # Unmodified private file pages come back from the file on the next read.
    assert torch.equal(lazy["a"], a) and torch.equal(lazy["b"], b)


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from tcan_core.models.motion_module import check_motion_module, load_motion_module

    def peak():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))

    check_motion_module(sys.argv[1])  # imports and builds everything but the weights
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = peak()
    adapter, _ = load_motion_module(sys.argv[1], dtype=torch.float16)
    size = sum(t.numel() * t.element_size() for t in adapter.state_dict().values())
    print(json.dumps({"growth": peak() - base, "fp16": size}))
""")


@linux_only
def test_fp16_load_of_fp32_ckpt_peaks_near_the_fp16_size(tmp_path):
    from diffusers import MotionAdapter

    from tcan_core.models.ldm_keys import motion_to_animatediff
    from tcan_core.tiny.sd15 import tiny_motion_config

    # About 80 MB of fp32 weights: large enough that one copy more or less is far above the noise.
    cfg = tiny_motion_config("v2") | dict(block_out_channels=(128, 128, 256, 256))
    torch.manual_seed(0)
    adapter = MotionAdapter(**cfg)
    sd = {k: v.detach().contiguous() for k, v in motion_to_animatediff(adapter.state_dict()).items()}
    fp32 = sum(t.numel() * t.element_size() for t in sd.values())
    path = tmp_path / "mm_fp32.ckpt"
    torch.save({"state_dict": sd}, path)
    del adapter, sd
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert fp32 > 60e6
    # Loading whole and casting after held fp32 + fp16 = 3x the fp16 size; streamed, the largest
    # single tensor and allocator slack come on top of the fp16 copy.
    assert r["growth"] < 1.4 * r["fp16"], (r, fp32)
