"""Tiny face-adapter files for tests: a small CLIP vision encoder (and its single file in the
clip_vision layout), ID-Animator's ``animator.ckpt`` in both key layouts and IP-Adapter FaceID's
``ip-adapter-faceid_sd15.bin``.

The adapters match the tiny SD1.5 UNet (:func:`tcan_core.tiny.sd15.build_tiny_sd15`): their
``face_adapter`` / ``adapter_modules`` / ``ip_adapter`` entries are numbered like the authors'
``unet.attn_processors`` list (down, up, mid blocks; attn1 then attn2); ID-Animator has weights only
at the ``attn2`` slots, FaceID a LoRA at every slot and ``to_k_ip`` / ``to_v_ip`` at the ``attn2`` ones.
Weights are random but seeded, so every build is identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..face.id_adapter import LORA_PROJECTIONS, Resampler, attention_slots, cross_attention_slots
from ..face.ip_faceid import FACEID_EMBEDDING_DIM, MLPProjModel

# A multiple of 64, so the clip_vision loader's head rule (width // 64) reads the 2 heads back.
TINY_CLIP_WIDTH = 128
TINY_FACE_TOKENS = 4
TINY_FACE_RANK = 4


def tiny_clip_vision_config(hidden_size: int = TINY_CLIP_WIDTH):
    """A transformers ``CLIPVisionConfig`` with small widths (32 x 32 images, 8 x 8 patches: 17 tokens; OpenAI's
    quick_gelu and layer norm eps 1e-5, as the clip_vision loader reads a width that is not ViT-H/bigG)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
                            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def build_tiny_clip_vision(hidden_size: int = TINY_CLIP_WIDTH, seed: int = 40):
    """A seeded ``CLIPVisionModelWithProjection`` with the tiny config."""
    from transformers import CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(tiny_clip_vision_config(hidden_size))
    return model.eval()


def write_tiny_clip_vision(path: str | Path, hidden_size: int = TINY_CLIP_WIDTH, seed: int = 40,
                           position_ids: bool = False) -> Path:
    """Save the tiny encoder's state dict as one safetensors file in the clip_vision layout (``vision_model.*``,
    ``visual_projection.weight``); ``position_ids`` adds the buffer that older transformers saved."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_tiny_clip_vision(hidden_size, seed)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if position_ids:
        positions = (model.config.image_size // model.config.patch_size) ** 2 + 1
        sd["vision_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file(sd, str(path))
    return path


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


def tiny_ip_faceid_state_dict(unet: torch.nn.Module, num_tokens: int = TINY_FACE_TOKENS, rank: int = TINY_FACE_RANK,
                              lora: bool = True, context: int | None = None, seed: int = 60) -> dict:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` as the authors save ip-adapter-faceid_sd15.bin, for ``unet``:
    the MLP over a 512-d identity embedding, a rank-``rank`` LoRA at every attention slot (``lora``) and
    ``to_k_ip`` / ``to_v_ip`` at the attn2 slots; ``context`` overrides the cross-attention width (2048 makes
    an SDXL-width file for error tests)."""
    context = int(unet.config.cross_attention_dim) if context is None else context
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = MLPProjModel(context, FACEID_EMBEDDING_DIM, num_tokens)
        # Noise on the LayerNorm too, so a dropped or misplaced weight changes the tokens.
        image_proj = {k: (v + torch.randn_like(v) * 0.1).detach().clone() for k, v in mlp.state_dict().items()}
        adapter: dict[str, torch.Tensor] = {}
        for path, i in attention_slots(unet).items():
            attn = unet.get_submodule(path)
            inner = attn.to_k.out_features
            cross = path.endswith(".attn2")
            if lora:
                kv_in = context if cross else attn.to_k.in_features
                sizes = {"to_q": (attn.to_q.in_features, inner), "to_k": (kv_in, inner), "to_v": (kv_in, inner),
                         "to_out": (inner, attn.to_out[0].out_features)}
                for proj in LORA_PROJECTIONS:
                    fan_in, fan_out = sizes[proj]
                    adapter[f"{i}.{proj}_lora.down.weight"] = torch.randn(rank, fan_in) * 0.1
                    adapter[f"{i}.{proj}_lora.up.weight"] = torch.randn(fan_out, rank) * 0.1
            if cross:
                adapter[f"{i}.to_k_ip.weight"] = torch.randn(inner, context) * 0.2
                adapter[f"{i}.to_v_ip.weight"] = torch.randn(inner, context) * 0.2
    return {"image_proj": image_proj, "ip_adapter": adapter}


def write_tiny_ip_faceid(path: str | Path, unet: torch.nn.Module, **kwargs) -> Path:
    """Write a tiny ip-adapter-faceid_sd15.bin (torch.save of the nested dict) or .safetensors (keys flattened with
    dots: ``image_proj.*``, ``ip_adapter.*``) for ``unet``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = tiny_ip_faceid_state_dict(unet, **kwargs)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"{group}.{k}": v.contiguous() for group, sd in obj.items() for k, v in sd.items()}, str(path))
    else:
        torch.save(obj, path)
    return path
