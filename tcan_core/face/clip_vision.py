"""CLIP image encoders from single files in ComfyUI's models/clip_vision (Radford et al. 2021, CLIP).

ID-Animator's image encoder is OpenCLIP's ViT-H/14 trained on LAION-2B, the encoder IP-Adapter uses.
h94/IP-Adapter publishes it in transformers layout (models/image_encoder/model.safetensors, kept by
ComfyUI users as clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors): the keys ``vision_model.*``
and ``visual_projection.weight`` of a ``CLIPVisionModelWithProjection``. A single file has no config,
so it is read from the tensor shapes:

- width, MLP width, layer count, channels and patch size from the weights; image size = patch x
  sqrt(positions - 1); projection size from ``visual_projection``;
- heads, which the weights do not show: 16 for ViT-H/14 (1280 = 16 x 80), ViT-bigG/14 (1664 = 16 x 104)
  and ViT-L/14 (1024 = 16 x 64), 12 for ViT-B (768), and width // 64 otherwise (CLIP's head width 64);
- activation: ``gelu`` for the OpenCLIP-trained widths 1280 and 1664 (ViT-H, ViT-bigG; h94's config
  says gelu), ``quick_gelu`` for the rest, which are OpenAI's ViT-L/14 and ViT-B (trained with it).
  An OpenCLIP ViT-L would need gelu, but its weights look like OpenAI's, so it is read as OpenAI's;
- ``layer_norm_eps`` 1e-5 (both families).

Loaded encoders are cached per (file, modification time, dtype) in a module dict, so a graph that
runs again reuses the model instead of reading the 2.5 GB file again; a changed file (new mtime)
is read again and its older entry dropped. The cached model is shared: it is in eval mode with
``requires_grad`` off, and callers use it read-only (:func:`clear_clip_vision_cache` empties it).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..models.errors import ModelFormatError
from ..models.state_dict import format_keys, load_state_dict_file, load_strict

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

log = logging.getLogger(__name__)

PREFIX = "vision_model."
POSITION_IDS = "vision_model.embeddings.position_ids"
EXPECTED_LAYOUT = ("a transformers CLIPVisionModelWithProjection (keys vision_model.embeddings.*, "
                   "vision_model.encoder.layers.<i>.*, vision_model.post_layernorm.*, visual_projection.weight), e.g. "
                   "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors from h94/IP-Adapter models/image_encoder")
LAYER_NORM_EPS = 1e-5
# width -> (name, heads, activation); see the module docstring for why.
KNOWN_WIDTHS = {1280: ("ViT-H", 16, "gelu"), 1664: ("ViT-bigG", 16, "gelu"), 1024: ("ViT-L", 16, "quick_gelu"),
                768: ("ViT-B", 12, "quick_gelu")}
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
_NEEDED = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
           "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight")

_CACHE: dict[tuple[str, int, torch.dtype | None], "CLIPVisionModelWithProjection"] = {}


def clip_vision_heads(width: int) -> int:
    """Attention heads of a CLIP ViT of this width (the known ViTs', else width // 64)."""
    if width in KNOWN_WIDTHS:
        return KNOWN_WIDTHS[width][1]
    if width < 64 or width % 64:
        raise ModelFormatError(f"a CLIP vision width of {width} is not a known ViT (768, 1024, 1280, 1664) nor a "
                               "multiple of CLIP's head width 64, so its head count cannot be told from the weights")
    return width // 64


def clip_vision_name(config: CLIPVisionConfig) -> str:
    """'ViT-H/14' and the like for reports; 'CLIP ViT width W' for other widths."""
    name = KNOWN_WIDTHS.get(int(config.hidden_size), (f"ViT width {config.hidden_size}",))[0]
    return f"{name}/{config.patch_size}"


def clip_vision_config(shapes: Mapping[str, Sequence[int]], source: str = "CLIP vision file") -> CLIPVisionConfig:
    """A transformers ``CLIPVisionConfig`` from the shapes of a CLIPVisionModelWithProjection state dict."""
    from transformers import CLIPVisionConfig

    absent = [k for k in _NEEDED if k not in shapes]
    if absent:
        raise ModelFormatError(f"{source} is not a CLIP vision encoder: it lacks {format_keys(absent)}; expected "
                               f"{EXPECTED_LAYOUT}. Its keys: {format_keys(shapes)}. Pick the image encoder in "
                               "models/clip_vision.")
    width, channels, patch, patch_w = (int(n) for n in shapes[_NEEDED[0]])
    positions = int(shapes[_NEEDED[1]][0])
    side = math.isqrt(max(positions - 1, 0))
    if patch != patch_w or side * side != positions - 1:
        raise ModelFormatError(f"{source}: {positions} position embeddings with {patch} x {patch_w} patches are not "
                               "a square image of a class token plus patches; the file is not a CLIP ViT")
    layers = 1 + max(int(m[1]) for k in shapes if (m := _LAYER.match(k)))
    activation = KNOWN_WIDTHS.get(width, ("", 0, "quick_gelu"))[2]
    return CLIPVisionConfig(hidden_size=width, intermediate_size=int(shapes[_NEEDED[2]][0]), num_hidden_layers=layers,
                            num_attention_heads=clip_vision_heads(width), num_channels=channels,
                            image_size=side * patch, patch_size=patch,
                            projection_dim=int(shapes[_NEEDED[3]][0]), hidden_act=activation,
                            layer_norm_eps=LAYER_NORM_EPS)


def _empty(config: CLIPVisionConfig) -> CLIPVisionModelWithProjection:
    """A CLIPVisionModelWithProjection with parameters on the meta device (buffers real); the file fills them."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModelWithProjection

    with init_empty_weights(include_buffers=False):
        return CLIPVisionModelWithProjection(config)


def parse_clip_vision_state_dict(sd: Mapping[str, torch.Tensor], source: str = "CLIP vision file",
                                 dtype: torch.dtype | None = torch.float32) -> CLIPVisionModelWithProjection:
    """A CLIPVisionModelWithProjection state dict -> the model (eval, no grad), strictly; ``dtype`` None keeps
    the file's. A ``vision_model.embeddings.position_ids`` buffer, which older transformers saved, is ignored."""
    config = clip_vision_config({k: tuple(v.shape) for k, v in sd.items()}, source)
    model = _empty(config)
    expected = model.state_dict()
    tensors = {k: (v if dtype is None else v.to(dtype)) for k, v in sd.items()
               if not (k == POSITION_IDS and k not in expected)}
    load_strict(model, tensors, f"CLIP vision encoder {clip_vision_name(config)}", source)
    return model.eval().requires_grad_(False)


def load_clip_vision(path: str | os.PathLike,
                     dtype: torch.dtype | None = torch.float32) -> CLIPVisionModelWithProjection:
    """A CLIP image encoder file (.safetensors, or .bin/.pth/.ckpt read with weights_only) -> transformers
    ``CLIPVisionModelWithProjection`` on the CPU, cached per (file, mtime, dtype) (see the module docstring)."""
    p = Path(path)
    stat = p.stat() if p.is_file() else None
    key = (str(p.resolve()), stat.st_mtime_ns if stat else -1, dtype)
    if key in _CACHE:
        return _CACHE[key]
    model = parse_clip_vision_state_dict(load_state_dict_file(p), str(p), dtype)
    for old in [k for k in _CACHE if k[0] == key[0]]:
        del _CACHE[old]
    _CACHE[key] = model
    log.info("CLIP vision encoder %s from %s", clip_vision_name(model.config), p)
    return model


def clear_clip_vision_cache() -> None:
    """Forget every cached encoder (the next load reads its file again)."""
    _CACHE.clear()


def clip_vision_cache_bytes() -> int:
    """Bytes of the cached encoders' weights (0 when none is cached)."""
    return sum(p.numel() * p.element_size() for model in _CACHE.values() for p in model.parameters())
