"""SD1.5 base model: a single-file LDM checkpoint or a diffusers folder -> UNet, VAE, CLIP text.

Works offline: the layer widths are read from the file's tensor shapes and the rest of each
model's configuration comes from the SD1.5 configs shipped in ``configs/``. The key conversion
from LDM names is diffusers' own; loading is strict and names every missing or unexpected key.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .detect import CLIP_PREFIXES, SD15, UNET, VAE, Detection, detect_checkpoint, require_sd15
from .errors import ModelFormatError
from .state_dict import (
    LazyTensors,
    Shapes,
    assign_streamed,
    fit_problems,
    load_state_dict_file,
    load_strict,
    read_shapes,
    shapes_of,
)

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")


def shipped_config(name: str) -> dict:
    """One of the SD1.5 configs shipped with the pack (``sd15_unet``, ``sd15_vae``, ...)."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


@dataclass
class SD15Components:
    """The three SD1.5 models the pack uses, with where they came from."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    source: str
    detection: Detection
    configs: dict = field(default_factory=dict)


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def infer_unet_config(shapes: Shapes, prefix: str = "") -> dict:
    """UNet2DConditionModel config for LDM UNet keys under ``prefix``, widths read from shapes."""
    cfg = shipped_config("sd15_unet")
    p = re.escape(prefix)
    conv_in = shapes[prefix + "input_blocks.0.0.weight"]
    n_input = _count(shapes, rf"{p}input_blocks\.(\d+)\.")
    n_down = _count(shapes, rf"{p}input_blocks\.(\d+)\.0\.op\.weight")
    levels = n_down + 1
    lpb = (n_input - 1 - n_down) // levels
    channels, attn, depth = [], [], 1
    for level in range(levels):
        first = 1 + level * (lpb + 1)
        channels.append(int(shapes[f"{prefix}input_blocks.{first}.0.out_layers.3.weight"][0]))
        has_attn = f"{prefix}input_blocks.{first}.1.proj_in.weight" in shapes
        attn.append(has_attn)
        if has_attn:
            depth = _count(shapes, rf"{p}input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
    cfg.update(
        in_channels=int(conv_in[1]),
        out_channels=int(shapes[prefix + "out.2.weight"][0]),
        block_out_channels=channels,
        layers_per_block=lpb,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        transformer_layers_per_block=depth,
    )
    ctx = next((s[1] for k, s in shapes.items() if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    if ctx is not None:
        cfg["cross_attention_dim"] = int(ctx)
    return cfg


def infer_vae_config(shapes: Shapes, prefix: str = "") -> dict:
    """AutoencoderKL config for LDM VAE keys under ``prefix``."""
    cfg = shipped_config("sd15_vae")
    p = re.escape(prefix)
    levels = _count(shapes, rf"{p}encoder\.down\.(\d+)\.")
    channels = [int(shapes[f"{prefix}encoder.down.{i}.block.0.conv1.weight"][0]) for i in range(levels)]
    cfg.update(
        in_channels=int(shapes[prefix + "encoder.conv_in.weight"][1]),
        out_channels=int(shapes[prefix + "decoder.conv_out.weight"][0]),
        latent_channels=int(shapes[prefix + "post_quant_conv.weight"][0]),
        block_out_channels=channels,
        layers_per_block=_count(shapes, rf"{p}encoder\.down\.0\.block\.(\d+)\."),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return cfg


def infer_text_config(shapes: Shapes, prefix: str = "text_model."):
    """CLIPTextConfig for HF CLIP text-model keys under ``prefix`` (SD1.5: ViT-L/14 text tower)."""
    from transformers import CLIPTextConfig

    cfg = shipped_config("sd15_text_encoder")
    vocab, hidden = shapes[prefix + "embeddings.token_embedding.weight"]
    cfg.update(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]),
        num_hidden_layers=_count(shapes, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."),
        max_position_embeddings=int(shapes[prefix + "embeddings.position_embedding.weight"][0]),
        num_attention_heads=max(int(hidden) // 64, 1),
        projection_dim=int(hidden),
    )
    return CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})


def _empty(build):
    """Build a module with parameters on the meta device (buffers real); the file fills them."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _untouched(source: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of ``source`` whose tensors the conversion did not carry over (shared storage = used)."""
    used = {t.untyped_storage().data_ptr() for t in converted.values()}
    return [k for k, t in source.items() if t.untyped_storage().data_ptr() not in used]


