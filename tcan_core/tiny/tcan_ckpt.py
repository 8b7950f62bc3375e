"""Tiny TCAN-trained checkpoints in the authors' layouts and the pack's, made from the tiny models.

:func:`write_tiny_tcan_checkpoints` writes (layouts in :mod:`tcan_core.models.tcan_ckpt`):

- ``appearance_ckpt`` / ``appearance_module_ckpt``: the authors' ``[AppearanceEncoder]`` file, a
  ``torch.save``-d dict without ``conv_out`` and the final-block layers, without / with ``module.``;
- ``appearance_safetensors``: the pack's full diffusers UNet;
- ``unet_stage1_ckpt``: the authors' stage-1 ``[UNet]``: base weights (``base_layer`` on the APPA
  layers) and peft ``lora_A/lora_B.default`` keys;
- ``unet_stage2_ckpt`` / ``unet_stage2_module_ckpt``: stage 2, the same plus AnimateDiff-named
  motion modules, without / with ``module.``;
- ``unet_stage2_safetensors``: the pack's: peft LoRA keys and diffusers-named motion modules;
- ``controlnet_t_ckpt`` / ``controlnet_t_module_ckpt``: the authors' ``[ControlNetT]``: diffusers
  ControlNet keys plus AnimateDiff-named temporal layers in down blocks 2 and 3;
- ``controlnet_t_safetensors``: the pack's, temporal layers with diffusers names;
- ``controlnet_t_temporal_only_safetensors``: the temporal layers alone.

The appearance UNet and the ControlNet's temporal layers are the given models plus seeded noise
("trained"), so a loader that takes them from the wrong place is caught; the LoRA has rank 4 and no
stored alpha (alpha = rank, as the authors' files). Pass a motion adapter without a mid block and
with 32 positions (``build_tiny_motion_adapter("v3")``) for the authors' stage-2 configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.ldm_keys import motion_to_animatediff
from ..models.lora import appa_targets
from ..models.tcan_ckpt import appearance_pruned_keys
from .lora import peft_state_dict, tiny_lora_factors
from .sd15 import _save

TINY_TCAN_RANK = 4
TEMPORAL_CONTROLNET_BLOCKS = (2, 3)


def _noisy(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``sd`` plus seeded noise on every floating tensor except positional encodings (fixed buffers)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sd.items():
        value = value.detach().clone()
        if value.is_floating_point() and not key.endswith(".pe"):
            value += torch.randn(value.shape, generator=generator) * 0.02
        out[key] = value
    return out


def tiny_appearance_state_dict(unet: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny "trained" appearance UNet: ``unet``'s full diffusers state dict plus seeded noise."""
    return _noisy(unet.state_dict(), seed + 100)


def tiny_appa_factors(unet: torch.nn.Module, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The tiny APPA LoRA: (A [r, in], B [out, r]) for every APPA layer of ``unet``, seeded."""
    return tiny_lora_factors(unet, appa_targets(unet), TINY_TCAN_RANK, seed + 200)


def tiny_controlnet_temporal(adapter: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The ControlNet's temporal layers, diffusers names ``down_blocks.N.motion_modules.M...``: the
    adapter's down blocks 2 and 3 (TCAN's initialisation) plus seeded noise (stage-2 training)."""
    wanted = tuple(f"down_blocks.{i}.motion_modules." for i in TEMPORAL_CONTROLNET_BLOCKS)
    return _noisy({k: v for k, v in adapter.state_dict().items() if k.startswith(wanted)}, seed + 300)


def peft_unet_state_dict(unet: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
    """``unet`` after peft's ``add_adapter``: LoRA targets' weights under ``base_layer``, plus
    ``lora_A.default.weight`` / ``lora_B.default.weight``."""
    targets = set(factors)
    sd = {}
    for key, value in unet.state_dict().items():
        module, _, name = key.rpartition(".")
        sd[f"{module}.base_layer.{name}" if module in targets else key] = value.detach().clone()
    sd.update(peft_state_dict(factors, prefix="", adapter="default"))
    return sd


def _module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"module." + k: v for k, v in sd.items()}


def _torch_save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """A plain dict of tensors via ``torch.save``, as the authors' ``train.py`` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().contiguous().clone() for k, v in sd.items()}, path)
    return path


def write_tiny_tcan_checkpoints(folder: str | Path, unet: torch.nn.Module, controlnet: torch.nn.Module,
                                adapter: torch.nn.Module, seed: int = 0) -> dict[str, Path]:
    """Write the tiny TCAN checkpoints (see the module docstring) into ``folder``; name -> path."""
    folder = Path(folder)
    files: dict[str, Path] = {}

    appearance = tiny_appearance_state_dict(unet, seed)
    pruned = appearance_pruned_keys(unet)
    authors = {k: v for k, v in appearance.items() if k not in pruned}
    files["appearance_ckpt"] = _torch_save(authors, folder / "[AppearanceEncoder]_tiny.ckpt")
    files["appearance_module_ckpt"] = _torch_save(_module(authors), folder / "tiny_appearance_ddp.ckpt")
    files["appearance_safetensors"] = _save(appearance, folder / "tiny_appearance.safetensors")

    factors = tiny_appa_factors(unet, seed)
    stage1 = peft_unet_state_dict(unet, factors)
    motion = adapter.state_dict()
    stage2 = {**stage1, **motion_to_animatediff(motion)}
    files["unet_stage1_ckpt"] = _torch_save(stage1, folder / "[UNet]_stage1_tiny.ckpt")
    files["unet_stage2_ckpt"] = _torch_save(stage2, folder / "[UNet]_stage2_tiny.ckpt")
    files["unet_stage2_module_ckpt"] = _torch_save(_module(stage2), folder / "tiny_unet_stage2_ddp.ckpt")
    files["unet_stage2_safetensors"] = _save({**peft_state_dict(factors, prefix=""), **motion},
                                             folder / "tiny_tcan_unet.safetensors")

    temporal = tiny_controlnet_temporal(adapter, seed)
    controlnet_sd = controlnet.state_dict()
    authors_t = {**controlnet_sd, **motion_to_animatediff(temporal)}
    files["controlnet_t_ckpt"] = _torch_save(authors_t, folder / "[ControlNetT]_tiny.ckpt")
    files["controlnet_t_module_ckpt"] = _torch_save(_module(authors_t), folder / "tiny_controlnet_t_ddp.ckpt")
    files["controlnet_t_safetensors"] = _save({**controlnet_sd, **temporal}, folder / "tiny_controlnet_t.safetensors")
    files["controlnet_t_temporal_only_safetensors"] = _save(temporal, folder / "tiny_controlnet_t_layers.safetensors")
    return files


def write_tiny_tcan_models(root: str | Path, unet: torch.nn.Module, controlnet: torch.nn.Module,
                           adapter: torch.nn.Module, seed: int = 0) -> dict[str, Path]:
    """Write the tiny TCAN checkpoints into ``<root>/tcan/`` of a ComfyUI-style models root."""
    return write_tiny_tcan_checkpoints(Path(root) / "tcan", unet, controlnet, adapter, seed)
