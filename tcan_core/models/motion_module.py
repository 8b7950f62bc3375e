"""AnimateDiff motion modules (v1, v2, v3 for SD1.5) -> diffusers ``MotionAdapter``.

Reads the original AnimateDiff key layout (``...motion_modules.N.temporal_transformer...``) and
the diffusers layout, from .ckpt or .safetensors. The version is recognised from the keys:
v1 has a 24-frame positional encoding and no mid block, v2 a mid block, v3 a 32-frame encoding
and no mid block (as AnimateDiff-Evolved tells them apart).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .detect import Detection, detect_motion_module, require_sd15
from .errors import ModelFormatError
from .sd15 import _count, _empty, _finish, _meta_shapes, _require_fit, diffusers_weight_shapes, load_diffusers_weights
from .state_dict import LazyTensors, Shapes, assign_streamed, load_strict, read_shapes

# AnimateDiff uses 8 heads in every temporal attention; the weights do not record it.
MOTION_HEADS = 8


def animatediff_key(key: str, source: str) -> str:
    """One original AnimateDiff key -> its diffusers MotionAdapter name (both PE buffers -> one)."""
    m = re.match(r"(.*\.motion_modules\.\d+\.)temporal_transformer\.(.*)", key)
    if m is None:
        raise ModelFormatError(f"{source}: unexpected key {key!r} in an AnimateDiff motion module")
    head, rest = m.group(1), m.group(2)
    if pe := re.match(r"transformer_blocks\.(\d+)\.attention_blocks\.(\d+)\.pos_encoder\.pe", rest):
        return f"{head}transformer_blocks.{pe.group(1)}.pos_embed.pe"
    rest = re.sub(r"\.attention_blocks\.(\d+)\.", lambda x: f".attn{int(x.group(1)) + 1}.", rest)
    rest = re.sub(r"\.norms\.(\d+)\.", lambda x: f".norm{int(x.group(1)) + 1}.", rest)
    return head + rest.replace(".ff_norm.", ".norm3.")


def animatediff_to_diffusers(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Original AnimateDiff keys -> diffusers MotionAdapter keys (one PE buffer per transformer block)."""
    return {target: sd[key] for target, key in animatediff_key_map(sd, source).items()}


def animatediff_key_map(source: Mapping[str, torch.Tensor], source_name: str) -> dict[str, str]:
    """Diffusers MotionAdapter key -> original AnimateDiff key (of the first of each block's two PE
    buffers); the two PE buffers of a block must be equal."""
    key_map: dict[str, str] = {}
    for key in source:
        target = animatediff_key(key, source_name)
        first = key_map.setdefault(target, key)
        if first != key and not torch.equal(source[first], source[key]):
            raise ModelFormatError(f"{source_name}: the two attention blocks of {target.removesuffix('.pos_embed.pe')} "
                                   "have different positional encodings; this is not a standard AnimateDiff "
                                   "motion module.")
    return key_map


def motion_adapter_config(det: Detection, sd: Mapping[str, torch.Tensor] | Shapes) -> dict:
    """MotionAdapter arguments for a detected motion module (diffusers key names -> tensors or shapes)."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in sd.items()}
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


def check_motion_shapes(shapes: Shapes, path, folder_config: dict | None = None) -> tuple[Detection, dict, Shapes]:
    """Everything the motion-module loader checks before it reads tensors, from ``{key: shape}`` alone ->
    (detection, MotionAdapter config, diffusers-named shapes). ``folder_config``: a diffusers folder's config.json."""
    from diffusers import MotionAdapter

    det = detect_motion_module(shapes)
    if folder_config is not None and det.kind == "motion":
        det.format = "diffusers folder"
    require_sd15(det, "motion", str(path))
    if "version" not in det.details:
        raise ModelFormatError(f"{path} is an {det.format} motion module; the pack reads AnimateDiff v1/v2/v3 "
                               "modules with positional encoding (mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt).")
    if det.format == "AnimateDiff":
        shapes = {animatediff_key(k, str(path)): s for k, s in shapes.items()}
    if folder_config is not None:
        cfg = {k: v for k, v in folder_config.items() if not k.startswith("_")}
    else:
        cfg = motion_adapter_config(det, shapes)
    expected = _meta_shapes(lambda: MotionAdapter.from_config(cfg))
    _require_fit(shapes, expected, f"AnimateDiff {det.details['version']} motion module", path)
    return det, cfg, shapes


def _folder_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a diffusers motion-adapter folder (as published "
                                "for animatediff-motion-adapter-v1-5-2) holds config.json and "
                                "diffusion_pytorch_model.safetensors")
    return json.loads((folder / "config.json").read_text())


def check_motion_module(path: str | os.PathLike) -> Detection:
    """What :func:`load_motion_module` checks before it reads any tensor, for a file or a diffusers folder."""
    p = Path(path)
    if p.is_dir():
        return check_motion_shapes(diffusers_weight_shapes(p), p, _folder_config(p))[0]
    return check_motion_shapes(read_shapes(p), p)[0]


def load_motion_module(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Detection]:
    """Load an SD1.5 AnimateDiff motion module (file, or diffusers motion-adapter folder) -> (MotionAdapter, detection)."""
    from diffusers import MotionAdapter

    p = Path(path)
    if p.is_dir():
        det, cfg, _ = check_motion_shapes(diffusers_weight_shapes(p), p, _folder_config(p))
        adapter = _empty(lambda: MotionAdapter.from_config(cfg))
        load_strict(adapter, load_diffusers_weights(p), f"AnimateDiff {det.details['version']} motion module", p)
        return _finish(adapter, dtype, device), det
    # Tensor by tensor, cast on the way in: the published modules are fp32 .ckpt files, and loading
    # them whole before a cast to fp16 held both copies at once.
    lazy = LazyTensors(p)
    det, cfg, _ = check_motion_shapes(lazy.shapes, p)
    key_map = animatediff_key_map(lazy, str(p)) if det.format == "AnimateDiff" else {k: k for k in lazy}
    adapter = _empty(lambda: MotionAdapter.from_config(cfg))
    assign_streamed(adapter, lazy, key_map, f"AnimateDiff {det.details['version']} motion module", p,
                    dtype=dtype, device=device)
    return _finish(adapter, dtype, device), det