def _reject_unconverted(component: str, source: Mapping[str, torch.Tensor], converted, path) -> None:
    left = _untouched(source, converted)
    if left:
        shown = ", ".join(sorted(left)[:8]) + (f" ... and {len(left) - 8} more" if len(left) > 8 else "")
        raise ModelFormatError(f"{path}: {len(left)} unexpected {component} key(s) that no SD1.5 layer takes: {shown}")


def _clip_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text weights with ``text_model.`` names, as checkpoints and transformers 4 write them."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def _fit_clip_keys(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Match ``text_model.``-prefixed names to the installed transformers' CLIPTextModel layout.

    transformers 5 dropped the ``text_model.`` level; older checkpoints also carry a
    ``position_ids`` buffer that transformers now recomputes, so it is dropped when not expected.
    """
    expected = set(model.state_dict())
    prefixed = any(k.startswith("text_model.") for k in expected)
    out = {(k if prefixed else k.removeprefix("text_model.")): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if not (k.endswith("position_ids") and k not in expected)}


def _read_cast(lazy: Mapping[str, torch.Tensor], wanted, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """The tensors of ``lazy`` whose key ``wanted(key)`` accepts, each cast as it is read (one extra tensor at most)."""
    out = {}
    for key in lazy:
        if wanted(key):
            tensor = lazy[key]
            out[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    return out


def _finish(module: torch.nn.Module, dtype: torch.dtype, device) -> torch.nn.Module:
    # nn.Module.to directly: diffusers' override only adds a warning about fp32-pinned modules,
    # which none of these models has.
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


def _check_sd15(det: Detection, path) -> None:
    require_sd15(det, "checkpoint", str(path))
    in_ch = det.details.get("in_channels", 4)
    if in_ch != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(in_ch, f"a {in_ch}-channel")
        raise ModelFormatError(f"{path} is {kind} SD1.5 checkpoint (UNet input has {in_ch} channels); "
                               "TCAN needs a regular text-to-image SD1.5 checkpoint with 4 input channels.")
    for part in ("vae", "text_encoder"):
        if det.details.get(part) == "missing":
            raise ModelFormatError(f"{path} has no {part.replace('_', ' ')} weights; TCAN needs a full SD1.5 "
                                   "checkpoint with UNet, VAE and text encoder (e.g. v1-5-pruned-emaonly).")


def ldm_unet_layout(shapes: Shapes, prefix: str = UNET, source: str = "checkpoint") -> tuple[dict, dict[str, str]]:
    """(diffusers UNet config, diffusers key -> LDM key) for the LDM UNet keys under ``prefix``, from shapes only.

    diffusers' own single-file conversion is run on empty (meta) tensors, so no weight is read or
    copied; LDM keys no diffusers layer takes are an error that names them.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = infer_unet_config(shapes, prefix)
    tokens = {UNET + k[len(prefix):]: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(prefix)}
    converted = convert_ldm_unet_checkpoint(tokens, cfg)
    by_id = {id(t): prefix + k[len(UNET):] for k, t in tokens.items()}
    key_map = {k: by_id[id(t)] for k, t in converted.items() if id(t) in by_id}
    if len(key_map) != len(converted):
        raise ModelFormatError(f"{source}: the UNet conversion changed tensors it should only rename: "
                               f"{', '.join(sorted(set(converted) - set(key_map))[:8])}")
    left = sorted(set(by_id.values()) - set(key_map.values()))
    if left:
        shown = ", ".join(left[:8]) + (f" ... and {len(left) - 8} more" if len(left) > 8 else "")
        raise ModelFormatError(f"{source}: {len(left)} unexpected UNet key(s) that no SD1.5 layer takes: {shown}")
    return cfg, key_map


