"""Tiny APPA LoRA files for the tiny UNet, written in the key layouts the LoRA loader reads.

:func:`write_tiny_loras` writes one LoRA (seeded random A and B, so every layer's delta is non-zero;
real training starts B at zero) in each layout:

- ``peft``: ``base_model.model.<path>.lora_A.weight`` in .safetensors, alpha in diffusers'
  ``lora_adapter_metadata`` header;
- ``peft_ckpt``: the TCAN authors' training output, ``module.<path>.lora_A.default.weight`` in a
  plain dict saved with ``torch.save`` (no alpha: alpha = rank, so written only when they are equal);
- ``diffusers``: ``unet.<path>.lora.down.weight`` / ``lora.up.weight`` / ``unet.<path>.alpha``;
- ``diffusers_processor``: the older ``<attn>.processor.to_q_lora.down.weight`` layout (no alpha, so
  written only when alpha == rank; attention projections only);
- ``kohya``: ``lora_unet_<LDM path with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..models.lora import appa_targets
from ..models.ldm_keys import unet_to_ldm

TINY_LORA_LAYOUTS = ("peft", "peft_ckpt", "diffusers", "diffusers_processor", "kohya")
_ATTN_PROJ = re.compile(r"^(?P<attn>.+\.attn\d)\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")
# A text-encoder layer of the tiny CLIP (width 64), for files that carry text-encoder keys too.
_TE_PATH = "text_model.encoder.layers.0.self_attn.q_proj"
_TE_WIDTH = 64


@dataclass
class TinyLora:
    """Files of one tiny LoRA by layout, its factors and the deltas (alpha / r) B A it should add."""

    files: dict[str, Path] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    expected: dict[str, torch.Tensor] = field(default_factory=dict)
    rank: int = 4
    alpha: float = 4.0


def tiny_lora_factors(unet: torch.nn.Module, targets: Iterable[str], rank: int = 4,
                      seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random (A [r, in(, kh, kw)], B [out, r(, 1, 1)]) for each target layer of ``unet``."""
    modules = dict(unet.named_modules())
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for path in targets:
        shape = modules[path].weight.shape
        down = torch.randn((rank, *shape[1:]), generator=generator) * 0.1
        up = torch.randn((shape[0], rank, *([1] * (len(shape) - 2))), generator=generator) * 0.1
        factors[path] = (down, up)
    return factors


def expected_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """(alpha / r) * B A in float64, shaped like the layer's weight [out, in(, kh, kw)]."""
    rank = down.shape[0]
    product = up.double().reshape(up.shape[0], rank) @ down.double().reshape(rank, -1)
    return (product * (alpha / rank)).reshape(up.shape[0], *down.shape[1:])


def _text_encoder_factors(rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(rank, _TE_WIDTH, generator=generator), torch.randn(_TE_WIDTH, rank, generator=generator))


def peft_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str = "base_model.model.",
                    adapter: str | None = None) -> dict[str, torch.Tensor]:
    """peft keys: ``<prefix><path>.lora_A[.<adapter>].weight`` (A) and ``lora_B`` (B)."""
    tail = f".{adapter}.weight" if adapter else ".weight"
    sd = {}
    for path, (down, up) in factors.items():
        sd[f"{prefix}{path}.lora_A{tail}"] = down
        sd[f"{prefix}{path}.lora_B{tail}"] = up
    return sd


def diffusers_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         alpha: float) -> dict[str, torch.Tensor]:
    """diffusers keys: ``unet.<path>.lora.down.weight``, ``lora.up.weight`` and ``unet.<path>.alpha``."""
    sd = {}
    for path, (down, up) in factors.items():
        sd[f"unet.{path}.lora.down.weight"] = down
        sd[f"unet.{path}.lora.up.weight"] = up
        sd[f"unet.{path}.alpha"] = torch.tensor(float(alpha))
    return sd


