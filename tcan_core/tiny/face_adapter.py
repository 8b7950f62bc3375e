"""Tiny ID-Animator files for tests: a small CLIP vision encoder and ``animator.ckpt`` in both key layouts.

The checkpoint matches the tiny SD1.5 UNet (:func:`tcan_core.tiny.sd15.build_tiny_sd15`): its
``face_adapter`` / ``adapter_modules`` are numbered like the authors' ``unet.attn_processors``
list (down, up, mid blocks; attn1 then attn2), with weights only at the ``attn2`` slots.
Weights are random but seeded, so every build is identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..face.id_adapter import LORA_PROJECTIONS, Resampler, cross_attention_slots

TINY_CLIP_WIDTH = 48
TINY_FACE_TOKENS = 4
TINY_FACE_RANK = 4


def tiny_clip_vision_config(hidden_size: int = TINY_CLIP_WIDTH):
    """A transformers ``CLIPVisionConfig`` with small widths (32 x 32 images, 8 x 8 patches: 17 tokens)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
                            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)


def build_tiny_clip_vision(hidden_size: int = TINY_CLIP_WIDTH, seed: int = 40):
    """A seeded ``CLIPVisionModelWithProjection`` with the tiny config."""
    from transformers import CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(tiny_clip_vision_config(hidden_size))
    return model.eval()


def tiny_id_animator_parts(unet: torch.nn.Module, embedding_dim: int = TINY_CLIP_WIDTH,
                           num_queries: int = TINY_FACE_TOKENS, rank: int = TINY_FACE_RANK,
                           context: int | None = None, seed: int = 50) -> tuple[dict, dict]:
    """(Resampler state dict, adapter state dict keyed ``<slot>.<name>``) for ``unet``; ``context`` overrides
    the cross-attention width (2048 makes an SDXL-width file for error tests)."""
    context = int(unet.config.cross_attention_dim) if context is None else context
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resampler = Resampler(dim=context, depth=2, dim_head=64, heads=2, num_queries=num_queries,
                              embedding_dim=embedding_dim, output_dim=context, ff_mult=2)
        image_proj = {k: v.detach().clone() for k, v in resampler.state_dict().items()}
        adapter: dict[str, torch.Tensor] = {}
        for path, i in cross_attention_slots(unet).items():
            attn = unet.get_submodule(path)
            inner = attn.to_k.out_features
            adapter[f"{i}.to_k_face.weight"] = torch.randn(inner, context) * 0.2
            adapter[f"{i}.to_v_face.weight"] = torch.randn(inner, context) * 0.2
            sizes = {"to_q": (attn.to_q.in_features, inner), "to_k": (context, inner), "to_v": (context, inner),
                     "to_out": (inner, attn.to_out[0].out_features)}
            for proj in LORA_PROJECTIONS:
                fan_in, fan_out = sizes[proj]
                adapter[f"{i}.{proj}_lora.down.weight"] = torch.randn(rank, fan_in) * 0.1
                adapter[f"{i}.{proj}_lora.up.weight"] = torch.randn(fan_out, rank) * 0.1
    return image_proj, adapter


def tiny_id_animator_state_dict(unet: torch.nn.Module, layout: str = "grouped", **kwargs) -> dict:
    """The checkpoint object as the authors save it: ``grouped`` -> ``{"image_proj": {...}, "face_adapter": {...}}``;
    ``flat`` -> ``{"state_dict": {"module.image_proj_model.*", "module.adapter_modules.*"}}`` (DDP training)."""
    image_proj, adapter = tiny_id_animator_parts(unet, **kwargs)
    if layout == "grouped":
        return {"image_proj": image_proj, "face_adapter": adapter}
    if layout == "flat":
        flat = {f"module.image_proj_model.{k}": v for k, v in image_proj.items()}
        flat.update({f"module.adapter_modules.{k}": v for k, v in adapter.items()})
        return {"state_dict": flat}
    raise ValueError(f"layout must be 'grouped' or 'flat', got {layout!r}")


def write_tiny_id_animator(path: str | Path, unet: torch.nn.Module, layout: str = "grouped", **kwargs) -> Path:
    """Write a tiny animator.ckpt (torch) or .safetensors (grouped keys flattened with dots) for ``unet``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = tiny_id_animator_state_dict(unet, layout, **kwargs)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        inner = obj.get("state_dict", obj)
        flat = {}
        for k, v in inner.items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv.contiguous() for kk, vv in v.items()})
            else:
                flat[k] = v.contiguous()
        save_file(flat, str(path))
    else:
        torch.save(obj, path)
    return path
