"""``python -m tcan_core demo``: the tiny model set, run through what the pack has, on the CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch

from .doctor import format_report, run_doctor
from .model_folders import ModelFolders
from .models.controlnet import load_controlnet
from .models.motion import load_motion_module
from .models.sd15 import load_sd15
from .tiny.tree import write_demo_tree


def run_demo(out: Path) -> Iterator[str]:
    """Write the tiny models under ``out/models``, check them with doctor and load each one."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tree = write_demo_tree(out / "models")
    yield f"tiny models written to {tree.root} ({time.perf_counter() - start:.1f} s)"
    report = format_report(run_doctor(ModelFolders(tree.root)))
    (out / "doctor.txt").write_text(report + "\n")
    yield report
    sd = load_sd15(tree.files["sd15_safetensors"])
    with torch.no_grad():
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        text = sd.text_encoder(torch.tensor([[49406, 49407] + [49407] * 75]))[0]
        eps = sd.unet(latent, 999, encoder_hidden_states=text).sample
        image = sd.vae.decode(latent / sd.vae.config.scaling_factor).sample
    yield (f"SD1.5 loaded ({sd.detection.describe()}): UNet eps {tuple(eps.shape)}, "
           f"VAE decode {tuple(image.shape)}")
    controlnet, det = load_controlnet(tree.files["controlnet_ldm"])
    yield f"ControlNet loaded ({det.describe()})"
    for version in ("v1", "v2", "v3"):
        _, det = load_motion_module(tree.files[f"motion_{version}"])
        yield f"motion module loaded ({det.describe()})"
    yield f"demo finished in {time.perf_counter() - start:.1f} s; outputs in {out}"
