"""APPA LoRA files (peft, diffusers or kohya key names) -> an exactly reversible patch on the UNet.

LoRA (Hu et al. 2021): a layer's weight W [out, in] becomes W' = W + strength * (alpha / r) * B A
with A = down [r, in] and B = up [out, r]. TCAN's APPA trains rank 16, alpha 16 on to_q, to_k, to_v
of attn1 and attn2 in every spatial transformer block (DESIGN.md section 6).

Key layouts, recognised from the keys (never from the file name):

- peft: ``<path>.lora_A.weight`` / ``<path>.lora_B.weight``, or with an adapter name
  (``lora_A.default.weight``), optionally behind ``module.`` (DDP), ``base_model.model.`` (peft)
  or ``unet.`` (diffusers pipelines); alpha from ``<path>.alpha`` or the safetensors
  ``lora_adapter_metadata`` that diffusers writes, else alpha = r;
- diffusers: ``unet.<path>.lora.down.weight`` / ``.lora.up.weight`` (also ``lora_linear_layer``),
  and the older attention-processor layout ``<attn>.processor.to_q_lora.down.weight``;
- kohya: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, where ``<name>``
  is the LDM module path (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``) or the diffusers
  one (``down_blocks_1_attentions_0_...``, as sd-scripts writes for SD1.x) with ``_`` for ``.``.
  The table of names is derived from the UNet itself, so it follows the UNet's config.

Text-encoder keys (``lora_te*_``, ``text_encoder.``) are reported and ignored: APPA patches the UNet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, NamedTuple

import torch

from .ldm_keys import unet_to_ldm
from ..attention.unet_map import ROLE_SPATIAL_CROSS, ROLE_SPATIAL_SELF, unet_map
from .errors import ModelFormatError
from .keys import WRAPPER_PREFIX
from .state_dict import format_keys, load_state_dict_file

log = logging.getLogger(__name__)

LAYOUTS = ("peft", "diffusers", "kohya")
APPA_ATTENTIONS = ("attn1", "attn2")
APPA_PROJECTIONS = ("to_q", "to_k", "to_v")
APPA_RANK = 16
APPA_ALPHA = 16.0

_WRAPPERS = (WRAPPER_PREFIX, "base_model.model.", "unet.")
_TEXT_ENCODER = re.compile(r"^(text_encoder(_\d+)?|text_model)\.")
_KOHYA = re.compile(r"^lora_(?P<net>unet|te\d*)_(?P<m>[^.]+)\.(?:lora_(?P<p>down|up)\.weight|alpha)$")
_PEFT = re.compile(r"^(?P<m>.+)\.lora_(?P<p>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_DIFFUSERS = re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.(?P<p>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")
_METADATA_KEY = "lora_adapter_metadata"


class LoraWeights(NamedTuple):
    """One layer's LoRA factors: down A [r, in(, kh, kw)], up B [out, r(, 1, 1)], alpha (None: alpha = r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r (Hu et al. 2021, section 4.1); 1 when the file gives no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, device: str | torch.device | None = None, strength: float = 1.0) -> torch.Tensor:
        """strength * (alpha / r) * B A in float32, shaped [out, in(, kh, kw)] (LoRA, Hu et al. 2021, eq. 3).

        The two scalars are multiplied first and the product scaled once, as ComfyUI's LoRA loader
        does, so the same file and strength give bit-identical float32 weights on either path.
        """
        down = self.down.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32)
        product = up.reshape(up.shape[0], self.rank) @ down.reshape(self.rank, -1)
        return (product * (strength * self.scale)).reshape(up.shape[0], *down.shape[1:])


