"""OpenPose ControlNet (SD1.5): single file with LDM or diffusers key names, or a diffusers folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .detect import Detection, detect_controlnet, require_sd15
from .sd15 import (_count, _empty, _finish, _infer, _meta_shapes, _reject_unconverted, _require_fit,
                   diffusers_weight_shapes, infer_unet_config, load_diffusers_weights, shipped_config)
from .state_dict import Shapes, load_state_dict_file, load_strict, read_shapes, shapes_of


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
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    p = Path(path)
    if p.is_dir():
        det, cfg = check_controlnet_shapes(diffusers_weight_shapes(p), p, _read_config(p))
        sd = load_diffusers_weights(p)
    else:
        sd = load_state_dict_file(p)
        det, cfg = check_controlnet_shapes(shapes_of(sd), p)
        if det.format != "diffusers":
            prefix = det.details["prefix"]
            source = {k: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd
            converted = convert_controlnet_checkpoint(sd, cfg)
            _reject_unconverted("ControlNet", source, converted, p)
            sd = converted
    model = _empty(lambda: ControlNetModel.from_config(cfg))
    load_strict(model, sd, "SD1.5 ControlNet", p)
    return _finish(model, dtype, device), det


def detect_controlnet_source(path: str | os.PathLike) -> Detection:
    """Classify a ControlNet file or folder without loading its tensors."""
    p = Path(path)
    if p.is_dir():
        det = detect_controlnet(diffusers_weight_shapes(p))
        det.format = "diffusers folder"
        return det
    return detect_controlnet(read_shapes(p))