def empty_unet(config: Mapping) -> torch.nn.Module:
    """A diffusers UNet2DConditionModel for ``config`` with its parameters on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    return _empty(lambda: UNet2DConditionModel.from_config(dict(config))).eval().requires_grad_(False)


def load_sd15_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu", unet_only: bool = False) -> SD15Components:
    """An SD1.5 ``.safetensors``/``.ckpt`` with LDM key names -> diffusers UNet, VAE and CLIP text model.

    ``unet_only`` skips the VAE and text encoder (left None): inside ComfyUI they come from its
    own checkpoint loader, so the pack does not hold a second copy.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel

    # Tensors are read one at a time and cast on the way in, so loading never holds a second copy
    # of a model (nor the parts unet_only leaves out). Every check runs on the shapes first.
    lazy = LazyTensors(path)
    shapes = lazy.shapes
    det, unet_cfg = check_sd15_single_file(shapes, path, unet_only)
    _, key_map = ldm_unet_layout(shapes, UNET, str(path))
    unet = empty_unet(unet_cfg)
    assign_streamed(unet, lazy, key_map, "SD1.5 UNet", path, dtype=dtype, device=device)
    if unet_only:
        return SD15Components(unet=_finish(unet, dtype, device), vae=None, text_encoder=None, source=str(path),
                              detection=det, configs={"unet": unet_cfg})

    vae_cfg = infer_vae_config(shapes, VAE)
    vae_src = _read_cast(lazy, lambda k: k.startswith(VAE) and ".loss." not in k, dtype, device)
    vae_sd = convert_ldm_vae_checkpoint(vae_src, vae_cfg)
    _reject_unconverted("VAE", vae_src, vae_sd, path)
    vae = _empty(lambda: AutoencoderKL.from_config(vae_cfg))
    load_strict(vae, vae_sd, "SD1.5 VAE", path)
    del vae_src, vae_sd

    text_src = _read_cast(lazy, lambda k: k.startswith("cond_stage_model."), dtype, device)
    text_sd = _clip_keys(convert_ldm_clip_checkpoint(text_src))
    del text_src
    text = _empty(lambda: CLIPTextModel(infer_text_config(shapes_of(text_sd))))
    load_strict(text, _fit_clip_keys(text_sd, text), "SD1.5 CLIP text encoder", path)

    return SD15Components(
        unet=_finish(unet, dtype, device), vae=_finish(vae, dtype, device), text_encoder=_finish(text, dtype, device),
        source=str(path), detection=det, configs={"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text.config.to_dict()},
    )


_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.bin", "pytorch_model.fp16.bin",
)


