"""A TCAN model whose denoising UNet weights belong to a host model (ComfyUI's MODEL).

The UNet is built empty (parameters on the meta device, no memory) from the host's LDM weight
shapes, with the map from each diffusers parameter to its LDM key. For one sampling call the host
binds its own tensors into it (:func:`unet_weights_bound`): the very tensors, not copies, so the
weights exist once in memory, and whatever the host did to them (ComfyUI's LoRA loaders, merges)
is what the TCAN UNet runs with. After the call the UNet is empty again and holds no reference to
the host's weights, so the host can move, patch or free them as it likes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator, Mapping

import torch

from ..models.sd15 import empty_unet, ldm_unet_layout
from ..models.errors import ModelFormatError
from ..models.state_dict import Shapes, bind_tensors, fit_problems, is_bound, shapes_of, unbind_tensors
from .model import TCANModel

log = logging.getLogger(__name__)

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tcan_model_sharing_unet(shapes: Shapes, dtype: torch.dtype, source: str,
                            base_weights: Mapping[str, torch.Tensor] | None = None,
                            appearance: str | os.PathLike | None = None
                            ) -> tuple[TCANModel, dict[str, str], str]:
    """LDM UNet shapes (keys without prefix) -> (TCAN model with an empty UNet, diffusers key -> LDM key, report).

    ``dtype`` is the dtype the host's weights will have when bound. ``appearance`` loads a TCAN
    appearance UNet file; the authors' layout of it lacks a few unused output layers, which are
    taken from ``base_weights`` (the host's LDM tensors, bound only while it is built).
    """
    from ..models.tcan_ckpt import load_appearance_unet

    _require_sd15_unet(shapes, source)
    cfg, key_map = ldm_unet_layout(shapes, prefix="", source=source)
    unet = torch.nn.Module.to(empty_unet(cfg), dtype=dtype)
    problems = fit_problems({k: shapes[v] for k, v in key_map.items()}, shapes_of(unet.state_dict()), "SD1.5 UNet")
    if problems:
        raise ModelFormatError(f"{source}: its UNet weights do not fit an SD1.5 UNet: {problems}. TCAN needs an "
                               "SD1.5 model (Load Checkpoint with an SD1.5 checkpoint)")
    appearance_unet = None
    lines = [f"SD1.5 UNet shared with {source} ({len(key_map)} tensors, no copy), {dtype}."]
    if appearance is not None:
        if base_weights is None:
            raise ValueError("an appearance UNet file needs the base weights to be built like the base UNet")
        with unet_weights_bound(unet, key_map, base_weights.__getitem__):
            appearance_unet = load_appearance_unet(appearance, like=unet, dtype=dtype)
        lines.append(f"Appearance UNet from {os.path.basename(appearance)}.")
    else:
        lines.append("Training-free: the base UNet also serves as the appearance UNet.")
    model = TCANModel(unet=unet, vae=None, text_encoder=None, source=source, appearance_unet=appearance_unet)
    return model, key_map, " ".join(lines)


def _require_sd15_unet(shapes: Shapes, source: str) -> None:
    """A clear error unless ``shapes`` are an SD1.5 text-to-image UNet's (LDM keys without prefix)."""
    from ..models.detect import Detection, _base_from_unet, require_sd15

    if "input_blocks.0.0.weight" not in shapes or "out.2.weight" not in shapes:
        raise ModelFormatError(f"{source} is not a Stable Diffusion UNet (no input_blocks/out layers; keys such as "
                               f"{', '.join(sorted(shapes)[:3])}); connect the MODEL of an SD1.5 checkpoint")
    require_sd15(Detection("checkpoint", _base_from_unet(shapes, ""), source), "checkpoint", source)
    in_ch = int(shapes["input_blocks.0.0.weight"][1])
    if in_ch != 4:
        raise ModelFormatError(f"{source} is a {in_ch}-channel SD1.5 UNet (inpainting or instruct-pix2pix); TCAN "
                               "needs a regular text-to-image SD1.5 model with 4 input channels")


@contextlib.contextmanager
def unet_weights_bound(unet: torch.nn.Module, key_map: Mapping[str, str], lookup: Callable[[str], torch.Tensor],
                       compute_dtype: torch.dtype | None = None) -> Iterator[torch.nn.Module]:
    """Bind ``lookup(ldm_key)`` for every parameter of the empty ``unet`` for the block, then empty it again.

    Tensors are shared as they are; only a tensor whose dtype torch cannot compute in (float8) or
    that differs from ``compute_dtype`` is cast, and that cast copy lives for the block only.
    """
    if is_bound(unet):
        raise RuntimeError("this UNet already has weights bound; a shared UNet is bound by one call at a time")
    try:
        tensors = {}
        for key, ldm_key in key_map.items():
            tensor = lookup(ldm_key)
            target = compute_dtype or (tensor.dtype if tensor.dtype in COMPUTE_DTYPES else torch.float32)
            tensors[key] = tensor if tensor.dtype == target else tensor.detach().to(target)
        bind_tensors(unet, tensors)
        del tensors
        yield unet
    finally:
        unbind_tensors(unet)


def require_bound(unet: torch.nn.Module, what: str) -> None:
    """A clear error when a shared UNet is used without its host's weights bound."""
    if not is_bound(unet):
        raise RuntimeError(f"{what}: the TCAN model's UNet weights come from the host's MODEL and are bound only "
                           "while a TCAN sampler node runs; run it through TCAN Sampler (or TCAN Character Image)")