def processor_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Older diffusers attention-processor keys: ``<attn>.processor.to_q_lora.down.weight``."""
    sd = {}
    for path, (down, up) in factors.items():
        m = _ATTN_PROJ.match(path)
        if m is None:
            raise ValueError(f"the attention-processor LoRA layout holds attention projections only "
                             f"(to_q, to_k, to_v, to_out.0), got {path}; leave 'diffusers_processor' out "
                             "of the layouts for other layers.")
        proj = m["proj"].removesuffix(".0")
        sd[f"{m['attn']}.processor.{proj}_lora.down.weight"] = down
        sd[f"{m['attn']}.processor.{proj}_lora.up.weight"] = up
    return sd


def kohya_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                     unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """kohya keys with LDM layer names: ``lora_unet_input_blocks_1_1_..._to_q.lora_down.weight``."""
    sd = {}
    for path, (down, up) in factors.items():
        (ldm_key,) = unet_to_ldm({path + ".weight": down}, unet.config)
        name = "lora_unet_" + ldm_key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def _text_encoder_keys(layout: str, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    down, up = _text_encoder_factors(rank, seed)
    if layout == "kohya":
        name = "lora_te_" + _TE_PATH.replace(".", "_")
        return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                f"{name}.alpha": torch.tensor(float(alpha))}
    if layout in ("diffusers", "diffusers_processor"):
        return {f"text_encoder.{_TE_PATH}.lora_linear_layer.down.weight": down,
                f"text_encoder.{_TE_PATH}.lora_linear_layer.up.weight": up}
    adapter = "default" if layout == "peft_ckpt" else None
    return peft_state_dict({_TE_PATH: (down, up)}, prefix="text_encoder.", adapter=adapter)


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def write_tiny_loras(folder: str | Path, unet: torch.nn.Module, targets: Sequence[str] | None = None,
                     rank: int = 4, alpha: float = 4.0, seed: int = 0, text_encoder: bool = False,
                     layouts: Sequence[str] = TINY_LORA_LAYOUTS) -> TinyLora:
    """Write one seeded LoRA for ``unet`` (default targets: the APPA layers) in each of ``layouts``."""
    unknown = [layout for layout in layouts if layout not in TINY_LORA_LAYOUTS]
    if unknown:
        raise ValueError(f"unknown tiny LoRA layout(s) {unknown}; choose from {list(TINY_LORA_LAYOUTS)}")
    alpha_free = [layout for layout in layouts if layout in ("peft_ckpt", "diffusers_processor")]
    if alpha_free and float(alpha) != float(rank):
        raise ValueError(f"the {alpha_free} layout(s) store no alpha, so alpha must equal the rank ({rank}), "
                         f"got alpha {alpha}; leave them out of the layouts for another alpha.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = list(appa_targets(unet) if targets is None else targets)
    factors = tiny_lora_factors(unet, targets, rank, seed)
    tiny = TinyLora(factors=factors, rank=rank, alpha=float(alpha),
                    expected={path: expected_delta(down, up, alpha) for path, (down, up) in factors.items()})
    for layout in layouts:
        extra = _text_encoder_keys(layout, rank, alpha, seed) if text_encoder else {}
        if layout == "peft":
            metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
                {"r": rank, "lora_alpha": alpha, "target_modules": targets}, sort_keys=True)}
            tiny.files[layout] = _save_safetensors({**peft_state_dict(factors), **extra},
                                                   folder / "tiny_appa_peft.safetensors", metadata)
        elif layout == "peft_ckpt":
            sd = {**peft_state_dict(factors, prefix="module.", adapter="default"), **extra}
            path = folder / "tiny_appa_authors.ckpt"
            torch.save({k: v.contiguous().clone() for k, v in sd.items()}, path)
            tiny.files[layout] = path
        elif layout == "diffusers":
            tiny.files[layout] = _save_safetensors({**diffusers_state_dict(factors, alpha), **extra},
                                                   folder / "tiny_appa_diffusers.safetensors")
        elif layout == "diffusers_processor":
            tiny.files[layout] = _save_safetensors({**processor_state_dict(factors), **extra},
                                                   folder / "tiny_appa_diffusers_processor.safetensors")
        else:
            tiny.files[layout] = _save_safetensors({**kohya_state_dict(factors, alpha, unet), **extra},
                                                   folder / "tiny_appa_kohya.safetensors")
    return tiny
