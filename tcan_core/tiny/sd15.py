"""Tiny SD1.5-family models (same layer layout as the real ones, tiny widths) in the real formats.

:func:`write_tiny_model_tree` writes a ComfyUI-style models folder:

- ``checkpoints/tiny_sd15.safetensors`` and ``.ckpt`` - single-file LDM checkpoints;
- ``checkpoints/tiny_sd15_diffusers/`` - a diffusers pipeline folder;
- ``controlnet/tiny_openpose.safetensors`` (LDM, ``control_model.`` prefix), ``tiny_openpose.pth``
  (LDM, no prefix) and ``tiny_openpose_diffusers/`` (a diffusers folder);
- ``animatediff_models/tiny_mm_v1.ckpt``, ``tiny_mm_v2.ckpt``, ``tiny_mm_v3.safetensors``
  (original AnimateDiff keys).

Weights are random but seeded, so every build is identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.sd15 import shipped_config
from ..models.ldm_keys import clip_to_ldm, controlnet_to_ldm, motion_to_animatediff, unet_to_ldm, vae_to_ldm

TINY_CHANNELS = [32, 32, 64, 64]
TINY_CONTEXT = 64


def tiny_unet_config() -> dict:
    cfg = shipped_config("sd15_unet")
    cfg.update(block_out_channels=TINY_CHANNELS, cross_attention_dim=TINY_CONTEXT, sample_size=8)
    return cfg


def tiny_vae_config() -> dict:
    cfg = shipped_config("sd15_vae")
    cfg.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
    return cfg


def tiny_text_config() -> dict:
    cfg = shipped_config("sd15_text_encoder")
    cfg.update(hidden_size=TINY_CONTEXT, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
               projection_dim=TINY_CONTEXT)
    return cfg


def tiny_controlnet_config() -> dict:
    cfg = shipped_config("sd15_controlnet")
    cfg.update(block_out_channels=TINY_CHANNELS, cross_attention_dim=TINY_CONTEXT,
               conditioning_embedding_out_channels=[8, 8, 16, 16])
    return cfg


def tiny_motion_config(version: str) -> dict:
    return dict(block_out_channels=tuple(TINY_CHANNELS), motion_layers_per_block=2,
                motion_mid_block_layers_per_block=1, motion_num_attention_heads=8, motion_norm_num_groups=32,
                motion_max_seq_length=24 if version == "v1" else 32, use_motion_mid_block=version == "v2")


def _seeded(seed: int, build):
    """Build a module with random weights drawn from ``seed``; non-zero everywhere, so a weight
    that a loader drops or misplaces changes the output."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def build_tiny_sd15(seed: int = 0):
    """(unet, vae, text_encoder) with tiny widths and the SD1.5 layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _seeded(seed, lambda: UNet2DConditionModel.from_config(tiny_unet_config()))
    vae = _seeded(seed + 1, lambda: AutoencoderKL.from_config(tiny_vae_config()))
    text_cfg = {k: v for k, v in tiny_text_config().items() if k not in ("architectures", "model_type")}
    text = _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))
    return unet, vae, text


def build_tiny_controlnet(seed: int = 10):
    from diffusers import ControlNetModel

    return _seeded(seed, lambda: ControlNetModel.from_config(tiny_controlnet_config()))


def build_tiny_motion_adapter(version: str = "v2", seed: int = 20):
    from diffusers import MotionAdapter

    return _seeded(seed, lambda: MotionAdapter(**tiny_motion_config(version)))


def sd15_single_file_state_dict(unet, vae, text) -> dict[str, torch.Tensor]:
    """The three models as one LDM-layout state dict, as SD1.5 checkpoints are distributed."""
    sd = {}
    sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    sd.update(clip_to_ldm(text.state_dict()))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def sdxl_like_state_dict() -> dict[str, torch.Tensor]:
    """A few tensors with SDXL's key names and its 2048-wide cross-attention (for error tests)."""
    p = "model.diffusion_model."
    return {
        p + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        p + "label_emb.0.0.weight": torch.zeros(8, 16),
        p + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 2048),
        p + "input_blocks.4.1.proj_in.weight": torch.zeros(8, 8),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 8),
        "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(16, 8),
    }


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd} if path.suffix == ".ckpt" else sd, path)
    return path


@dataclass
class TinyTree:
    """Paths of the tiny models written into a models root, and the modules they were made from."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)


def write_tiny_model_tree(root: str | Path, seed: int = 0) -> TinyTree:
    """Write the tiny SD1.5 checkpoint, ControlNet and motion modules into ``root`` (ComfyUI layout)."""

    root = Path(root)
    tree = TinyTree(root)
    unet, vae, text = build_tiny_sd15(seed)
    tree.modules.update(unet=unet, vae=vae, text_encoder=text)
    single = sd15_single_file_state_dict(unet, vae, text)
    tree.files["sd15_safetensors"] = _save(single, root / "checkpoints" / "tiny_sd15.safetensors")
    tree.files["sd15_ckpt"] = _save(single, root / "checkpoints" / "tiny_sd15.ckpt")

    folder = root / "checkpoints" / "tiny_sd15_diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
    }, indent=2))
    tree.files["sd15_diffusers"] = folder

    controlnet = build_tiny_controlnet(seed + 10)
    tree.modules["controlnet"] = controlnet
    cn_ldm = controlnet_to_ldm(controlnet.state_dict(), controlnet.config)
    tree.files["controlnet_ldm"] = _save(cn_ldm, root / "controlnet" / "tiny_openpose.safetensors")
    bare = {k[len("control_model."):]: v for k, v in cn_ldm.items()}
    tree.files["controlnet_ldm_bare"] = _save(bare, root / "controlnet" / "tiny_openpose.pth")
    controlnet.save_pretrained(root / "controlnet" / "tiny_openpose_diffusers")
    tree.files["controlnet_diffusers"] = root / "controlnet" / "tiny_openpose_diffusers"

    for version, name in (("v1", "tiny_mm_v1.ckpt"), ("v2", "tiny_mm_v2.ckpt"), ("v3", "tiny_mm_v3.safetensors")):
        adapter = build_tiny_motion_adapter(version, seed + 20)
        tree.modules[f"motion_{version}"] = adapter
        tree.files[f"motion_{version}"] = _save(motion_to_animatediff(adapter.state_dict()),
                                                root / "animatediff_models" / name)
    return tree
