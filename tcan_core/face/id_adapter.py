"""ID-Animator's face adapter on the TCAN denoising UNet (He et al. 2024, "ID-Animator: Zero-Shot
Identity-Preserving Human Video Generation").

A face crop goes through a CLIP ViT-H/14 image encoder; its penultimate hidden states [N,257,1280]
go through a perceiver :class:`Resampler` (16 queries, width 768 for SD1.5) to 16 face tokens,
which the sampler appends after the text tokens. Every spatial cross-attention (``attn2``) gets its
own ``to_k_face`` / ``to_v_face`` and a rank-128 LoRA on q, k, v and out; its output is
``text attention + scale * face attention`` (:class:`FaceAttnProcessor`).

Checkpoint (``animator.ckpt``), recognised from its keys:

- ``image_proj.*`` / ``face_adapter.*`` (a dict of two state dicts, flattened by the loader), or
- ``image_proj_model.*`` / ``adapter_modules.*`` (the training wrapper's keys, optionally behind
  ``module.`` and a ``state_dict`` wrapper).

``face_adapter`` / ``adapter_modules`` is ``nn.ModuleList(unet.attn_processors.values())`` of the
authors' UNet: one slot per attention in the order down blocks, up blocks, mid block, and within a
transformer block ``attn1`` then ``attn2``. Only the ``attn2`` slots (odd indices for SD1.5: 1, 3,
..., 31) have weights: ``<i>.to_k_face.weight``, ``<i>.to_v_face.weight`` and
``<i>.to_{q,k,v,out}_lora.{down,up}.weight`` (diffusers ``LoRALinearLayer``, no network alpha,
so the LoRA scale is 1). See ID-Animator/faceadapter/face_adapter.py (``set_face_adapter``,
``load_face_adapter``) and ID-Animator/faceadapter/attention_processor.py (``LoRAFaceAttnProcessor``).

IP-Adapter FaceID (:mod:`.ip_faceid`) has the same attention and slot numbering and another
projector; both parse to a :class:`FaceAdapterWeights`, which is all :class:`FaceIDPatch` and the
processors here use.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..animation.model import ContextTokens, RunState
from ..attention import steps as attention
from ..attention.context import append_tokens
from ..attention.processor import ComposedAttnProcessor, Contribution, contributing
from ..attention.unet_map import ROLE_SPATIAL_CROSS, unet_map
from ..bases import base_by_context_width
from ..images import check_image_batch
from ..models.errors import ModelFormatError, WrongBaseModelError
from ..models.keys import strip_module_prefix
from ..models.lora import LoraPatch, LoraWeights, ParsedLora, appa_coverage
from ..models.state_dict import fit_problems, format_keys, load_state_dict_file, load_strict, shapes_of

log = logging.getLogger(__name__)

DEFAULT_SCALE = 0.8
ID_ANIMATOR_DIM_HEAD = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEEDED_ENCODER = ("the CLIP ViT-H/14 image encoder (hidden size 1280: CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors "
                  "in models/clip_vision, from h94/IP-Adapter models/image_encoder)")
ID_ANIMATOR = "id-animator"
IP_ADAPTER_FACEID = "ip-adapter-faceid"
LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


# --- Resampler --------------------------------------------------------------------------------


class PerceiverAttention(nn.Module):
    """Latents attend over [image features ; latents] (Alayrac et al. 2022, Flamingo perceiver resampler)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [B,N,D], latents [B,Q,D] -> [B,Q,D]."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, q_len, _ = latents.shape
        query = self.to_q(latents)
        key, value = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        query, key, value = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, -1))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler of ID-Animator (IP-Adapter Plus): CLIP hidden states [B,N,E] -> [B,Q,output_dim].

    Parameter names follow the released checkpoints (``latents``, ``proj_in``, ``layers.<i>.0`` attention,
    ``layers.<i>.1`` feed-forward, ``proj_out``, ``norm_out``, optional ``pos_emb``).
    """

    def __init__(self, dim: int = 768, depth: int = 4, dim_head: int = 64, heads: int = 12, num_queries: int = 16,
                 embedding_dim: int = 1280, output_dim: int = 768, ff_mult: int = 4,
                 max_seq_len: int | None = None) -> None:
        super().__init__()
        self.config = dict(dim=dim, depth=depth, dim_head=dim_head, heads=heads, num_queries=num_queries,
                           embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_mult,
                           max_seq_len=max_seq_len)
        self.pos_emb = nn.Embedding(max_seq_len, embedding_dim) if max_seq_len else None
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth))

    @property
    def embedding_dim(self) -> int:
        return int(self.config["embedding_dim"])

    @property
    def num_queries(self) -> int:
        return int(self.config["num_queries"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,N,embedding_dim] -> [B,num_queries,output_dim]."""
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for perceiver_attention, feed_forward in self.layers:
            latents = perceiver_attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def resampler_config(sd: Mapping[str, torch.Tensor], source: str, dim_head: int = ID_ANIMATOR_DIM_HEAD) -> dict:
    """Resampler settings from the shapes of its state dict (keys without the ``image_proj`` prefix)."""
    needed = ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ModelFormatError(f"{source}: the Resampler (image_proj) lacks {format_keys(absent)}; the file is not "
                               "an ID-Animator animator.ckpt, or it is incomplete.")
    dim = int(sd["latents"].shape[-1])
    inner = int(sd["layers.0.0.to_q.weight"].shape[0])
    if inner % dim_head:
        raise ModelFormatError(f"{source}: Resampler attention width {inner} is not a multiple of the head width "
                               f"{dim_head} that ID-Animator uses.")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.split(".")[1].isdigit())
    return dict(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head,
                num_queries=int(sd["latents"].shape[1]), embedding_dim=int(sd["proj_in.weight"].shape[1]),
                output_dim=int(sd["proj_out.weight"].shape[0]),
                ff_mult=int(sd["layers.0.1.1.weight"].shape[0]) // dim,
                max_seq_len=int(sd["pos_emb.weight"].shape[0]) if "pos_emb.weight" in sd else None)


