"""OpenPose ControlNet (SD1.5): single file with LDM or diffusers key names, or a diffusers folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .detect import Detection, detect_controlnet, require_sd15
from .sd15 import (_count, _empty, _finish, _infer, _meta_shapes, _require_fit,
                   diffusers_weight_shapes, infer_unet_config, load_diffusers_weights, shipped_config)
from .errors import ModelFormatError
from .state_dict import LazyTensors, Shapes, assign_streamed, load_strict, read_shapes, shapes_of


def infer_controlnet_config_ldm(shapes: Shapes, prefix: str = "") -> dict:
    """ControlNetModel config for LDM ControlNet keys (UNet encoder + hint block + zero convs)."""
    unet = infer_unet_config({**shapes, prefix + "out.2.weight": (4,)}, prefix)
    cfg = shipped_config("sd15_controlnet")
    for key in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
                "transformer_layers_per_block", "cross_attention_dim"):
        cfg[key] = unet[key]
    n = _count(shapes, rf"{re.escape(prefix)}input_hint_block\.(\d+)\.weight")
    # Hint convs sit at even indices: conv_in, pairs (same width, then stride 2 and wider), conv_out;
    # each width first appears at index 4k.
    cfg["conditioning_embedding_out_channels"] = [int(shapes[f"{prefix}input_hint_block.{4 * k}.weight"][0])
                                                  for k in range(n // 2)]
    cfg["conditioning_channels"] = int(shapes[prefix + "input_hint_block.0.weight"][1])
    return cfg


def infer_controlnet_config_diffusers(shapes: Shapes) -> dict:
    """ControlNetModel config for diffusers ControlNet keys."""
    cfg = shipped_config("sd15_controlnet")
    levels = _count(shapes, r"down_blocks\.(\d+)\.")
    attn = [f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in range(levels)]
    n_blocks = _count(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    cfg.update(
        in_channels=int(shapes["conv_in.weight"][1]),
        block_out_channels=[int(shapes[f"down_blocks.{i}.resnets.0.conv2.weight"][0]) for i in range(levels)],
        layers_per_block=_count(shapes, r"down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        conditioning_embedding_out_channels=[int(shapes["controlnet_cond_embedding.conv_in.weight"][0])]
        + [int(shapes[f"controlnet_cond_embedding.blocks.{k}.weight"][0]) for k in range(1, n_blocks, 2)],
        conditioning_channels=int(shapes["controlnet_cond_embedding.conv_in.weight"][1]),
    )
    ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx is not None:
        cfg["cross_attention_dim"] = int(ctx)
    return cfg


def check_controlnet_shapes(shapes: Shapes, path, folder_config: dict | None = None) -> tuple[Detection, dict]:
    """Everything the ControlNet loader checks before it converts, from ``{key: shape}`` alone -> (detection,
    config); raises the loader's own error otherwise. ``folder_config``: a diffusers folder's config.json."""
    from diffusers import ControlNetModel

    from .ldm_keys import controlnet_to_ldm

    det = detect_controlnet(shapes)
    if folder_config is not None and det.kind == "controlnet":
        det.format = "diffusers folder"
    require_sd15(det, "controlnet", str(path))
    if folder_config is not None:
        cfg = dict(folder_config)
    elif det.format == "diffusers":
        cfg = _infer("ControlNet", path, infer_controlnet_config_diffusers, shapes)
    else:
        cfg = _infer("ControlNet", path, infer_controlnet_config_ldm, shapes, det.details["prefix"])
    expected = _meta_shapes(lambda: ControlNetModel.from_config(cfg))
    if det.format.startswith("LDM"):
        prefix = det.details["prefix"]
        expected = shapes_of(controlnet_to_ldm({k: torch.empty(s, device="meta") for k, s in expected.items()},
                                               cfg, prefix))
        shapes = {k: s for k, s in shapes.items() if k.startswith(prefix)}
    _require_fit(shapes, expected, "SD1.5 ControlNet", path)
    return det, cfg


def check_controlnet(path: str | os.PathLike) -> Detection:
    """What :func:`load_controlnet` checks before it reads any tensor, for a file or a diffusers folder."""
    p = Path(path)
    if p.is_dir():
        return check_controlnet_shapes(diffusers_weight_shapes(p), p, _read_config(p))[0]
    return check_controlnet_shapes(read_shapes(p), p)[0]


def _read_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a diffusers ControlNet folder holds config.json "
                                "and diffusion_pytorch_model.safetensors")
    return json.loads((folder / "config.json").read_text())


def load_controlnet(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Detection]:
    """Load an SD1.5 ControlNet -> (diffusers ControlNetModel, detection)."""
    from diffusers import ControlNetModel

    p = Path(path)
    if p.is_dir():
        det, cfg = check_controlnet_shapes(diffusers_weight_shapes(p), p, _read_config(p))
        model = _empty(lambda: ControlNetModel.from_config(cfg))
        load_strict(model, load_diffusers_weights(p), "SD1.5 ControlNet", p)
        return _finish(model, dtype, device), det
    # Tensors are read one at a time and cast on the way in (an fp32 .pth loaded in fp16 never
    # holds both copies); every check runs on the shapes first.
    lazy = LazyTensors(p)
    det, cfg = check_controlnet_shapes(lazy.shapes, p)
    key_map = {k: k for k in lazy.shapes} if det.format == "diffusers" else \
        _ldm_controlnet_key_map(lazy.shapes, det.details["prefix"], cfg, p)
    model = _empty(lambda: ControlNetModel.from_config(cfg))
    assign_streamed(model, lazy, key_map, "SD1.5 ControlNet", p, dtype=dtype, device=device)
    return _finish(model, dtype, device), det


def _ldm_controlnet_key_map(shapes: Shapes, prefix: str, cfg: dict, path) -> dict[str, str]:
    """diffusers key -> file key of an LDM-named ControlNet, from shapes only: diffusers' own conversion
    runs on empty (meta) tensors and the renaming is read back by tensor identity."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    tokens = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted = convert_controlnet_checkpoint(tokens, cfg)
    by_id = {id(t): k for k, t in tokens.items()}
    key_map = {k: by_id[id(t)] for k, t in converted.items() if id(t) in by_id}
    if len(key_map) != len(converted):
        raise ModelFormatError(f"{path}: the ControlNet conversion changed tensors it should only rename: "
                               f"{', '.join(sorted(set(converted) - set(key_map))[:8])}")
    left = sorted(set(k for k in tokens if k.startswith(prefix)) - set(key_map.values()))
    if left:
        shown = ", ".join(left[:8]) + (f" ... and {len(left) - 8} more" if len(left) > 8 else "")
        raise ModelFormatError(f"{path}: {len(left)} unexpected ControlNet key(s) that no SD1.5 layer takes: {shown}")
    return key_map


def detect_controlnet_source(path: str | os.PathLike) -> Detection:
    """Classify a ControlNet file or folder without loading its tensors."""
    p = Path(path)
    if p.is_dir():
        det = detect_controlnet(diffusers_weight_shapes(p))
        det.format = "diffusers folder"
        return det
    return detect_controlnet(read_shapes(p))