def load_diffusers_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of one diffusers/transformers model folder (single file or sharded index)."""
    folder = Path(folder)
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_state_dict_file(folder / shard))
        return out
    raise FileNotFoundError(f"no weights found in {folder}; expected one of: {', '.join(_WEIGHT_NAMES[:4])} "
                            "(or a sharded *.index.json)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a diffusers SD1.5 folder has unet/, vae/ and text_encoder/ "
                                "sub-folders, each with a config.json.")
    return json.loads(path.read_text())


def load_sd15_diffusers(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", unet_only: bool = False) -> SD15Components:
    """An SD1.5 diffusers pipeline folder (unet/, vae/, text_encoder/) -> the three models (or the UNet only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    det = check_sd15_folder(folder, unet_only)
    unet_cfg = _read_json(folder / "unet" / "config.json")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    text_cfg = _read_json(folder / "text_encoder" / "config.json")
    unet_sd = load_diffusers_weights(folder / "unet")

    unet = _empty(lambda: UNet2DConditionModel.from_config(unet_cfg))
    load_strict(unet, unet_sd, "SD1.5 UNet", folder / "unet")
    if unet_only:
        return SD15Components(unet=_finish(unet, dtype, device), vae=None, text_encoder=None, source=str(folder),
                              detection=det, configs={"unet": dict(unet_cfg)})
    vae = _empty(lambda: AutoencoderKL.from_config(vae_cfg))
    load_strict(vae, load_diffusers_weights(folder / "vae"), "SD1.5 VAE", folder / "vae")
    text = _empty(lambda: CLIPTextModel(CLIPTextConfig.from_dict(text_cfg)))
    text_sd = _clip_keys(load_diffusers_weights(folder / "text_encoder"))
    load_strict(text, _fit_clip_keys(text_sd, text), "SD1.5 CLIP text encoder", folder / "text_encoder")
    return SD15Components(
        unet=_finish(unet, dtype, device), vae=_finish(vae, dtype, device), text_encoder=_finish(text, dtype, device),
        source=str(folder), detection=det,
        configs={"unet": dict(unet_cfg), "vae": dict(vae_cfg), "text_encoder": copy.deepcopy(text_cfg)},
    )


def load_sd15(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", unet_only: bool = False) -> SD15Components:
    """Load an SD1.5 base model from a single file or a diffusers folder, recognised by content."""
    p = Path(path)
    if p.is_dir():
        return load_sd15_diffusers(p, dtype, device, unet_only)
    return load_sd15_single_file(p, dtype, device, unet_only)


def _infer(what: str, path, infer, *args):
    """Run a config inference that reads fixed keys; a missing one means an incomplete file."""
    try:
        return infer(*args)
    except KeyError as exc:
        raise ModelFormatError(f"{path} is incomplete: the {what} key {exc.args[0]!r} is missing, so the model's "
                               "layout cannot be read. The file was pruned or truncated differently from a "
                               "standard SD1.5 checkpoint: download it again or use a complete one "
                               "(e.g. v1-5-pruned-emaonly.safetensors).") from None


def _meta_shapes(build) -> Shapes:
    """Key -> shape of a module built with empty (meta) parameters: what a file must fill."""
    return shapes_of(_empty(build).state_dict())


def _require_fit(found: Shapes, expected: Shapes, what: str, path, unexpected: bool = True) -> None:
    """The clear error :func:`load_strict` would give, raised from shapes alone (before any conversion)."""
    if not unexpected:
        found = {k: s for k, s in found.items() if k in expected}
    problems = fit_problems(found, expected, "model")
    if not problems:
        return
    incomplete = any(k not in found for k in expected)
    raise ModelFormatError(f"{path}: the weights do not fit the {what}: {problems}."
                           + (" The file is incomplete (pruned or truncated): download it again or use a "
                              "complete SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors)." if incomplete else ""))


def _clip_file_keys(shapes: Shapes) -> Shapes:
    """The text encoder's keys of an LDM checkpoint as ``text_model.*`` (both LDM spellings)."""
    out = {}
    for key, shape in shapes.items():
        for prefix in CLIP_PREFIXES:
            if key.startswith(prefix):
                out["text_model." + key[len(prefix):].removeprefix("text_model.")] = shape
                break
    return out


def check_sd15_single_file(shapes: Shapes, path, unet_only: bool = False) -> tuple[Detection, dict]:
    """Everything the single-file loader checks before it converts, from ``{key: shape}`` alone -> (detection,
    UNet config); raises the loader's own error otherwise. TCAN Model Check and ``doctor`` call it too."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .ldm_keys import clip_to_ldm, unet_to_ldm, vae_to_ldm

    det = detect_checkpoint(shapes)
    _check_sd15(det, path)
    unet_cfg = _infer("UNet", path, infer_unet_config, shapes, UNET)
    expected = _meta_shapes(lambda: UNet2DConditionModel.from_config(unet_cfg))
    expected = shapes_of(unet_to_ldm({k: torch.empty(s, device="meta") for k, s in expected.items()}, unet_cfg))
    _require_fit({k: s for k, s in shapes.items() if k.startswith(UNET)}, expected, "SD1.5 UNet", path)
    if unet_only:
        return det, unet_cfg
    # The VAE and text encoder are checked for missing keys only: their converters also accept other
    # layouts (linear VAE attention, older CLIP names), which the strict load after conversion checks.
    vae_cfg = _infer("VAE", path, infer_vae_config, shapes, VAE)
    vae = _meta_shapes(lambda: AutoencoderKL.from_config(vae_cfg))
    vae = shapes_of(vae_to_ldm({k: torch.empty(s, device="meta") for k, s in vae.items()}, vae_cfg))
    found = {k: s for k, s in shapes.items() if k.startswith(VAE) and ".loss." not in k}
    _require_fit(found, {k: found.get(k, s) for k, s in vae.items()}, "SD1.5 VAE", path, unexpected=False)
    text_found = _clip_file_keys(shapes)
    text_cfg = _infer("CLIP text encoder", path, infer_text_config, text_found)
    text = _meta_shapes(lambda: CLIPTextModel(text_cfg))
    text = {k: s for k, s in _clip_file_keys(shapes_of(clip_to_ldm(
        {k: torch.empty(s, device="meta") for k, s in text.items()}))).items() if not k.endswith("position_ids")}
    _require_fit(text_found, {k: text_found.get(k, s) for k, s in text.items()}, "SD1.5 CLIP text encoder", path,
                 unexpected=False)
    return det, unet_cfg


def diffusers_weight_shapes(folder: str | os.PathLike) -> Shapes:
    """Key -> shape of one diffusers model folder's weights, read as :func:`load_diffusers_weights` reads them."""
    folder = Path(folder)
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return read_shapes(folder / name)
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        out: Shapes = {}
        for shard in sorted(set(json.loads(indexes[0].read_text())["weight_map"].values())):
            out.update(read_shapes(folder / shard))
        return out
    raise FileNotFoundError(f"no weights found in {folder}; expected one of: {', '.join(_WEIGHT_NAMES[:4])} "
                            "(or a sharded *.index.json)")


def check_sd15_folder(folder: str | os.PathLike, unet_only: bool = False) -> Detection:
    """Everything the diffusers-folder loader checks, from configs and tensor shapes alone -> detection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    det = detect_sd15_source(folder)
    _check_sd15(det, folder)
    parts = [("unet", "SD1.5 UNet", lambda cfg: UNet2DConditionModel.from_config(cfg))]
    if not unet_only:
        parts += [("vae", "SD1.5 VAE", lambda cfg: AutoencoderKL.from_config(cfg)),
                  ("text_encoder", "SD1.5 CLIP text encoder",
                   lambda cfg: CLIPTextModel(CLIPTextConfig.from_dict(cfg)))]
    for sub, what, build in parts:
        cfg = _read_json(folder / sub / "config.json")
        found = diffusers_weight_shapes(folder / sub)
        expected = _meta_shapes(lambda: build(cfg))
        if sub == "text_encoder":
            found = {k: s for k, s in _fit_clip_shapes(found, expected).items()}
        _require_fit(found, expected, what, folder / sub)
    return det


def _fit_clip_shapes(found: Shapes, expected: Shapes) -> Shapes:
    """:func:`_fit_clip_keys` for shapes: the file's CLIP names in the installed transformers' layout."""
    prefixed = any(k.startswith("text_model.") for k in expected)
    named = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in found.items()}
    out = {(k if prefixed else k.removeprefix("text_model.")): v for k, v in named.items()}
    return {k: v for k, v in out.items() if not (k.endswith("position_ids") and k not in expected)}


def check_sd15(path: str | os.PathLike) -> Detection:
    """What :func:`load_sd15` checks before it reads any tensor, for a file or a diffusers folder -> detection."""
    p = Path(path)
    if p.is_dir():
        return check_sd15_folder(p)
    return check_sd15_single_file(read_shapes(p), p)[0]


def detect_sd15_source(path: str | os.PathLike) -> Detection:
    """Classify a checkpoint file or diffusers folder without loading its tensors."""
    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        pipeline = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
        if "XL" in pipeline or (p / "text_encoder_2").is_dir():
            return Detection("checkpoint", "SDXL", "diffusers folder")
        unet_cfg = json.loads((p / "unet" / "config.json").read_text()) if (p / "unet" / "config.json").is_file() else {}
        if not unet_cfg:
            return Detection("other", "unknown", "a folder without unet/config.json")
        text_json = p / "text_encoder" / "config.json"
        text_width = json.loads(text_json.read_text()).get("hidden_size") if text_json.is_file() else None
        ctx = unet_cfg.get("cross_attention_dim")
        base = ("SDXL" if ctx == 2048 else
                "SD2.x" if ctx == 1024 or text_width == 1024 or unet_cfg.get("use_linear_projection") else SD15)
        return Detection("checkpoint", base, "diffusers folder", {"in_channels": unet_cfg.get("in_channels", 4)})
    return detect_checkpoint(read_shapes(p))
