"""What the pack needs to know about a base model family, as one record per base (see :mod:`.sd15`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

# Other families by the width of their text context, to name them in errors.
BASES_BY_CONTEXT_WIDTH: Mapping[int, str] = MappingProxyType(
    {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL (refiner)", 4096: "SD3/Flux (T5)"})
# Families by their UNet's block widths, to name them in errors.
BASES_BY_BLOCK_WIDTHS: Mapping[tuple[int, ...], str] = MappingProxyType(
    {(320, 640, 1280, 1280): "SD1.5", (320, 640, 1280): "SDXL"})


@dataclass(frozen=True)
class BaseModelFacts:
    """One base model family: text context, latent space, preview, noise schedule, layout, and advice.

    ``fix`` maps a model slot (``checkpoint``, ``controlnet``, ``motion``) to the sentence that
    says which file to use instead when a file is for another base.
    """

    name: str
    context_width: int
    context_tokens: int
    latent_channels: int
    latent_scale: float
    vae_factor: int
    latent_rgb: tuple[tuple[float, float, float], ...]
    block_out_channels: tuple[int, ...]
    schedule: Mapping[str, Any]
    controlnet_temporal_blocks: tuple[int, ...]
    fix: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", MappingProxyType(dict(self.schedule)))
        object.__setattr__(self, "fix", MappingProxyType(dict(self.fix)))

    def latent_rgb_matrix(self) -> torch.Tensor:
        """Latent -> RGB preview factors [latent_channels, 3]."""
        return torch.tensor(self.latent_rgb)


def base_by_context_width(width: int) -> str:
    """The family whose text encoder is ``width`` wide, or 'another base model'."""
    return BASES_BY_CONTEXT_WIDTH.get(int(width), "another base model")


def base_by_block_widths(widths: tuple[int, ...]) -> str:
    """'SD1.5' / 'SDXL' for the published block widths, else a description by block count."""
    widths = tuple(int(w) for w in widths)
    if widths in BASES_BY_BLOCK_WIDTHS:
        return BASES_BY_BLOCK_WIDTHS[widths]
    return {4: "SD1.5-layout", 3: "SDXL-layout"}.get(len(widths), f"{len(widths)}-block")
