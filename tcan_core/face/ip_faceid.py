"""IP-Adapter FaceID for SD1.5 on the TCAN denoising UNet (Ye et al. 2023, "IP-Adapter: Text Compatible Image
Prompt Adapter for Text-to-Image Diffusion Models"; its FaceID variant).

An insightface identity embedding [512] goes through :class:`MLPProjModel` (Linear 512 -> 1024, GELU,
Linear 1024 -> 768 x 4, reshape to [4,768], LayerNorm) to 4 face tokens, which the sampler appends
after the text tokens. Every cross-attention (``attn2``) adds ``scale x`` attention over them with its
own ``to_k_ip`` / ``to_v_ip`` (the same attention as ID-Animator's, so :class:`.id_adapter.FaceAttnProcessor`
runs it), and every attention, ``attn1`` included, has a rank-128 LoRA on q, k, v and out. The
unconditional tokens are the projection of a zero embedding.

Checkpoint ``ip-adapter-faceid_sd15.bin``, recognised from its keys: ``{"image_proj": {...},
"ip_adapter": {...}}`` (flattened to ``image_proj.*`` / ``ip_adapter.*`` by the loader, as a
.safetensors stores it). ``image_proj`` is the MLP (``proj.0``, ``proj.2``, ``norm``); ``ip_adapter``
is ``nn.ModuleList(unet.attn_processors.values())`` numbered like ID-Animator's
(:func:`.id_adapter.attention_slots`): ``<i>.to_{q,k,v,out}_lora.{down,up}.weight`` at every slot
(``LoRAAttnProcessor`` / ``LoRAIPAttnProcessor``, diffusers ``LoRALinearLayer`` without network alpha,
so the LoRA scale is 1) and ``<i>.to_k_ip.weight`` / ``<i>.to_v_ip.weight`` at the ``attn2`` slots. A
file without any LoRA key is accepted (ComfyUI_IPAdapter_plus users keep the LoRA as the separate
``ip-adapter-faceid_sd15_lora.safetensors``); a file with some LoRA keys must have all of them. See
tencent-ailab/IP-Adapter ip_adapter/ip_adapter_faceid.py (``MLPProjModel``, ``IPAdapterFaceID``) and
ip_adapter/attention_processor_faceid.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping

import torch
from torch import nn

from ..models.errors import ModelFormatError
from ..models.keys import strip_module_prefix
from ..models.lora import ParsedLora, appa_coverage
from ..models.state_dict import fit_problems, format_keys, load_state_dict_file, load_strict, shapes_of, strip_prefix
from .id_adapter import (IP_ADAPTER_FACEID, FaceAdapterWeights, FaceLayer, attention_slots, check_context_width,
                         check_finite, slot_lora, slot_lora_shapes)

log = logging.getLogger(__name__)

FACEID_EMBEDDING_DIM = 512
SUPPORTED_FORMATS = ("ID-Animator's animator.ckpt (image_proj.* / face_adapter.*, or image_proj_model.* / "
                     "adapter_modules.*) and IP-Adapter FaceID for SD1.5 (ip-adapter-faceid_sd15.bin: "
                     "image_proj.proj.*, image_proj.norm.* / ip_adapter.*)")
_PROJ_KEYS = frozenset({"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"})


class MLPProjModel(nn.Module):
    """IP-Adapter FaceID's projector: identity embeddings [B,id_dim] -> face tokens [B,num_tokens,C]
    (Linear, GELU, Linear to num_tokens x C, reshape, LayerNorm over C)."""

    def __init__(self, cross_attention_dim: int = 768, id_embeddings_dim: int = FACEID_EMBEDDING_DIM,
                 num_tokens: int = 4, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.id_embeddings_dim = id_embeddings_dim
        self.num_tokens = num_tokens
        hidden = hidden_dim or 2 * id_embeddings_dim
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, hidden), nn.GELU(),
                                  nn.Linear(hidden, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """[B,id_dim] -> [B,num_tokens,C]."""
        x = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(x)


@dataclass(frozen=True, eq=False)
class IPFaceIDWeights(FaceAdapterWeights):
    """A parsed ip-adapter-faceid_sd15.bin: the MLP projector, per-``attn2`` ``to_k_ip`` / ``to_v_ip``
    (as :class:`FaceLayer`) and the LoRA on q, k, v, out of every attention (empty when the file has none)."""

    kind: ClassVar[str] = IP_ADAPTER_FACEID

    mlp: MLPProjModel
    layers: Mapping[str, FaceLayer]
    lora: ParsedLora
    source: str
    slots: Mapping[str, int] = field(default_factory=dict)

    @property
    def projector(self) -> nn.Module:
        return self.mlp

    @property
    def embedding_dim(self) -> int:
        return int(self.mlp.id_embeddings_dim)

    @property
    def num_tokens(self) -> int:
        return int(self.mlp.num_tokens)

    @property
    def has_lora(self) -> bool:
        return bool(self.lora.weights)

    def describe(self) -> str:
        if self.has_lora:
            ranks = "/".join(str(r) for r in self.lora.coverage.ranks)
            lora = f"LoRA rank {ranks} on {len(self.lora.weights)} layers"
        else:
            lora = ("no LoRA in the file (load ip-adapter-faceid_sd15_lora.safetensors with TCAN APPA LoRA for the "
                    "authors' setup)")
        return (f"IP-Adapter FaceID from {self.source}: {self.num_tokens} face tokens from a "
                f"{self.embedding_dim}-d identity embedding, on {len(self.layers)} cross-attention layers, {lora}")

    def embedding_batch(self, embeddings: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
        """Identity embeddings [n_faces,512] ([512] is one face)."""
        batch = embeddings if embeddings.ndim != 1 else embeddings.unsqueeze(0)
        if batch.ndim != 2 or batch.shape[0] < 1 or batch.shape[-1] != self.embedding_dim:
            raise ValueError(f"{name} must be insightface identity embeddings [n_faces,{self.embedding_dim}], got "
                             f"{list(embeddings.shape)}; IP-Adapter FaceID takes the face's "
                             f"{self.embedding_dim}-d identity embedding (a TCAN_FACE from the face analysis node), "
                             "not CLIP image features")
        return batch

    def default_uncond_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """A zero embedding [1,512]: IPAdapterFaceID.get_image_embeds projects ``zeros_like(faceid_embeds)``."""
        return torch.zeros_like(embeddings[:1])


def ip_adapter_variant(image_proj: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``image_proj`` (keys without the prefix) is FaceID's MLP over a 512-d embedding, or close enough
    for the strict load to name what differs; else which other IP-Adapter the keys belong to."""
    keys = set(image_proj)
    if any(k.startswith("perceiver_resampler.") for k in keys):
        return ("IP-Adapter FaceID-Plus / FaceID-PlusV2 (image_proj.perceiver_resampler.*: it also needs CLIP image "
                "features)")
    if "latents" in keys or "proj_in.weight" in keys:
        return "IP-Adapter Plus / Plus-Face (a perceiver Resampler: image_proj.latents, proj_in, layers.*)"
    if "proj.weight" in keys:
        return "IP-Adapter (image_proj.proj.weight: a linear projection of the CLIP image embedding)"
    if not keys & _PROJ_KEYS:
        return f"an IP-Adapter variant with image_proj keys {format_keys(keys, 6)}"
    proj0 = image_proj.get("proj.0.weight")
    if proj0 is not None and proj0.ndim == 2 and int(proj0.shape[1]) != FACEID_EMBEDDING_DIM:
        return (f"IP-Adapter full-face (an MLP over CLIP features of width {int(proj0.shape[1])}, not a "
                f"{FACEID_EMBEDDING_DIM}-d identity embedding)")
    return None


