"""TCAN-trained parts: appearance UNet, denoising UNet (APPA LoRA + motion modules), temporal ControlNet.

Files are recognised by their keys (:func:`detect_tcan_checkpoint`), never by their names. Two
families of files are read: what the authors' training code writes, and the pack's own safetensors.

The authors' layouts (github.com/eccv2024tcan/TCAN, commit 2b86e73, read for this module):

- ``train.py`` saves with ``torch.save(m.module.state_dict() if hasattr(m, "module") else
  m.state_dict(), path)`` into ``[AppearanceEncoder]_*.ckpt`` and ``[UNet]_*.ckpt`` (stage 1) and
  ``[UNet]_*.ckpt`` and ``[ControlNetT]_*.ckpt`` (stage 2): plain dicts of tensors with diffusers
  module names. The DDP wrapper is taken off before saving, but their own reader
  (``magicanimate/utils/util.py`` ``model_load``) strips ``module.``, so files written by other
  wrappers carry it; a leading ``module.`` is accepted everywhere.
- Appearance UNet (``magicanimate/models/appearance_encoder.py``, ``AppearanceEncoderModel``): the
  keys of a diffusers ``UNet2DConditionModel`` without ``conv_norm_out``/``conv_out`` (the class
  never builds them) and without the parts of the last transformer block that
  ``reset_final_block()`` replaces by parameter-free stand-ins before training: in
  ``up_blocks.3.attentions.2`` the ``proj_out`` and, in ``transformer_blocks.0``, ``attn1.to_q/k/v/out``,
  ``norm2``, ``attn2``, ``norm3`` and ``ff``. Only the ``norm1`` outputs of the mid and up blocks are
  read from this UNet (DESIGN.md section 6), so those layers never matter; the loader takes them
  from the base UNet passed as ``like``. The pack's safetensors hold the full diffusers UNet.
- Denoising UNet (``magicanimate/models/unet_controlnet.py`` ``UNet3DConditionModel`` with
  ``unet_3d_blocks.py``, ``resnet.py``, ``attention.py``): diffusers key names for the spatial layers
  (``InflatedConv3d`` subclasses ``nn.Conv2d``, so the names and shapes are those of 2D layers).
  APPA is added by ``unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=[attn1/attn2
  .to_q/to_k/to_v]))`` (``train.py``), so each target holds ``<path>.base_layer.weight``,
  ``<path>.lora_A.default.weight`` [r, in] and ``<path>.lora_B.default.weight`` [out, r], no alpha
  (alpha = r). Stage 2 (``configs/train/second_stage.yaml``) adds AnimateDiff motion modules with
  the original AnimateDiff names (``magicanimate/models/motion_module.py``:
  ``{down,up}_blocks.N.motion_modules.M.temporal_transformer...``), no mid block
  (``motion_module_mid_block: false``), the positional-encoding length from the config (32 in
  stage 2). The base weights are frozen in both stages, so they equal the base model the authors
  trained on (their README uses RealisticVision V5.1, not SD1.5).
- Temporal ControlNet (``magicanimate/models/controlnet.py`` ``ControlNet3DModel``; ``train.py``
  builds it from ``configs/model/cnet_config.json`` without ``down_block_types``): the diffusers
  ``ControlNetModel`` keys of the frozen OpenPose ControlNet plus motion modules in the blocks
  whose resolution factor is in ``motion_module_resolutions=(4, 8)``, i.e. ``down_blocks.2`` and
  ``down_blocks.3``, one after each resnet/attention pair (``down_blocks.N.motion_modules.{0,1}``,
  AnimateDiff names), initialised from the motion module and trained in stage 2.
- Optional ``--use_learnable_taumap`` adds ``...attention_blocks.N.taumap_projection_layer.weight``
  to every motion module (``magicanimate/models/orig_attention.py``); the README's commands do not
  use it and the pack's PTM has no learned part, so such files are refused with that reason.

The pack's own safetensors use the same diffusers names without ``module.``: the appearance UNet
as a full ``UNet2DConditionModel`` state dict; the denoising UNet as peft LoRA keys
(``lora_A.weight``/``lora_B.weight``, with or without an adapter name) plus motion modules in
diffusers' ``MotionAdapter`` names, base weights optional; the temporal ControlNet as ControlNet
keys plus ``down_blocks.N.motion_modules.M`` in diffusers' ``AnimateDiffTransformer3D`` names, or
the temporal layers alone.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import torch

from .controlnet import infer_controlnet_config_diffusers
from .detect import detect_controlnet, detect_motion_module, require_sd15
from .errors import ModelFormatError
from .keys import is_lora_key, strip_module_prefix, unwrapped_names
from .lora import ParsedLora, parse_lora_state_dict
from .motion_module import MOTION_HEADS, animatediff_to_diffusers, motion_adapter_config
from .sd15 import _empty, _finish
from .state_dict import fit_problems, format_keys, load_state_dict_file, load_strict, shapes_of

log = logging.getLogger(__name__)

APPEARANCE_UNET = "appearance_unet"
TCAN_UNET = "tcan_unet"
TEMPORAL_CONTROLNET = "temporal_controlnet"
LDM_CHECKPOINT = "ldm_checkpoint"
CONTROLNET = "controlnet"
MOTION_MODULE = "motion_module"
LORA = "lora"
UNKNOWN = "unknown"

# What each kind of file is, and where it goes instead; shared by the loaders' errors and doctor.
KIND_DESCRIPTIONS: dict[str, str] = {
    APPEARANCE_UNET: "a TCAN appearance (reference) UNet",
    TCAN_UNET: "a TCAN denoising UNet checkpoint (APPA LoRA and/or motion modules)",
    TEMPORAL_CONTROLNET: "a TCAN temporal ControlNet (ControlNetT)",
    LDM_CHECKPOINT: "a single-file Stable Diffusion checkpoint (LDM key names)",
    CONTROLNET: "a ControlNet without temporal layers",
    MOTION_MODULE: "an AnimateDiff motion module",
    LORA: "a LoRA file",
    UNKNOWN: "not a TCAN checkpoint",
}
KIND_NODES: dict[str, str] = {
    APPEARANCE_UNET: "choose it as appearance_unet in TCAN Load Model (models/tcan)",
    TCAN_UNET: "choose it as tcan_unet in TCAN Motion Module (models/tcan), which adds its motion modules "
               "and its APPA LoRA",
    TEMPORAL_CONTROLNET: "choose it as temporal_layers in TCAN Temporal ControlNet (models/tcan)",
    LDM_CHECKPOINT: "choose it as the checkpoint in TCAN Load Model (models/checkpoints)",
    CONTROLNET: "choose it as the ControlNet in TCAN Temporal ControlNet (models/controlnet); its temporal "
                "layers can come from the motion module",
    MOTION_MODULE: "choose it as motion_module in TCAN Motion Module (models/animatediff_models)",
    LORA: "load it with TCAN APPA LoRA (models/loras)",
    UNKNOWN: "pick a file written by TCAN training (the authors' [AppearanceEncoder]/[UNet]/[ControlNetT] "
             ".ckpt or the pack's safetensors)",
}

_UNET_ROOTS = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks.")
_LDM_CONTROLNET = ("control_model.", "input_hint_block.", "zero_convs.")
_MOTION = ".motion_modules."
_TAUMAP = ".taumap_projection_layer."


class TCANUnetParts(NamedTuple):
    """What a TCAN denoising-UNet checkpoint holds, split into the pieces the pack patches in."""

    motion_adapter: torch.nn.Module | None
    lora: ParsedLora | None
    base_mismatch: tuple[str, ...]


def detect_tcan_checkpoint(keys: Iterable[str]) -> str:
    """Classify a file from its keys: ``appearance_unet``, ``tcan_unet``, ``temporal_controlnet``, or
    ``ldm_checkpoint``, ``controlnet``, ``motion_module``, ``lora``, ``unknown`` (see ``KIND_DESCRIPTIONS``)."""
    names = unwrapped_names(keys)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in names):
        return LDM_CHECKPOINT
    motion = [k for k in names if _MOTION in k]
    if any(k.startswith(("controlnet_cond_embedding.",) + _LDM_CONTROLNET) for k in names):
        return TEMPORAL_CONTROLNET if motion else CONTROLNET
    lora = [k for k in names if is_lora_key(k)]
    spatial = [k for k in names if k.startswith(_UNET_ROOTS) and _MOTION not in k and not is_lora_key(k)]
    if lora:
        return TCAN_UNET if (motion or spatial) else LORA
    if motion and spatial:
        return TCAN_UNET
    if motion:
        # Temporal ControlNet layers live only in down blocks; a motion module always has up blocks too.
        return TEMPORAL_CONTROLNET if all(k.startswith("down_blocks.") for k in motion) else MOTION_MODULE
    if "conv_in.weight" in names and any(k.startswith("up_blocks.") for k in spatial):
        return APPEARANCE_UNET
    return UNKNOWN


def _require_kind(sd: Mapping[str, torch.Tensor], wanted: str, source: str) -> None:
    """Raise a sentence saying what the file is and which node takes it, unless it is ``wanted``."""
    kind = detect_tcan_checkpoint(sd)
    if kind == wanted:
        return
    hint = KIND_NODES[kind]
    if kind == UNKNOWN:
        hint += f"; its keys: {format_keys(sd)}"
    raise ModelFormatError(f"{source} is {KIND_DESCRIPTIONS[kind]}, not {KIND_DESCRIPTIONS[wanted]}; {hint}.")


def _read(path: str | os.PathLike, wanted: str) -> tuple[Path, dict[str, torch.Tensor]]:
    p = Path(path)
    sd = strip_module_prefix(load_state_dict_file(p), str(p))
    _require_kind(sd, wanted, str(p))
    return p, sd


def appearance_pruned_keys(unet: torch.nn.Module) -> frozenset[str]:
    """Keys of ``unet`` that the authors' appearance-encoder checkpoint lacks (``conv_norm_out``,
    ``conv_out`` and the layers ``reset_final_block()`` removes from the last transformer block)."""
    last_up = len(unet.up_blocks) - 1
    attentions = getattr(unet.up_blocks[last_up], "attentions", None)
    if not attentions:
        raise ValueError(f"the UNet's last up block ({type(unet.up_blocks[last_up]).__name__}) has no attention; "
                         "pass an SD1.5-layout UNet2DConditionModel as the appearance UNet's base.")
    final = f"up_blocks.{last_up}.attentions.{len(attentions) - 1}."
    block = final + "transformer_blocks.0."
    dropped = ("conv_norm_out.", "conv_out.", final + "proj_out.") + tuple(
        block + part for part in ("attn1.to_q.", "attn1.to_k.", "attn1.to_v.", "attn1.to_out.",
                                  "norm2.", "attn2.", "norm3.", "ff."))
    return frozenset(k for k in unet.state_dict() if k.startswith(dropped))


def load_appearance_unet(path: str | os.PathLike, like: torch.nn.Module, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a TCAN appearance (reference) UNet -> diffusers UNet2DConditionModel with ``like.config``."""
    from diffusers import UNet2DConditionModel

    if not isinstance(like, UNet2DConditionModel):
        raise ValueError(f"the appearance UNet is built like the base UNet, which must be a diffusers "
                         f"UNet2DConditionModel; got {type(like).__name__}. Pass the SD1.5 base UNet.")
    p, sd = _read(path, APPEARANCE_UNET)
    pruned = appearance_pruned_keys(like)
    missing = set(like.state_dict()) - set(sd)
    if missing and missing == pruned:
        # The authors' layout: fill the layers whose outputs the reference path never reads from the base.
        base = like.state_dict()
        sd = {**sd, **{k: base[k].detach().clone() for k in pruned}}
        log.info("%s: the authors' appearance-encoder layout; %d unused output-layer tensor(s) taken from the "
                 "base UNet", p, len(pruned))
    model = _empty(lambda: UNet2DConditionModel.from_config(like.config))
    load_strict(model, sd, "appearance UNet (built like the base UNet)", p)
    return _finish(model, dtype, device)


