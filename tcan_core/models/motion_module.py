"""AnimateDiff motion modules (v1, v2, v3 for SD1.5) -> diffusers ``MotionAdapter``.

Reads the original AnimateDiff key layout (``...motion_modules.N.temporal_transformer...``) and
the diffusers layout, from .ckpt or .safetensors. The version is recognised from the keys:
v1 has a 24-frame positional encoding and no mid block, v2 a mid block, v3 a 32-frame encoding
and no mid block (as AnimateDiff-Evolved tells them apart).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .detect import Detection, detect_motion_module, require_sd15
from .errors import ModelFormatError
from .sd15 import _count, _empty, _finish
from .state_dict import load_state_dict_file, load_strict, shapes_of

# AnimateDiff uses 8 heads in every temporal attention; the weights do not record it.
MOTION_HEADS = 8


def animatediff_to_diffusers(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Original AnimateDiff keys -> diffusers MotionAdapter keys (one PE buffer per transformer block)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"(.*\.motion_modules\.\d+\.)temporal_transformer\.(.*)", key)
        if m is None:
            raise ModelFormatError(f"{source}: unexpected key {key!r} in an AnimateDiff motion module")
        head, rest = m.group(1), m.group(2)
        if pe := re.match(r"transformer_blocks\.(\d+)\.attention_blocks\.(\d+)\.pos_encoder\.pe", rest):
            target = f"{head}transformer_blocks.{pe.group(1)}.pos_embed.pe"
            if target in out and not torch.equal(out[target], value):
                raise ModelFormatError(f"{source}: the two attention blocks of {head}transformer_blocks."
                                       f"{pe.group(1)} have different positional encodings; this is not a "
                                       "standard AnimateDiff motion module.")
            out[target] = value
            continue
        rest = re.sub(r"\.attention_blocks\.(\d+)\.", lambda x: f".attn{int(x.group(1)) + 1}.", rest)
        rest = re.sub(r"\.norms\.(\d+)\.", lambda x: f".norm{int(x.group(1)) + 1}.", rest)
        rest = rest.replace(".ff_norm.", ".norm3.")
        out[head + rest] = value
    return out


def motion_adapter_config(det: Detection, sd: dict[str, torch.Tensor]) -> dict:
    """MotionAdapter arguments for a detected motion module."""
    shapes = shapes_of(sd)
    return dict(
        block_out_channels=tuple(det.details["channels"]),
        motion_layers_per_block=_count(shapes, r"down_blocks\.0\.motion_modules\.(\d+)\."),
        motion_transformer_layers_per_block=max(_count(shapes, r"down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\."), 1),
        motion_mid_block_layers_per_block=max(_count(shapes, r"mid_block\.motion_modules\.(\d+)\."), 1),
        motion_num_attention_heads=MOTION_HEADS,
        motion_norm_num_groups=32,
        motion_max_seq_length=det.details["max_frames"],
        use_motion_mid_block=bool(det.details["mid_block"]),
    )


def load_motion_module(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Detection]:
    """Load an SD1.5 AnimateDiff motion module -> (diffusers MotionAdapter, detection)."""
    from diffusers import MotionAdapter

    p = Path(path)
    sd = load_state_dict_file(p)
    det = detect_motion_module(shapes_of(sd))
    require_sd15(det, "motion", str(p))
    if "version" not in det.details:
        raise ModelFormatError(f"{p} is an {det.format} motion module; the pack reads AnimateDiff v1/v2/v3 "
                               "modules with positional encoding (mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt).")
    if det.format == "AnimateDiff":
        sd = animatediff_to_diffusers(sd, str(p))
    cfg = motion_adapter_config(det, sd)
    adapter = _empty(lambda: MotionAdapter(**cfg))
    load_strict(adapter, sd, f"AnimateDiff {det.details['version']} motion module", p)
    return _finish(adapter, dtype, device), det
