"""Benchmark: peak memory while loading the training-free graph's models at full size, on the CPU.

Run from the repository root: ``python bench/bench_load_memory.py [--dtype float32|float16]
[--comfyui /tmp/ComfyUI] [--dir DIR]``. Target: peak <= 1.15 x the weights + the interpreter's baseline.

First a subprocess writes full-size SD1.5-architecture files with random weights, in the formats
users download (built on the meta device from the pack's shipped SD1.5 configs, converted to the
files' own key names with ``tcan_core.models.ldm_keys``): the checkpoint as an fp16 single-file
``.safetensors`` with LDM keys (UNet, VAE, CLIP text), the OpenPose ControlNet as fp16
``.safetensors`` with LDM ``control_model.`` keys, and the AnimateDiff v2 motion module as an fp32
torch ``.ckpt``. Then each row runs in a fresh subprocess:

- ``file path``: the headless path, ``load_tcan_model`` (UNet, VAE, text encoder) + motion module +
  temporal ControlNet (temporal layers from the motion module);
- ``file path in ComfyUI (before)``: what the shipped workflows did: core Load Checkpoint (MODEL,
  CLIP, VAE) and TCAN Load Model reading the same file again, + motion module + ControlNet;
- ``MODEL path``: core Load Checkpoint, TCAN Model from MODEL (weights shared), motion module and
  ControlNet, and the MODEL's weights bound for a call as the TCAN Sampler binds them.

The ComfyUI rows import ComfyUI from ``--comfyui`` (started with ``--cpu``); they are skipped with the
reason when it is not there. ``baseline`` is the resident set after the imports, before any model;
``peak`` the resident-set high-water mark after it (``VmHWM``, reset through
``/proc/self/clear_refs``); every weight is read once after loading, so weights still on disk behind a
memory map count too. ``weights`` is one copy of every distinct model the row holds (unique storages;
the ``before`` row counts its UNet once, which is the point of that row). ``ratio = (peak - baseline)
/ weights``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 1.15
CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET = "control_v11p_sd15_openpose_fp16.safetensors"
MOTION = "mm_sd_v15_v2.ckpt"
ROWS = ("file path", "file path in ComfyUI (before)", "MODEL path")
GIB = 1024 ** 3


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


# Writing the files -------------------------------------------------------------------------------

def _random_like(shapes: dict, dtype) -> dict:
    """Random tensors of ``shapes``; AnimateDiff's positional encodings (a fixed table that both attention
    blocks of a transformer block share) are drawn once per block, as the loader checks."""
    import re

    import torch

    generator = torch.Generator().manual_seed(0)
    out, shared = {}, {}
    for key, shape in shapes.items():
        if key.endswith("pos_encoder.pe"):
            block = re.sub(r"attention_blocks\.\d+", "attention_blocks", key)
            if block not in shared:
                shared[block] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            out[key] = shared[block].clone()
        else:
            out[key] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    return out


def write_files(folder: Path) -> None:
    """Full-size SD1.5 checkpoint, OpenPose ControlNet and AnimateDiff v2 module with random weights."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from tcan_core.models.ldm_keys import clip_to_ldm, controlnet_to_ldm, motion_to_animatediff, unet_to_ldm, vae_to_ldm
    from tcan_core.models.sd15 import shipped_config

    def shapes(sd):
        return {k: tuple(v.shape) for k, v in sd.items()}

    with init_empty_weights():
        unet_cfg, vae_cfg = shipped_config("sd15_unet"), shipped_config("sd15_vae")
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**shipped_config("sd15_text_encoder")))
        cn_cfg = shipped_config("sd15_controlnet")
        controlnet = ControlNetModel.from_config(cn_cfg)
        motion = MotionAdapter(use_motion_mid_block=True, motion_max_seq_length=32)
    text_sd = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    ckpt = {**shapes(unet_to_ldm(unet.state_dict(), unet_cfg)), **shapes(vae_to_ldm(vae.state_dict(), vae_cfg)),
            **shapes(clip_to_ldm(text_sd))}
    save_file(_random_like(ckpt, torch.float16), str(folder / CKPT))
    save_file(_random_like(shapes(controlnet_to_ldm(controlnet.state_dict(), cn_cfg)), torch.float16),
              str(folder / CONTROLNET))
    torch.save(_random_like(shapes(motion_to_animatediff(motion.state_dict())), torch.float32), folder / MOTION)


