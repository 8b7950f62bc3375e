"""diffusers -> original (LDM / AnimateDiff) key names.

The tiny-model kit writes the real formats with these maps, and the LoRA loader derives kohya's
LDM-style layer names from them. The loaders read LDM files with diffusers' own conversion, so a
tiny model written here and loaded back tests both directions against an independent
implementation.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _down_mid_unet(key: str, lpb: int) -> str | None:
    """Down and mid block names shared by the UNet and the ControlNet; None if not such a key."""
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = 1 + i * (lpb + 1) + j
        return f"input_blocks.{block}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m.group(1)) + 1) * (lpb + 1)}.0.op.{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2), _RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m.group(1)}"
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0"}
    head, _, tail = key.rpartition(".")
    return f"{fixed[head]}.{tail}" if head in fixed else None


def unet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM ``model.diffusion_model.*`` keys."""
    lpb = int(config["layers_per_block"])
    attn_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        new = _down_mid_unet(key, lpb)
        if new is None:
            if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
                i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
                block = i * (lpb + 1) + j
                new = (f"output_blocks.{block}.0.{_resnet(rest, _RESNET)}" if kind == "resnets"
                       else f"output_blocks.{block}.1.{rest}")
            elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
                i = int(m.group(1))
                new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if attn_up[i] else 1}.conv.{m.group(2)}"
            else:
                head, _, tail = key.rpartition(".")
                new = {"conv_norm_out": "out.0", "conv_out": "out.2"}[head] + "." + tail
        out["model.diffusion_model." + new] = value
    return out


def controlnet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel state dict -> LDM ControlNet keys (``control_model.`` prefix)."""
    lpb = int(config["layers_per_block"])
    n_hint = len(config["conditioning_embedding_out_channels"])
    out = {}
    for key, value in sd.items():
        new = _down_mid_unet(key, lpb)
        if new is None:
            if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
                new = f"zero_convs.{m.group(1)}.0.{m.group(2)}"
            elif m := re.match(r"controlnet_mid_block\.(.*)", key):
                new = f"middle_block_out.0.{m.group(1)}"
            elif m := re.match(r"controlnet_cond_embedding\.conv_in\.(.*)", key):
                new = f"input_hint_block.0.{m.group(1)}"
            elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
                new = f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"
            elif m := re.match(r"controlnet_cond_embedding\.conv_out\.(.*)", key):
                new = f"input_hint_block.{4 * n_hint - 2}.{m.group(1)}"
            else:
                raise KeyError(f"no LDM name for ControlNet key {key}")
        out[prefix + new] = value
    return out


def vae_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM ``first_stage_model.*`` keys (1x1 conv attention)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_resnet(m.group(3), _VAE_RESNET)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_resnet(m.group(3), _VAE_RESNET)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m.group(1)}.downsample.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.{_resnet(m.group(3), _VAE_RESNET)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.{m.group(2)}"
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict -> LDM ``cond_stage_model.transformer.text_model.*`` keys
    (transformers 5 drops the ``text_model.`` level from its own names; checkpoints keep it)."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def motion_to_animatediff(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter state dict -> original AnimateDiff motion-module keys.

    AnimateDiff keeps one positional-encoding buffer per attention block; diffusers one per
    transformer block, so the buffer is written for both attention blocks.
    """
    out = {}
    for key, value in sd.items():
        m = re.match(r"(.*\.motion_modules\.\d+\.)(.*)", key)
        head, rest = m.group(1), m.group(2)
        if mm := re.match(r"transformer_blocks\.(\d+)\.pos_embed\.pe", rest):
            for a in (0, 1):
                out[f"{head}temporal_transformer.transformer_blocks.{mm.group(1)}.attention_blocks.{a}.pos_encoder.pe"] = value.clone()
            continue
        rest = re.sub(r"\.attn([12])\.", lambda x: f".attention_blocks.{int(x.group(1)) - 1}.", rest)
        rest = re.sub(r"\.norm([12])\.", lambda x: f".norms.{int(x.group(1)) - 1}.", rest)
        rest = rest.replace(".norm3.", ".ff_norm.")
        out[f"{head}temporal_transformer.{rest}"] = value
    return out