def _split(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """(image_proj keys, ip_adapter keys) without their prefixes; ModelFormatError for other keys."""
    keys = strip_module_prefix(sd, source)
    other = [k for k in keys if not k.startswith(("image_proj.", "ip_adapter."))]
    if other:
        raise ModelFormatError(f"{source}: {len(other)} unexpected key(s) outside image_proj.* and ip_adapter.*: "
                               f"{format_keys(other)}")
    image_proj, adapter = strip_prefix(keys, "image_proj."), strip_prefix(keys, "ip_adapter.")
    if not image_proj or not adapter:
        absent = "image_proj.* (the projection model)" if not image_proj else "ip_adapter.* (the attention weights)"
        raise ModelFormatError(f"{source} has no {absent} keys; an IP-Adapter FaceID file holds both. Download "
                               "ip-adapter-faceid_sd15.bin again.")
    return image_proj, adapter


def _mlp_config(image_proj: Mapping[str, torch.Tensor], source: str) -> dict:
    """MLPProjModel settings from the shapes of its state dict (keys without the ``image_proj.`` prefix)."""
    problems = fit_problems({k: () for k in image_proj}, {k: () for k in _PROJ_KEYS})
    if problems:
        raise ModelFormatError(f"{source}: the FaceID projection (image_proj) is not MLPProjModel's "
                               f"({', '.join(sorted(_PROJ_KEYS))}): {problems}")
    dims = {"proj.0.weight": 2, "proj.2.weight": 2, "norm.weight": 1}
    bad = [k for k, n in dims.items() if image_proj[k].ndim != n]
    if bad:
        raise ModelFormatError(f"{source}: {format_keys(bad)} of the FaceID projection have the wrong number of "
                               f"dimensions ({', '.join(str(list(image_proj[k].shape)) for k in bad)}); the file "
                               "is corrupt.")
    hidden, id_dim = (int(n) for n in image_proj["proj.0.weight"].shape)
    width = int(image_proj["norm.weight"].shape[0])
    out = int(image_proj["proj.2.weight"].shape[0])
    if width <= 0 or out % width:
        raise ModelFormatError(f"{source}: the FaceID projection's output width {out} is not a whole number of "
                               f"tokens of width {width} (image_proj.norm.weight)")
    return dict(cross_attention_dim=width, id_embeddings_dim=id_dim, num_tokens=out // width, hidden_dim=hidden)


def parse_ip_faceid_state_dict(sd: Mapping[str, torch.Tensor], unet: nn.Module,
                               source: str = "ip-adapter-faceid_sd15.bin") -> IPFaceIDWeights:
    """An IP-Adapter FaceID state dict (``image_proj.*`` / ``ip_adapter.*``) -> projector + per-attention weights
    of ``unet``, strictly; other IP-Adapters are refused by name, an SDXL file as the wrong base model."""
    image_proj, adapter = _split(sd, source)
    variant = ip_adapter_variant(image_proj)
    if variant is not None:
        raise ModelFormatError(f"{source} is {variant}; the face adapter takes only {SUPPORTED_FORMATS}.")
    context = int(unet.config.cross_attention_dim)
    widths = {int(v.shape[1]) for k, v in adapter.items() if k.endswith("to_k_ip.weight") and v.ndim == 2}
    if "norm.weight" in image_proj:
        widths.add(int(image_proj["norm.weight"].shape[0]))
    check_context_width(widths, context, source, "use IP-Adapter FaceID for SD1.5 (ip-adapter-faceid_sd15.bin)")

    with torch.device("meta"):
        mlp = MLPProjModel(**_mlp_config(image_proj, source))
    load_strict(mlp, image_proj, "IP-Adapter FaceID projection (image_proj)", source)
    # The MLP is small; float32 keeps the tokens' precision independent of how the file was stored.
    mlp = mlp.float().eval().requires_grad_(False)

    slots = attention_slots(unet)
    cross = {path: i for path, i in slots.items() if path.endswith(".attn2")}
    has_lora = any("_lora." in k for k in adapter)
    expected = slot_lora_shapes(unet, slots, adapter) if has_lora else {}
    for path, i in cross.items():
        attn = unet.get_submodule(path)
        for proj in ("to_k_ip", "to_v_ip"):
            expected[f"{i}.{proj}.weight"] = (attn.to_k.out_features, attn.to_k.in_features)
    problems = fit_problems(shapes_of(adapter), expected, owner="UNet needs")
    if problems:
        lora_note = (" A FaceID file holds either no LoRA or a LoRA on q, k, v and out of every attention (attn1 "
                     "and attn2)." if has_lora else "")
        raise ModelFormatError(f"{source}: the IP-Adapter FaceID weights do not fit this UNet's {len(slots)} "
                               f"attention layers (numbered as the authors' unet.attn_processors): {problems}."
                               + lora_note)
    check_finite(adapter, source)

    layers = {path: FaceLayer(adapter[f"{i}.to_k_ip.weight"], adapter[f"{i}.to_v_ip.weight"])
              for path, i in cross.items()}
    lora = (slot_lora(unet, slots, adapter, IP_ADAPTER_FACEID, source) if has_lora
            else ParsedLora(IP_ADAPTER_FACEID, {}, source, (), appa_coverage({}, unet)))
    weights = IPFaceIDWeights(mlp, layers, lora, source, slots)
    log.info("%s", weights.describe())
    return weights


def load_ip_faceid(path: str | os.PathLike, unet: nn.Module) -> IPFaceIDWeights:
    """Read ip-adapter-faceid_sd15.bin (torch, weights_only) or its .safetensors for ``unet``."""
    p = Path(path)
    return parse_ip_faceid_state_dict(load_state_dict_file(p), unet, source=str(p))