# --- checkpoint -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FaceLayer:
    """One cross-attention's face projections: to_k_face, to_v_face [inner, context]."""

    to_k_face: torch.Tensor
    to_v_face: torch.Tensor


def needed_encoder(width: int) -> str:
    """Which image encoder a projector of input width ``width`` needs, for error messages."""
    return NEEDED_ENCODER if width == 1280 else f"an image encoder of width {width}"


class FaceAdapterWeights(abc.ABC):
    """A parsed face adapter (ID-Animator or IP-Adapter FaceID), as :class:`FaceIDPatch` uses it.

    Subclasses are frozen dataclasses holding ``layers`` (``attn2`` module path -> :class:`FaceLayer`),
    ``lora`` (a :class:`ParsedLora` on q, k, v, out; empty when the file has none), ``source`` and
    ``slots`` (module path -> index in the authors' ``unet.attn_processors``); they say how the
    projector's input (``embeddings``) becomes face tokens [n,num_tokens,C].
    """

    kind: ClassVar[str]
    uses_image_encoder: ClassVar[bool] = False
    layers: Mapping[str, FaceLayer]
    lora: ParsedLora
    source: str
    slots: Mapping[str, int]

    def __post_init__(self) -> None:
        """Freeze the per-layer mappings (the dataclass itself is frozen)."""
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "slots", MappingProxyType(dict(self.slots)))

    @property
    @abc.abstractmethod
    def projector(self) -> nn.Module:
        """The module that maps embeddings to face tokens."""

    @property
    @abc.abstractmethod
    def embedding_dim(self) -> int:
        """Width of the projector's input."""

    @property
    @abc.abstractmethod
    def num_tokens(self) -> int:
        """Face tokens per face."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One sentence for logs and the node's report."""

    @abc.abstractmethod
    def embedding_batch(self, embeddings: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
        """The projector's input as a batch of faces (one face may come without the batch axis);
        ValueError naming the expected shape otherwise."""

    def default_uncond_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """The input whose tokens serve the unconditional half when none is given; None: zero tokens."""
        return None

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings [n,...] (on the projector's device and dtype) -> face tokens [n,num_tokens,C]."""
        return self.projector(embeddings)


@dataclass(frozen=True, eq=False)
class IDAnimatorWeights(FaceAdapterWeights):
    """A parsed animator.ckpt: the Resampler, per-``attn2`` face projections and the LoRA on q, k, v, out."""

    kind: ClassVar[str] = ID_ANIMATOR
    uses_image_encoder: ClassVar[bool] = True

    layout: str
    resampler: Resampler
    layers: Mapping[str, FaceLayer]
    lora: ParsedLora
    source: str
    slots: Mapping[str, int] = field(default_factory=dict)

    @property
    def projector(self) -> nn.Module:
        return self.resampler

    @property
    def embedding_dim(self) -> int:
        return self.resampler.embedding_dim

    @property
    def num_tokens(self) -> int:
        return self.resampler.num_queries

    def describe(self) -> str:
        ranks = "/".join(str(r) for r in self.lora.coverage.ranks)
        return (f"ID-Animator face adapter from {self.source} ({self.layout} keys): {self.num_tokens} face tokens "
                f"from a width-{self.embedding_dim} image encoder, on {len(self.layers)} cross-attention layers, "
                f"LoRA rank {ranks or 'none'}")

    def embedding_batch(self, embeddings: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
        """CLIP hidden states [n_faces,tokens,E] ([tokens,E] is one face)."""
        batch = embeddings if embeddings.ndim != 2 else embeddings.unsqueeze(0)
        if batch.ndim != 3 or batch.shape[0] < 1 or batch.shape[-1] != self.embedding_dim:
            raise ValueError(f"{name} must be image-encoder hidden states [n_faces,tokens,{self.embedding_dim}], "
                             f"got {list(embeddings.shape)}; the adapter needs {needed_encoder(self.embedding_dim)}")
        return batch


def attention_slots(unet: nn.Module) -> dict[str, int]:
    """``attn1`` / ``attn2`` module path -> its index in the authors' ``unet.attn_processors`` list (down, up,
    mid blocks; attn1 before attn2 in each transformer block), ignoring temporal/motion attention as the
    authors' UNet (a plain UNet2DConditionModel) has none."""
    return dict(sorted(unet_map(unet).slots().items(), key=lambda item: item[1]))


def cross_attention_slots(unet: nn.Module) -> dict[str, int]:
    """The ``attn2`` entries of :func:`attention_slots` (odd indices for SD1.5: 1, 3, ..., 31)."""
    slots = dict(sorted(unet_map(unet).slots(ROLE_SPATIAL_CROSS).items(), key=lambda item: item[1]))
    if not slots:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) in transformer blocks; the face "
                         "adapter needs an SD1.5 UNet (UNet2DConditionModel or UNetMotionModel).")
    return slots


def _projection(attn: nn.Module, proj: str) -> nn.Linear:
    return attn.to_out[0] if proj == "to_out" else getattr(attn, proj)


def slot_lora_shapes(unet: nn.Module, slots: Mapping[str, int],
                     sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the ``<i>.to_{q,k,v,out}_lora.{down,up}.weight`` (diffusers ``LoRALinearLayer``) that each
    slot's attention needs; the rank is read from the file's down weight (-1 when absent)."""
    expected: dict[str, tuple[int, ...]] = {}
    for path, i in slots.items():
        attn = unet.get_submodule(path)
        for proj in LORA_PROJECTIONS:
            layer = _projection(attn, proj)
            down = sd.get(f"{i}.{proj}_lora.down.weight")
            rank = int(down.shape[0]) if down is not None and down.ndim == 2 else -1
            expected[f"{i}.{proj}_lora.down.weight"] = (rank, layer.in_features)
            expected[f"{i}.{proj}_lora.up.weight"] = (layer.out_features, rank)
    return expected


def slot_lora(unet: nn.Module, slots: Mapping[str, int], sd: Mapping[str, torch.Tensor], layout: str,
              source: str) -> ParsedLora:
    """The slots' LoRA factors (keys checked by :func:`slot_lora_shapes`) as a :class:`ParsedLora` on module paths."""
    lora = {}
    for path, i in slots.items():
        for proj in LORA_PROJECTIONS:
            target = f"{path}.{proj}" + (".0" if proj == "to_out" else "")
            # LoRALinearLayer without network_alpha: scale 1, i.e. alpha = None.
            lora[target] = LoraWeights(sd[f"{i}.{proj}_lora.down.weight"], sd[f"{i}.{proj}_lora.up.weight"], None)
    return ParsedLora(layout, lora, source, (), appa_coverage(lora, unet))


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """ModelFormatError naming tensors that hold NaN/inf or are not floating point."""
    bad = [k for k, v in sd.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
    if bad:
        raise ModelFormatError(f"{source}: {format_keys(bad)} hold NaN/inf or are not floating point; the file is "
                               "corrupt.")


def _split_layout(sd: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict, dict]:
    """('grouped' or 'flat', Resampler keys, adapter keys) from the checkpoint's key prefixes."""
    layouts = {"grouped": ("image_proj.", "face_adapter."), "flat": ("image_proj_model.", "adapter_modules.")}
    keys = strip_module_prefix(sd, source)
    seen = [name for name, (proj, adapter) in layouts.items()
            if any(k.startswith(proj) for k in keys) or any(k.startswith(adapter) for k in keys)]
    if len(seen) != 1:
        what = "mixes both key layouts" if seen else "has neither key layout"
        raise ModelFormatError(f"{source} {what} of ID-Animator's animator.ckpt (image_proj.* / face_adapter.*, or "
                               f"image_proj_model.* / adapter_modules.*); its keys: {format_keys(keys)}. "
                               "Pick ID-Animator's animator.ckpt.")
    layout = seen[0]
    proj, adapter = layouts[layout]
    other = [k for k in keys if not k.startswith(proj) and not k.startswith(adapter)]
    if other:
        raise ModelFormatError(f"{source}: {len(other)} unexpected key(s) outside {proj}* and {adapter}*: "
                               f"{format_keys(other)}")
    return (layout, {k[len(proj):]: v for k, v in keys.items() if k.startswith(proj)},
            {k[len(adapter):]: v for k, v in keys.items() if k.startswith(adapter)})


def check_context_width(widths: set[int], context: int, source: str, advice: str) -> None:
    """WrongBaseModelError when the adapter's cross-attention ``widths`` are not the UNet's ``context``;
    ``advice`` names the SD1.5 file to use instead."""
    sdxl = [w for w in sorted(widths) if base_by_context_width(w) == "SDXL"]
    if sdxl:
        raise WrongBaseModelError(f"{source} is a face adapter for SDXL (cross-attention width {sdxl[0]}), "
                                  f"and the TCAN model is SD1.5 (width {context}); {advice}.")
    if widths - {context}:
        raise WrongBaseModelError(f"{source}: its cross-attention width is {sorted(widths)}, the TCAN UNet's is "
                                  f"{context}; the adapter is for another base model than this SD1.5 UNet; "
                                  f"{advice}.")


def parse_id_animator_state_dict(sd: Mapping[str, torch.Tensor], unet: nn.Module, source: str = "animator.ckpt",
                                 dim_head: int = ID_ANIMATOR_DIM_HEAD) -> IDAnimatorWeights:
    """An animator.ckpt state dict (either key layout) -> Resampler + per-``attn2`` weights of ``unet``, strictly."""
    layout, proj_sd, adapter_sd = _split_layout(sd, source)
    context = int(unet.config.cross_attention_dim)
    widths = {int(v.shape[1]) for k, v in adapter_sd.items() if k.endswith("to_k_face.weight") and v.ndim == 2}
    if "proj_out.weight" in proj_sd:
        widths.add(int(proj_sd["proj_out.weight"].shape[0]))
    check_context_width(widths, context, source, "use ID-Animator's SD1.5 animator.ckpt")

    resampler = Resampler(**resampler_config(proj_sd, source, dim_head))
    load_strict(resampler, proj_sd, "ID-Animator Resampler (image_proj)", source)
    resampler.eval().requires_grad_(False)

    slots = cross_attention_slots(unet)
    expected = slot_lora_shapes(unet, slots, adapter_sd)
    for path, i in slots.items():
        attn = unet.get_submodule(path)
        for proj in ("to_k_face", "to_v_face"):
            expected[f"{i}.{proj}.weight"] = (attn.to_k.out_features, attn.to_k.in_features)
    problems = fit_problems(shapes_of(adapter_sd), expected, owner="UNet needs")
    if problems:
        raise ModelFormatError(f"{source}: the face adapter weights do not fit this UNet's {len(slots)} "
                               f"cross-attention layers (numbered as the authors' unet.attn_processors): {problems}")
    check_finite(adapter_sd, source)

    layers = {path: FaceLayer(adapter_sd[f"{i}.to_k_face.weight"], adapter_sd[f"{i}.to_v_face.weight"])
              for path, i in slots.items()}
    lora = slot_lora(unet, slots, adapter_sd, ID_ANIMATOR, source)
    weights = IDAnimatorWeights(layout, resampler, layers, lora, source, slots)
    log.info("%s", weights.describe())
    return weights


def load_id_animator(path: str | os.PathLike, unet: nn.Module) -> IDAnimatorWeights:
    """Read ID-Animator's animator.ckpt (.ckpt/.bin/.pth with weights_only, or .safetensors) for ``unet``."""
    p = Path(path)
    return parse_id_animator_state_dict(load_state_dict_file(p), unet, source=str(p))


# --- attention --------------------------------------------------------------------------------


@dataclass
class FaceState:
    """What the face processors of one call share: how many face tokens end each context, and the scale."""

    num_tokens: int = 0
    scale: float = DEFAULT_SCALE


class FaceAttnProcessor(ComposedAttnProcessor, Contribution):
    """``attn2`` processor of ID-Animator: context = [text ; face], output = Attn(q, text) + scale * Attn(q, face).

    The last ``state.num_tokens`` context tokens are the face tokens; text attention uses the module's
    own to_k / to_v, face attention ``to_k_face`` / ``to_v_face``. With no face tokens, or scale 0
    (face tokens split off and dropped), the operations are those of diffusers ``AttnProcessor2_0``.
    It is the composed processor of :mod:`tcan_core.attention.processor` with this face branch as its
    first contribution; a second face adapter on the same attention appends its own branch (its
    tokens after these), and the branches add up.
    """

    def __init__(self, state: FaceState, to_k_face: torch.Tensor, to_v_face: torch.Tensor) -> None:
        super().__init__([self])
        self.state = state
        self.to_k_face = to_k_face
        self.to_v_face = to_v_face

    def context_tokens(self) -> int:
        """The face tokens at the end of the context."""
        return self.state.num_tokens

    def branch(self, attn: Any, query: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """``scale * Attn(q, face)`` [B,N,inner], or None without face tokens or at scale 0."""
        if tokens is None or self.state.scale == 0:
            return None
        return self.state.scale * self._face_attention(attn, query, tokens)

    def _face_attention(self, attn: Any, query: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        """Attention of the query [B,N,inner] over the face tokens [B|1,n,D] -> [B,N,inner]."""
        face = face.expand(query.shape[0], -1, -1).to(query.dtype)
        key = F.linear(face, self.to_k_face.to(face))
        value = F.linear(face, self.to_v_face.to(face))
        return attention.multi_head_attention(attn, query, key, value)


@contextlib.contextmanager
def face_attention_installed(unet: nn.Module, weights: FaceAdapterWeights, state: FaceState) -> Iterator[None]:
    """A face branch on every ``attn2`` of ``unet`` for the block (appended to a composed processor already there,
    else a :class:`FaceAttnProcessor`); the exact original processors after."""
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    branches = {path: FaceAttnProcessor(state, layer.to_k_face.to(device, dtype), layer.to_v_face.to(device, dtype))
                for path, layer in weights.layers.items()}
    with contributing(unet, branches, lambda branch: branch):
        yield


def append_face_tokens(context: torch.Tensor, face_tokens: torch.Tensor | None) -> torch.Tensor:
    """[B,T,C] text context and [1,n,C] (or [B,n,C]) face tokens -> [B,T+n,C], text first; None -> unchanged."""
    return append_tokens(context, face_tokens)


# --- image encoder ----------------------------------------------------------------------------


def check_image_encoder(encoder: nn.Module, weights: FaceAdapterWeights) -> None:
    """ValueError unless the adapter takes image-encoder features and the encoder's width is its input width."""
    if not weights.uses_image_encoder:
        raise ValueError(f"the face adapter {weights.source} ({weights.kind}) projects the face's identity "
                         "embedding and uses no image encoder; leave the CLIP vision input empty")
    width = int(getattr(encoder.config, "hidden_size", -1))
    if width != weights.embedding_dim:
        raise ValueError(f"the image encoder has width {width}, but the face adapter {weights.source} needs "
                         f"{needed_encoder(weights.embedding_dim)}; load the image encoder the adapter was "
                         "trained with.")


@torch.no_grad()
def clip_image_embeddings(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Face crops [N,H,W,3] in 0..1 -> CLIP penultimate hidden states [N,tokens,width] (ID-Animator's input)."""
    check_image_batch(images, "the face crops", "give aligned face crops with values in 0..1 (TCAN Face Analyze)",
                      "[N,H,W,3]")
    size = int(encoder.config.image_size)
    param = next(encoder.parameters())
    pixels = images.to(param.device, torch.float32).permute(0, 3, 1, 2)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = pixels.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = ((pixels - mean) / std).to(param.dtype)
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def clip_uncond_embeddings(encoder: nn.Module) -> torch.Tensor:
    """CLIP penultimate hidden states of an all-zero normalised image [1,tokens,width], ID-Animator's negative."""
    size = int(encoder.config.image_size)
    param = next(encoder.parameters())
    pixels = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


# --- patch ------------------------------------------------------------------------------------


def _check_face_weights(face_weights: torch.Tensor, n_faces: int) -> torch.Tensor:
    """Per-face weights [n_faces], finite, >= 0, not all 0 -> float32 copy; ValueError otherwise."""
    w = torch.as_tensor(face_weights).detach().to("cpu", torch.float32)
    if w.shape != (n_faces,):
        raise ValueError(f"face_weights must be one weight per face [{n_faces}], got {list(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"face_weights must be finite numbers >= 0 that do not all equal 0, got {w.tolist()}")
    return w


@torch.no_grad()
def face_tokens(weights: FaceAdapterWeights, embeddings: torch.Tensor, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, face_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Projector inputs [n_faces,...] -> face tokens [1,Q,C]: the projector per face, then the mean over faces
    (ID-Animator averages the projected tokens of several reference faces), weighted by ``face_weights`` [n]
    when given. Faces of weight 0 are left out, so weights (1, 0) give exactly the first face's tokens, and
    equal weights give exactly the plain mean."""
    embeddings = weights.embedding_batch(embeddings)
    if face_weights is not None:
        face_weights = _check_face_weights(face_weights, int(embeddings.shape[0]))
        kept = [i for i, w in enumerate(face_weights.tolist()) if w > 0]
        embeddings, face_weights = embeddings[kept], face_weights[kept]
        if bool((face_weights == face_weights[0]).all()):
            face_weights = None
    projector = weights.projector
    home = next(projector.parameters())
    home_device, home_dtype = home.device, home.dtype
    projector.to(device)
    try:
        tokens = weights.project(embeddings.to(device, home_dtype))
    finally:
        projector.to(home_device)
    if face_weights is None:
        mixed = tokens.mean(dim=0, keepdim=True)
    else:
        share = (face_weights / face_weights.sum()).to(tokens)
        mixed = (tokens * share.view(-1, 1, 1)).sum(dim=0, keepdim=True)
    return mixed.to(dtype)


@dataclass(frozen=True, eq=False)
class FaceIDPatch:
    """A face adapter (ID-Animator or IP-Adapter FaceID) on the denoising UNet (key ``face_id``).

    ``embeddings``: the projector's input for the reference faces: for ID-Animator CLIP ViT-H/14
    penultimate hidden states [n_faces, tokens, 1280] (:func:`clip_image_embeddings`), for IP-Adapter
    FaceID insightface identity embeddings [n_faces, 512]; a single face may omit the batch axis.
    Several faces are averaged after the projector, weighted by ``face_weights`` [n_faces]
    (``FaceIdentity.weights``; equal when None). ``uncond_embeddings`` (optional, same layout) gives
    the tokens for the unconditional half: ID-Animator's authors use :func:`clip_uncond_embeddings`,
    and without it that half gets zero tokens, which add exactly nothing (to_k_face / to_v_face have
    no bias); for FaceID the default is the projection of a zero embedding, as its authors do.
    ``scale`` weighs face attention (0.8 by default); 0 turns the adapter off entirely, its LoRA
    included. ``lora_strength`` scales the adapter's own LoRA (none in a FaceID file without LoRA keys).

    While applied, ``run.context_tokens`` holds a :class:`ContextTokens` with the tokens [1,Q,C] for
    both halves of guidance (on ``run.device``, UNet dtype): every context the sampler passes to
    ``model.unet`` during the call must end with them (:func:`append_face_tokens`), since each
    ``attn2`` splits off the last Q tokens. The entry is removed on exit.
    """

    weights: FaceAdapterWeights
    embeddings: torch.Tensor
    scale: float = DEFAULT_SCALE
    uncond_embeddings: torch.Tensor | None = None
    lora_strength: float = 1.0
    face_weights: torch.Tensor | None = None
    key: str = "face_id"

    def __post_init__(self) -> None:
        for name in ("scale", "lora_strength"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"face adapter {name} must be a finite number >= 0, got {getattr(self, name)!r}; "
                                 f"ID-Animator uses scale {DEFAULT_SCALE} and LoRA strength 1, and scale 0 turns "
                                 "the adapter off")
            object.__setattr__(self, name, value)
        embeddings = self.weights.embedding_batch(self.embeddings)
        object.__setattr__(self, "embeddings", embeddings)
        if self.uncond_embeddings is not None:
            object.__setattr__(self, "uncond_embeddings",
                               self.weights.embedding_batch(self.uncond_embeddings, "uncond_embeddings"))
        if self.face_weights is not None:
            object.__setattr__(self, "face_weights", _check_face_weights(self.face_weights, self.num_faces))

    @property
    def num_faces(self) -> int:
        return int(self.embeddings.shape[0])

    @contextlib.contextmanager
    def applied(self, model: Any, run: RunState) -> Iterator[None]:
        unet = model.unet
        dtype = next(unet.parameters()).dtype
        tokens = face_tokens(self.weights, self.embeddings, run.device, dtype, self.face_weights)
        uncond_embeddings = self.uncond_embeddings
        if uncond_embeddings is None:
            uncond_embeddings = self.weights.default_uncond_embeddings(self.embeddings)
        uncond = (face_tokens(self.weights, uncond_embeddings, run.device, dtype)
                  if uncond_embeddings is not None else torch.zeros_like(tokens))
        state = FaceState(num_tokens=int(tokens.shape[1]), scale=self.scale)
        lora = LoraPatch(self.weights.lora, self.lora_strength if self.scale > 0 else 0.0)
        entry = ContextTokens(self.key, tokens, uncond)
        with face_attention_installed(unet, self.weights, state), lora.applied(unet):
            run.context_tokens.append(entry)
            run.notes.append(f"face ID: {self.num_faces} face(s), scale {self.scale:g}, {state.num_tokens} tokens "
                             f"after the text ({self.weights.kind})")
            try:
                yield
            finally:
                run.context_tokens.remove(entry)