def _reject_learnable_taumap(sd: Mapping[str, torch.Tensor], source: str) -> None:
    taumap = [k for k in sd if _TAUMAP in k]
    if taumap:
        raise ModelFormatError(f"{source} was trained with --use_learnable_taumap ({len(taumap)} key(s) such as "
                               f"{taumap[0]}); the pack's PTM is the training-free temperature map, so these "
                               "weights cannot be used. Train stage 2 without --use_learnable_taumap.")


def _motion_adapter(sd: dict[str, torch.Tensor], source: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """The motion-module keys of a UNet checkpoint -> diffusers MotionAdapter (as the motion loader reads)."""
    from diffusers import MotionAdapter

    det = detect_motion_module(shapes_of(sd))
    require_sd15(det, "motion", source)
    if "version" not in det.details:
        raise ModelFormatError(f"{source}: its motion modules have no positional encoding ({det.format}); "
                               "TCAN's motion modules are AnimateDiff modules with positional encoding.")
    if det.format == "AnimateDiff":
        sd = animatediff_to_diffusers(sd, source)
    adapter = _empty(lambda: MotionAdapter(**motion_adapter_config(det, sd)))
    load_strict(adapter, sd, "motion modules of the TCAN UNet", source)
    log.info("%s: motion modules with %d-frame positional encoding, %s mid block", source,
             det.details["max_frames"], "with" if det.details["mid_block"] else "no")
    return _finish(adapter, dtype, device)


def _same_tensor(stored: torch.Tensor, reference: torch.Tensor) -> bool:
    return torch.equal(stored.to(device=reference.device, dtype=reference.dtype), reference)


def _compare_base(sd: dict[str, torch.Tensor], base_unet: torch.nn.Module, source: str) -> tuple[str, ...]:
    """Names of the base UNet's tensors that the file holds with other values; strict on keys and shapes."""
    reference = {k: v for k, v in base_unet.state_dict().items() if _MOTION not in k}
    problems = fit_problems(shapes_of(sd), shapes_of(reference), owner="base UNet")
    if problems:
        raise ModelFormatError(f"{source}: the UNet weights in the file do not fit the base UNet: {problems}. The "
                               "file is for another base model or is incomplete; use a TCAN UNet trained on an SD1.5 "
                               "model.")
    if any(t.is_meta for t in reference.values()):
        # A UNet sharing a host's weights (ComfyUI's MODEL) holds none between calls: nothing to compare.
        log.info("%s: base weights not compared (the base UNet's weights come from the host's MODEL)", source)
        return ()
    return tuple(sorted(k for k in sd if not _same_tensor(sd[k], reference[k])))


def load_tcan_unet(path: str | os.PathLike, base_unet: torch.nn.Module, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> TCANUnetParts:
    """Split a TCAN denoising-UNet checkpoint (stage 1 or 2) into motion adapter, APPA LoRA and base check.

    The base weights are frozen during TCAN training, so they are not loaded: the graph's base model
    is used, and the LoRA and motion modules are applied to it like any LoRA or motion module. The
    authors trained on RealisticVision rather than SD1.5, so a file's base differing from the user's
    is expected and not an error; ``base_mismatch`` names the base tensors that differ (compared in
    the base UNet's dtype) so that a node can say the result may differ from the authors'.
    """
    p, sd = _read(path, TCAN_UNET)
    source = str(p)
    motion = {k: v for k, v in sd.items() if _MOTION in k}
    lora_sd = {k: v for k, v in sd.items() if _MOTION not in k and is_lora_key(k)}
    base = {k.replace(".base_layer.", "."): v for k, v in sd.items() if _MOTION not in k and not is_lora_key(k)}
    _reject_learnable_taumap(motion, source)

    mismatch: tuple[str, ...] = ()
    if base:
        mismatch = _compare_base(base, base_unet, source)
        if mismatch:
            log.warning("%s: %d of %d base UNet tensor(s) differ from the base model in use (the file was trained "
                        "on another base, e.g. RealisticVision); its LoRA and motion modules are applied to "
                        "the base in use: %s", source, len(mismatch), len(base), format_keys(mismatch, 4))
    lora = parse_lora_state_dict(lora_sd, base_unet, source=source) if lora_sd else None
    adapter = _motion_adapter(motion, source, dtype, device) if motion else None
    log.info("%s: TCAN UNet with %s and %s", source, "APPA LoRA" if lora else "no LoRA",
             "motion modules" if adapter else "no motion modules (stage 1)")
    return TCANUnetParts(adapter, lora, mismatch)


def _temporal_block(sd: dict[str, torch.Tensor], block: int, source: str) -> torch.nn.ModuleList:
    """``{"M.<AnimateDiffTransformer3D key>": tensor}`` of one ControlNet down block -> ModuleList."""
    from diffusers.models.unets.unet_motion_model import MotionModules

    where = f"{source}: down_blocks.{block}.motion_modules"
    count = len({k.split(".", 1)[0] for k in sd})
    proj_in = sd.get("0.proj_in.weight")
    pe = sd.get("0.transformer_blocks.0.pos_embed.pe")
    if proj_in is None or pe is None or proj_in.ndim != 2 or pe.ndim != 3:
        raise ModelFormatError(f"{where}.0 lacks its proj_in weight or positional encoding (pos_embed.pe / "
                               f"pos_encoder.pe); the temporal layers are incomplete. Keys: {format_keys(sd)}")
    channels = int(proj_in.shape[1])
    if channels % MOTION_HEADS:
        raise ModelFormatError(f"{where}: width {channels} is not divisible by the {MOTION_HEADS} AnimateDiff heads.")
    layers = len({k.split(".")[2] for k in sd if k.startswith("0.transformer_blocks.")})
    modules = _empty(lambda: MotionModules(in_channels=channels, layers_per_block=count,
                                           transformer_layers_per_block=layers, num_attention_heads=MOTION_HEADS,
                                           max_seq_length=int(pe.shape[1]))).motion_modules
    load_strict(modules, sd, f"temporal layers of ControlNet down block {block}", source)
    return modules


def _misfit(controlnet: torch.nn.Module, block: int, modules: torch.nn.ModuleList) -> str | None:
    """Why ``modules`` cannot run in the ControlNet's down block ``block``; None if they fit."""
    if block >= len(controlnet.down_blocks):
        return f"the ControlNet has only {len(controlnet.down_blocks)} down blocks"
    resnets = controlnet.down_blocks[block].resnets
    width = modules[0].proj_in.in_features
    if width != resnets[0].out_channels:
        return f"temporal width {width}, ControlNet width {resnets[0].out_channels}"
    if len(modules) != len(resnets):
        return f"{len(modules)} temporal module(s) for {len(resnets)} resnet/attention layer(s)"
    return None


def load_temporal_controlnet(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu"
                             ) -> tuple[torch.nn.Module | None, dict[int, torch.nn.ModuleList]]:
    """Load a TCAN temporal ControlNet -> (diffusers ControlNetModel, {down block: ModuleList of
    AnimateDiffTransformer3D}), module M of block N running after the block's M-th resnet/attention.

    A file with only the temporal layers gives ``(None, layers)``: the frozen OpenPose ControlNet
    then comes from the controlnet folder.
    """
    from diffusers import ControlNetModel

    p, sd = _read(path, TEMPORAL_CONTROLNET)
    source = str(p)
    motion = {k: v for k, v in sd.items() if _MOTION in k}
    controlnet_sd = {k: v for k, v in sd.items() if _MOTION not in k}
    _reject_learnable_taumap(motion, source)
    outside = [k for k in motion if not re.match(r"down_blocks\.\d+\.motion_modules\.\d+\.", k)]
    if outside:
        raise ModelFormatError(f"{source}: {len(outside)} temporal key(s) outside the ControlNet's down blocks: "
                               f"{format_keys(outside)}. TCAN's temporal ControlNet has temporal layers in "
                               "down blocks only (down_blocks.2 and .3).")
    if any(".temporal_transformer." in k for k in motion):
        motion = animatediff_to_diffusers(motion, source)
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in motion.items():
        m = re.match(r"down_blocks\.(\d+)\.motion_modules\.(.+)", key)
        blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
    temporal = {i: _temporal_block(sub, i, source) for i, sub in sorted(blocks.items())}
    if sorted(temporal) != [2, 3]:
        log.warning("%s: temporal layers in down blocks %s; TCAN puts them in down blocks 2 and 3",
                    source, sorted(temporal))

    controlnet = None
    if controlnet_sd:
        det = detect_controlnet(shapes_of(controlnet_sd))
        require_sd15(det, "controlnet", source)
        if det.format != "diffusers":
            raise ModelFormatError(f"{source}: the ControlNet part has {det.format} key names; TCAN temporal "
                                   "ControlNet files use diffusers names. Save the ControlNet with diffusers names.")
        cfg = infer_controlnet_config_diffusers(shapes_of(controlnet_sd))
        controlnet = _empty(lambda: ControlNetModel.from_config(cfg))
        load_strict(controlnet, controlnet_sd, "ControlNet of the temporal ControlNet", p)
        wrong = [f"down block {i}: {why}" for i, mods in temporal.items()
                 if (why := _misfit(controlnet, i, mods)) is not None]
        if wrong:
            raise ModelFormatError(f"{source}: the temporal layers do not fit the ControlNet: {'; '.join(wrong)}.")
        controlnet = _finish(controlnet, dtype, device)
    else:
        log.info("%s holds only temporal layers; the OpenPose ControlNet comes from the controlnet folder", source)
    return controlnet, {i: _finish(mods, dtype, device) for i, mods in temporal.items()}