@dataclass(frozen=True)
class AppaCoverage:
    """Which APPA layers (to_q/to_k/to_v of attn1 and attn2 in spatial transformer blocks) a LoRA patches."""

    covered: tuple[str, ...]
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]

    @property
    def complete(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        """One sentence for logs and the node's report."""
        total = len(self.covered) + len(self.missing)
        parts = [f"patches {len(self.covered)} of {total} APPA layers (to_q/to_k/to_v of attn1 and attn2 "
                 "in the spatial transformer blocks)"]
        if self.missing:
            parts.append(f"{len(self.missing)} APPA layer(s) left unpatched: {format_keys(self.missing, 4)}")
        if self.extra:
            parts.append(f"also patches {len(self.extra)} other layer(s): {format_keys(self.extra, 4)}")
        ranks = "/".join(map(str, self.ranks))
        alphas = "/".join(f"{a:g}" for a in self.alphas)
        parts.append(f"rank {ranks}, alpha {alphas} (TCAN's APPA: rank {APPA_RANK}, alpha {APPA_ALPHA:g})")
        return "; ".join(parts)


@dataclass(frozen=True, eq=False)
class ParsedLora:
    """A LoRA file's UNet layers: diffusers module path -> (down A, up B, alpha), with its layout."""

    layout: str
    weights: Mapping[str, LoraWeights]
    source: str
    ignored_keys: tuple[str, ...]
    coverage: AppaCoverage

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """A parsed LoRA at a strength: W' = W + strength * (alpha / r) * B A on each layer (Hu et al. 2021)."""

    lora: ParsedLora
    strength: float = 1.0

    def __post_init__(self) -> None:
        strength = float(self.strength)
        if not math.isfinite(strength):
            raise ValueError(f"LoRA strength must be a finite number, got {self.strength!r}; "
                             "use 0 to turn the LoRA off or 1 for its trained effect.")
        object.__setattr__(self, "strength", strength)

    def with_strength(self, strength: float) -> LoraPatch:
        """The same LoRA (tensors shared) at another strength."""
        return LoraPatch(self.lora, strength)

    @contextmanager
    def applied(self, unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Add strength * (alpha / r) * B A to each target weight for the block, then restore the
        exact original weights (also when the block raises); strength 0 leaves the UNet untouched."""
        if self.strength == 0.0:
            yield unet
            return
        layers = _check_fit(self.lora.weights, unet, self.lora.source)
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for path, lora in self.lora.weights.items():
                    weight = layers[path].weight
                    saved[path] = weight.detach().clone()
                    delta = lora.delta(weight.device, self.strength).reshape(weight.shape)
                    weight.copy_(weight.to(torch.float32) + delta)
            yield unet
        finally:
            with torch.no_grad():
                for path, original in saved.items():
                    layers[path].weight.copy_(original)


class _Key(NamedTuple):
    layout: str | None
    module: str
    part: str
    adapter: str | None
    text_encoder: bool


def _strip_wrappers(key: str) -> str:
    """Drop the ``module.`` / ``base_model.model.`` / ``unet.`` prefixes that trainers add, in any order."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _classify(key: str) -> _Key | None:
    """Layout, module name and part (down/up/alpha) of one key; None if it is no LoRA key."""
    key = _strip_wrappers(key)
    if m := _KOHYA.match(key):
        return _Key("kohya", m["m"], m["p"] or "alpha", None, m["net"] != "unet")
    te = bool(_TEXT_ENCODER.match(key))
    if m := _PEFT.match(key):
        return _Key("peft", m["m"], "down" if m["p"] == "A" else "up", m["adapter"], te)
    if m := _DIFFUSERS.match(key):
        return _Key("diffusers", m["m"], m["p"], None, te)
    if m := _PROCESSOR.match(key):
        proj = m["proj"] + (".0" if m["proj"] == "to_out" else "")
        return _Key("diffusers", f"{m['attn']}.{proj}", m["p"], None, te)
    if m := _ALPHA.match(key):
        return _Key(None, m["m"], "alpha", None, te)
    return None


def detect_lora_layout(keys: Iterable[str], source: str = "LoRA file") -> str:
    """'peft', 'diffusers' or 'kohya' from a LoRA file's keys; ModelFormatError if none or several."""
    keys = list(keys)
    examples: dict[str, str] = {}
    for key in keys:
        c = _classify(key)
        if c is not None and c.layout is not None:
            examples.setdefault(c.layout, key)
    if not examples:
        raise ModelFormatError(
            f"{source} holds no LoRA weights: none of its {len(keys)} key(s) is a peft (lora_A/lora_B), "
            f"diffusers (lora.down/lora.up) or kohya (lora_unet_*.lora_down) LoRA key; its keys: "
            f"{format_keys(keys)}. If it is a checkpoint, ControlNet or motion module, load it with that node; "
            "otherwise pick an APPA/LoRA file from the loras folder.")
    if len(examples) > 1:
        shown = "; ".join(f"{layout}: {key}" for layout, key in examples.items())
        raise ModelFormatError(f"{source} mixes LoRA key layouts ({shown}); a LoRA file uses one layout. "
                               "Save the LoRA again from one training tool.")
    return next(iter(examples))


def _patchable_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> Linear / Conv2d layer of the UNet (the layers a LoRA can patch)."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def kohya_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """kohya module name (``lora_unet_`` + LDM or diffusers path with ``_``) -> diffusers module path."""
    table: dict[str, str] = {}
    for name, module in _patchable_layers(unet).items():
        table["lora_unet_" + name.replace(".", "_")] = name
        try:
            (ldm_key,) = unet_to_ldm({name + ".weight": module.weight}, unet.config)
        except KeyError:
            # Layers the LDM UNet does not have (motion modules) keep only their diffusers name.
            continue
        ldm = ldm_key.removeprefix("model.diffusion_model.").removesuffix(".weight")
        table["lora_unet_" + ldm.replace(".", "_")] = name
    return table


def appa_targets(unet: torch.nn.Module) -> list[str]:
    """Module paths of the APPA layers: to_q, to_k, to_v of attn1 and attn2 in every spatial
    transformer block (Transformer2DModel), never motion modules / temporal layers (DESIGN.md section 6)."""
    spatial = (ROLE_SPATIAL_SELF, ROLE_SPATIAL_CROSS)
    targets = [f"{site.path}.{proj}" for site in unet_map(unet) if site.role in spatial
               and site.path.rsplit(".", 1)[-1] in APPA_ATTENTIONS for proj in APPA_PROJECTIONS]
    if not targets:
        raise ValueError(f"{type(unet).__name__} has no spatial transformer blocks, so APPA has nothing to "
                         "patch; pass the denoising UNet (a diffusers UNet2DConditionModel or UNetMotionModel).")
    return targets


def appa_coverage(weights: Mapping[str, LoraWeights], unet: torch.nn.Module) -> AppaCoverage:
    """Which of the UNet's APPA layers ``weights`` patches, which it misses, what else it patches."""
    targets = appa_targets(unet)
    wanted = set(targets)
    return AppaCoverage(
        covered=tuple(t for t in targets if t in weights),
        missing=tuple(t for t in targets if t not in weights),
        extra=tuple(sorted(p for p in weights if p not in wanted)),
        ranks=tuple(sorted({w.rank for w in weights.values()})),
        alphas=tuple(sorted({float(w.rank if w.alpha is None else w.alpha) for w in weights.values()})),
    )


def _trailing_ones_dropped(shape: Iterable[int]) -> tuple[int, ...]:
    shape = list(shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _misfit(lora: LoraWeights, weight_shape: torch.Size) -> str | None:
    """Why A and B cannot patch a weight of ``weight_shape``; None if they fit."""
    down, up = tuple(lora.down.shape), tuple(lora.up.shape)
    what = f"A (down) {list(down)}, B (up) {list(up)}, layer weight {list(weight_shape)}"
    if len(down) < 2 or len(up) < 2 or up[1] != down[0] or any(d != 1 for d in up[2:]):
        return f"{what}: B must be [out, r] and A [r, in] with the same rank r"
    if _trailing_ones_dropped((up[0], *down[1:])) != _trailing_ones_dropped(weight_shape):
        return f"{what}: B A would be {[up[0], *down[1:]]}"
    return None


def _check_fit(weights: Mapping[str, LoraWeights], unet: torch.nn.Module, source: str) -> dict[str, torch.nn.Module]:
    """The UNet layers ``weights`` patches; ModelFormatError naming absent layers and shape mismatches."""
    layers = _patchable_layers(unet)
    absent = [path for path in weights if path not in layers]
    wrong = [f"{path} ({why})" for path, lora in weights.items() if path in layers
             and (why := _misfit(lora, layers[path].weight.shape)) is not None]
    if absent or wrong:
        parts = []
        if absent:
            parts.append(f"{len(absent)} layer(s) the UNet does not have: {format_keys(absent)}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es): {format_keys(wrong, 3)}")
        raise ModelFormatError(f"{source}: the LoRA does not fit this UNet: " + "; ".join(parts)
                               + ". The LoRA is probably for another base model than this SD1.5 UNet; use a "
                               "LoRA trained on SD1.5 (TCAN's APPA LoRA).")
    return layers


def _metadata_alphas(metadata: Mapping[str, str] | None, source: str) -> tuple[float | None, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) from diffusers' ``lora_adapter_metadata`` (peft config)."""
    raw = (metadata or {}).get(_METADATA_KEY)
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{source}: its '{_METADATA_KEY}' metadata is not JSON ({exc}); "
                               "save the LoRA again.") from exc
    for prefix in ("", "unet."):
        if prefix + "lora_alpha" in config:
            pattern = {str(k): float(v) for k, v in (config.get(prefix + "alpha_pattern") or {}).items()}
            return float(config[prefix + "lora_alpha"]), pattern, bool(config.get(prefix + "use_rslora"))
    return None, {}, False


def _peft_alpha(path: str, rank: int, metadata: tuple[float | None, dict[str, float], bool]) -> float | None:
    """A layer's alpha from the peft config (alpha_pattern matched as peft does); rsLoRA's alpha /
    sqrt(r) scale is turned into the equivalent alpha for alpha / r."""
    alpha, pattern, rslora = metadata
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            alpha = value
            break
    if alpha is None:
        return None
    return alpha * math.sqrt(rank) if rslora else alpha


def _alpha_value(tensor: torch.Tensor, key: str, source: str) -> float:
    if tensor.numel() != 1 or not torch.isfinite(tensor).all():
        raise ModelFormatError(f"{source}: {key} must be one finite number, got a tensor of shape "
                               f"{list(tensor.shape)} ({tensor.flatten()[:4].tolist()}); the file is corrupt.")
    return float(tensor.item())


def parse_lora_state_dict(sd: Mapping[str, torch.Tensor], unet: torch.nn.Module, source: str = "LoRA state dict",
                          metadata: Mapping[str, str] | None = None) -> ParsedLora:
    """A LoRA state dict in peft, diffusers or kohya layout -> {UNet module path: (A, B, alpha)},
    checked against ``unet`` (every key must land on a layer whose weight has B A's shape)."""
    layout = detect_lora_layout(sd, source)
    classified = {key: _classify(key) for key in sd}
    unknown = [key for key, c in classified.items() if c is None]
    if unknown:
        raise ModelFormatError(f"{source}: {len(unknown)} key(s) are not {layout} LoRA weights: {format_keys(unknown)}. "
                               "Only LoRA factors (A/B or down/up, optional alpha) are read; DoRA, LoHa, LoKr "
                               "and full weights are not.")
    ignored = tuple(sorted(key for key, c in classified.items() if c.text_encoder))
    if ignored:
        log.info("%s: ignored %d text-encoder LoRA key(s) (APPA patches the UNet only): %s",
                 source, len(ignored), format_keys(ignored, 3))
    adapters = sorted({c.adapter for c in classified.values() if c.adapter is not None})
    if len(adapters) > 1:
        raise ModelFormatError(f"{source} holds several peft adapters ({', '.join(adapters)}); save one "
                               "adapter per file.")

    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, c in classified.items():
        if c.text_encoder:
            continue
        slot = groups.setdefault(c.module, {})
        if c.part in slot:
            raise ModelFormatError(f"{source}: {slot[c.part][0]} and {key} both give the {c.part} factor of "
                                   f"{c.module}; the file holds the layer twice.")
        slot[c.part] = (key, sd[key])
    if not groups:
        raise ModelFormatError(f"{source} holds only text-encoder LoRA keys ({format_keys(ignored, 3)}); APPA "
                               "patches the UNet, so this LoRA would change nothing. Use a LoRA with UNet layers.")

    if layout == "kohya":
        names = kohya_module_names(unet)
        unmatched = sorted(parts[min(parts)][0] for module, parts in groups.items()
                           if "lora_unet_" + module not in names)
        if unmatched:
            raise ModelFormatError(f"{source}: {len(unmatched)} kohya key(s) match no layer of this UNet: "
                                   f"{format_keys(unmatched)}. The LoRA is probably for another base model "
                                   "(SDXL, SD2) than SD1.5.")
        paths = {module: names["lora_unet_" + module] for module in groups}
    else:
        paths = {module: module for module in groups}

    incomplete = sorted(module for module, parts in groups.items() if not {"down", "up"} <= set(parts))
    if incomplete:
        shown = [f"{m} (has {', '.join(sorted(groups[m]))})" for m in incomplete]
        raise ModelFormatError(f"{source}: {len(incomplete)} layer(s) lack their A (down) or B (up) factor: "
                               f"{format_keys(shown, 4)}. The file is incomplete; save the LoRA again.")

    peft_metadata = _metadata_alphas(metadata, source) if layout == "peft" else (None, {}, False)
    weights: dict[str, LoraWeights] = {}
    for module, parts in groups.items():
        path = paths[module]
        down, up = parts["down"][1], parts["up"][1]
        for key, tensor in (parts["down"], parts["up"]):
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ModelFormatError(f"{source}: {key} ({tensor.dtype}) holds NaN/inf or is not floating "
                                       "point; the file is corrupt or its training diverged.")
        if "alpha" in parts:
            alpha = _alpha_value(parts["alpha"][1], parts["alpha"][0], source)
        else:
            alpha = _peft_alpha(path, int(down.shape[0]), peft_metadata)
        weights[path] = LoraWeights(down, up, alpha)

    _check_fit(weights, unet, source)
    coverage = appa_coverage(weights, unet)
    parsed = ParsedLora(layout, weights, source, ignored, coverage)
    log.info("%s: %s LoRA; %s", source, layout, coverage.describe())
    if coverage.missing:
        log.warning("%s: %d APPA layer(s) are not in the LoRA: %s", source, len(coverage.missing),
                    format_keys(coverage.missing, 4))
    if any(w.alpha is None for w in weights.values()):
        log.info("%s: no alpha in the file for some layers; using alpha = rank (scale 1), as peft and "
                 "TCAN's training (rank 16, alpha 16) do.", source)
    return parsed


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The string metadata of a safetensors header; None for a torch archive."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata()
    except (SafetensorError, OSError):
        # load_state_dict_file has read the file already, so this is a torch archive, which has no metadata.
        return None


def load_lora(path: str | os.PathLike, unet: torch.nn.Module, device: str | torch.device = "cpu") -> ParsedLora:
    """Read an APPA / SD1.5 LoRA file (.safetensors, .ckpt, .pth, .bin) and map it onto ``unet``'s layers."""
    p = Path(path)
    sd = load_state_dict_file(p, device)
    return parse_lora_state_dict(sd, unet, source=str(p), metadata=_safetensors_metadata(p))