# The rows ----------------------------------------------------------------------------------------

def _unique_bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_meta:
                continue
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _touch(*modules) -> None:
    """Read every weight once, so weights behind a memory map are resident like loaded ones."""
    import torch

    with torch.no_grad():
        for module in modules:
            if module is not None:
                for t in module.parameters():
                    if not t.is_meta:
                        t.sum()


def _import_comfy(path: str, dtype):
    import torch

    sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    if dtype == torch.float16:
        args.fp16_unet = args.fp16_vae = args.fp16_text_enc = True
    import comfy.model_management  # noqa: F401
    import comfy.sd

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import load_pack

    import importlib

    return comfy.sd, importlib.import_module(load_pack().__name__ + ".nodes.host")


def run_row(row: str, folder: Path, dtype_name: str, comfyui: str | None) -> dict:
    import torch

    from tcan_core.animation import build

    dtype = getattr(torch, dtype_name)
    comfy_sd = host = None
    if row != "file path":
        if not comfyui or not (Path(comfyui) / "comfy" / "model_management.py").is_file():
            return {"row": row, "skipped": f"no ComfyUI at {comfyui!r} (pass --comfyui DIR)"}
        comfy_sd, host = _import_comfy(comfyui, dtype)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    gc.collect()
    baseline = resident_bytes()
    reset_peak()
    ckpt, controlnet, motion = folder / CKPT, folder / CONTROLNET, folder / MOTION
    held = []
    if row == "file path":
        model, _ = build.load_tcan_model(ckpt, dtype=dtype, with_vae_and_text=True)
        held += [model.vae, model.text_encoder]
    else:
        comfy_model, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)
        held += [comfy_model.model, clip.cond_stage_model, vae.first_stage_model]
        if row == "MODEL path":
            model, _ = host.tcan_model_from_comfy(comfy_model)
        else:
            model, _ = build.load_tcan_model(ckpt, dtype=dtype)
    model, _ = build.add_motion_module(model, motion, dtype=dtype)
    model, _ = build.add_temporal_controlnet(model, controlnet, dtype=dtype)
    held += [model.unet, model.patch("motion").adapter, model.patch("controlnet").controlnet]
    _touch(*held)
    if row == "MODEL path":
        with host.model_weights_loaded(model):
            _touch(model.unet)
    weights = _unique_bytes(*held)
    if row == "file path in ComfyUI (before)":
        weights -= _unique_bytes(model.unet)  # one copy of each model: the second UNet is the excess
    peak = peak_resident_bytes()
    return {"row": row, "baseline": baseline, "peak": peak, "weights": weights,
            "ratio": (peak - baseline) / weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                        help="dtype the models are loaded in (float32 is the CPU's; float16 what a GPU uses)")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "/tmp/ComfyUI"))
    parser.add_argument("--dir", help="folder for the random-weight files (default: a temporary folder)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_files(Path(args.write))
        return
    if args.row:
        print(json.dumps(run_row(args.row, Path(args.dir), args.dtype, args.comfyui)))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, __file__, "--write", str(folder)], check=True)
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
        print("files: " + ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in sorted(sizes.items())))
        print(f"models loaded in {args.dtype} on the CPU; target: peak - baseline <= {TARGET} x weights\n")
        print(f"{'row':<32}{'baseline GiB':>14}{'weights GiB':>13}{'peak GiB':>10}{'ratio':>8}  verdict")
        for row in args.rows:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run([sys.executable, __file__, "--row", row, "--dir", str(folder), "--dtype", args.dtype,
                                   "--comfyui", args.comfyui], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{row:<32}failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            if "skipped" in r:
                print(f"{row:<32}skipped: {r['skipped']}")
                continue
            verdict = "ok" if r["ratio"] <= TARGET else "over target"
            print(f"{row:<32}{r['baseline'] / GIB:>14.2f}{r['weights'] / GIB:>13.2f}{r['peak'] / GIB:>10.2f}"
                  f"{r['ratio']:>8.2f}  {verdict}")


if __name__ == "__main__":
    main()
