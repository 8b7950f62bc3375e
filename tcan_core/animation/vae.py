"""The VAE as the sampler sees it: a two-method protocol over IMAGE tensors, and SD1.5's latent scale.

ComfyUI's ``VAE`` object already has this shape (``encode(IMAGE) -> latent``, ``decode(latent) ->
IMAGE``, latents unscaled as ComfyUI's LATENT holds them); :class:`DiffusersVAE` gives a diffusers
``AutoencoderKL`` the same two methods for the command line and the tests.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..bases import SD15

# The UNet works on latents * scale; ComfyUI's LATENT and the VAE use the unscaled latents.
SD15_LATENT_SCALE = SD15.latent_scale


class VAELike(Protocol):
    """``encode`` IMAGE [B,H,W,3] in 0..1 -> latents [B,4,H/8,W/8]; ``decode`` the inverse."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ...


class DiffusersVAE:
    """A diffusers ``AutoencoderKL`` behind ComfyUI's VAE interface (mean of the posterior, no sampling)."""

    def __init__(self, vae: torch.nn.Module, device: torch.device | str | None = None) -> None:
        self.vae = vae
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B,H,W,3] in 0..1 -> unscaled latents [B,4,H/8,W/8] (posterior mean)."""
        self.vae.to(self.device)
        pixels = images.to(self.device, self.dtype).movedim(-1, 1) * 2.0 - 1.0
        return self.vae.encode(pixels).latent_dist.mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B,4,h,w] -> IMAGE [B,8h,8w,3] in 0..1 (float32, on the VAE's device)."""
        self.vae.to(self.device)
        pixels = self.vae.decode(latents.to(self.device, self.dtype)).sample
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
