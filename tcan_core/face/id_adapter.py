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
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..animation import attention
from ..models.errors import ModelFormatError, WrongBaseModelError
from ..models.lora import LoraPatch, LoraWeights, ParsedLora, appa_coverage
from ..models.state_dict import fit_problems, format_keys, load_state_dict_file, load_strict, shapes_of

log = logging.getLogger(__name__)

DEFAULT_SCALE = 0.8
ID_ANIMATOR_DIM_HEAD = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEEDED_ENCODER = "CLIP ViT-H/14 image encoder (hidden size 1280; ID-Animator's image_encoder folder)"
LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
_SDXL_CONTEXT = 2048
_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


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


@dataclass(frozen=True, eq=False)
class IDAnimatorWeights:
    """A parsed animator.ckpt: the Resampler, per-``attn2`` face projections and the LoRA on q, k, v, out."""

    layout: str
    resampler: Resampler
    layers: Mapping[str, FaceLayer]
    lora: ParsedLora
    source: str
    slots: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "slots", MappingProxyType(dict(self.slots)))

    @property
    def embedding_dim(self) -> int:
        return self.resampler.embedding_dim

    @property
    def num_tokens(self) -> int:
        return self.resampler.num_queries

    def describe(self) -> str:
        ranks = "/".join(str(w.rank) for w in {w.rank: w for w in self.lora.weights.values()}.values())
        return (f"ID-Animator face adapter from {self.source} ({self.layout} keys): {self.num_tokens} face tokens "
                f"from a width-{self.embedding_dim} image encoder, on {len(self.layers)} cross-attention layers, "
                f"LoRA rank {ranks or 'none'}")


def cross_attention_slots(unet: nn.Module) -> dict[str, int]:
    """``attn2`` module path -> its index in the authors' ``unet.attn_processors`` list (down, up, mid blocks;
    attn1 before attn2), ignoring temporal/motion attention as the authors' UNet does."""
    from diffusers.models.attention_processor import Attention

    found: list[tuple[int, int, str]] = []
    for order, (name, module) in enumerate(unet.named_modules()):
        parts = name.split(".")
        if (not isinstance(module, Attention) or parts[-1] not in ("attn1", "attn2") or "transformer_blocks" not in parts
                or "motion_modules" in parts or parts[0] not in _BLOCK_ORDER):
            continue
        found.append((_BLOCK_ORDER[parts[0]], order, name))
    found.sort()
    slots = {name: i for i, (_, _, name) in enumerate(found) if name.endswith(".attn2")}
    if not slots:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) in transformer blocks; the face "
                         "adapter needs an SD1.5 UNet (UNet2DConditionModel or UNetMotionModel).")
    return slots


def _split_layout(sd: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict, dict]:
    """('grouped' or 'flat', Resampler keys, adapter keys) from the checkpoint's key prefixes."""
    layouts = {"grouped": ("image_proj.", "face_adapter."), "flat": ("image_proj_model.", "adapter_modules.")}
    keys = {k.removeprefix("module."): v for k, v in sd.items()}
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


def _check_context_width(adapter: Mapping[str, torch.Tensor], proj_out: torch.Tensor | None, context: int,
                         source: str) -> None:
    widths = {int(v.shape[1]) for k, v in adapter.items() if k.endswith("to_k_face.weight") and v.ndim == 2}
    if proj_out is not None:
        widths.add(int(proj_out.shape[0]))
    if _SDXL_CONTEXT in widths:
        raise WrongBaseModelError(f"{source} is a face adapter for SDXL (cross-attention width {_SDXL_CONTEXT}), "
                                  f"and the TCAN model is SD1.5 (width {context}); use ID-Animator's SD1.5 "
                                  "animator.ckpt.")
    if widths - {context}:
        raise WrongBaseModelError(f"{source}: its cross-attention width is {sorted(widths)}, the TCAN UNet's is "
                                  f"{context}; the adapter is for another base model than this SD1.5 UNet.")


def parse_id_animator_state_dict(sd: Mapping[str, torch.Tensor], unet: nn.Module, source: str = "animator.ckpt",
                                 dim_head: int = ID_ANIMATOR_DIM_HEAD) -> IDAnimatorWeights:
    """An animator.ckpt state dict (either key layout) -> Resampler + per-``attn2`` weights of ``unet``, strictly."""
    layout, proj_sd, adapter_sd = _split_layout(sd, source)
    context = int(unet.config.cross_attention_dim)
    _check_context_width(adapter_sd, proj_sd.get("proj_out.weight"), context, source)

    resampler = Resampler(**resampler_config(proj_sd, source, dim_head))
    load_strict(resampler, proj_sd, "ID-Animator Resampler (image_proj)", source)
    resampler.eval().requires_grad_(False)

    slots = cross_attention_slots(unet)
    expected: dict[str, tuple[int, ...]] = {}
    for path, i in slots.items():
        attn = unet.get_submodule(path)
        inner, width = attn.to_k.out_features, attn.to_k.in_features
        query_in = attn.to_q.in_features
        for proj in ("to_k_face", "to_v_face"):
            expected[f"{i}.{proj}.weight"] = (inner, width)
        lora_in = {"to_q": query_in, "to_k": width, "to_v": width, "to_out": inner}
        lora_out = {"to_q": inner, "to_k": inner, "to_v": inner, "to_out": attn.to_out[0].out_features}
        for proj in LORA_PROJECTIONS:
            down = adapter_sd.get(f"{i}.{proj}_lora.down.weight")
            rank = int(down.shape[0]) if down is not None and down.ndim == 2 else -1
            expected[f"{i}.{proj}_lora.down.weight"] = (rank, lora_in[proj])
            expected[f"{i}.{proj}_lora.up.weight"] = (lora_out[proj], rank)
    problems = fit_problems(shapes_of(adapter_sd), expected, owner="UNet needs")
    if problems:
        raise ModelFormatError(f"{source}: the face adapter weights do not fit this UNet's {len(slots)} "
                               f"cross-attention layers (numbered as the authors' unet.attn_processors): {problems}")
    bad = [k for k, v in adapter_sd.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
    if bad:
        raise ModelFormatError(f"{source}: {format_keys(bad)} hold NaN/inf or are not floating point; the file is "
                               "corrupt.")

    layers, lora = {}, {}
    for path, i in slots.items():
        layers[path] = FaceLayer(adapter_sd[f"{i}.to_k_face.weight"], adapter_sd[f"{i}.to_v_face.weight"])
        for proj in LORA_PROJECTIONS:
            target = f"{path}.{proj}" + (".0" if proj == "to_out" else "")
            # LoRALinearLayer without network_alpha: scale 1, i.e. alpha = None.
            lora[target] = LoraWeights(adapter_sd[f"{i}.{proj}_lora.down.weight"],
                                       adapter_sd[f"{i}.{proj}_lora.up.weight"], None)
    parsed_lora = ParsedLora("id-animator", lora, source, (), appa_coverage(lora, unet))
    weights = IDAnimatorWeights(layout, resampler, layers, parsed_lora, source, slots)
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


class FaceAttnProcessor:
    """``attn2`` processor of ID-Animator: context = [text ; face], output = Attn(q, text) + scale * Attn(q, face).

    The last ``state.num_tokens`` context tokens are the face tokens; text attention uses the module's
    own to_k / to_v, face attention ``to_k_face`` / ``to_v_face``. With no face tokens, or scale 0
    (face tokens split off and dropped), the operations are those of diffusers ``AttnProcessor2_0``.
    """

    def __init__(self, state: FaceState, to_k_face: torch.Tensor, to_v_face: torch.Tensor) -> None:
        self.state = state
        self.to_k_face = to_k_face
        self.to_v_face = to_v_face

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        """[B,N,C] (or [B,C,H,W]) with context [B,T+n,D] -> same shape as ``hidden_states``."""
        face = None
        n = self.state.num_tokens
        if encoder_hidden_states is not None and n > 0:
            total = encoder_hidden_states.shape[1]
            if total <= n:
                raise ValueError(f"the face adapter expects text tokens followed by {n} face tokens, got a context "
                                 f"of {total} tokens; append the face tokens with append_face_tokens")
            encoder_hidden_states, face = encoder_hidden_states[:, :total - n], encoder_hidden_states[:, total - n:]
            if attention_mask is not None and attention_mask.shape[-1] == total:
                attention_mask = attention_mask[..., :total - n]
            if self.state.scale == 0:
                face = None

        prepared = attention.begin(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query, key, value = attention.project(attn, prepared.hidden_states, encoder_hidden_states)
        hidden_states = attention.multi_head_attention(attn, query, key, value, prepared.attention_mask)
        if face is not None:
            hidden_states = hidden_states + self.state.scale * self._face_attention(attn, query, face)
        return attention.finish(attn, hidden_states, prepared.residual, prepared.shape_4d)

    def _face_attention(self, attn: Any, query: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        """Attention of the query [B,N,inner] over the face tokens [B|1,n,D] -> [B,N,inner]."""
        face = face.expand(query.shape[0], -1, -1).to(query.dtype)
        key = F.linear(face, self.to_k_face.to(face))
        value = F.linear(face, self.to_v_face.to(face))
        return attention.multi_head_attention(attn, query, key, value)


@contextlib.contextmanager
def face_attention_installed(unet: nn.Module, weights: IDAnimatorWeights, state: FaceState) -> Iterator[None]:
    """:class:`FaceAttnProcessor` on every ``attn2`` of ``unet`` for the block; the exact original processors after."""
    saved: dict[str, Any] = {}
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    try:
        for path, layer in weights.layers.items():
            attn = unet.get_submodule(path)
            saved[path] = attn.processor
            attn.set_processor(FaceAttnProcessor(state, layer.to_k_face.to(device, dtype),
                                                 layer.to_v_face.to(device, dtype)))
        yield
    finally:
        for path, processor in saved.items():
            unet.get_submodule(path).set_processor(processor)


def append_face_tokens(context: torch.Tensor, face_tokens: torch.Tensor | None) -> torch.Tensor:
    """[B,T,C] text context and [1,n,C] (or [B,n,C]) face tokens -> [B,T+n,C], text first; None -> unchanged."""
    if face_tokens is None:
        return context
    if context.ndim != 3 or face_tokens.ndim != 3 or face_tokens.shape[-1] != context.shape[-1]:
        raise ValueError(f"context must be [B,T,C] and face tokens [1,n,C] with the same C, got "
                         f"{list(context.shape)} and {list(face_tokens.shape)}")
    if face_tokens.shape[0] not in (1, context.shape[0]):
        raise ValueError(f"face tokens must have batch 1 or the context's batch {context.shape[0]}, got "
                         f"{face_tokens.shape[0]}")
    face = face_tokens.to(context).expand(context.shape[0], -1, -1)
    return torch.cat([context, face], dim=1)


# --- image encoder ----------------------------------------------------------------------------


def check_image_encoder(encoder: nn.Module, weights: IDAnimatorWeights) -> None:
    """ValueError unless the encoder's width is the Resampler's input width."""
    width = int(getattr(encoder.config, "hidden_size", -1))
    if width != weights.embedding_dim:
        needed = NEEDED_ENCODER if weights.embedding_dim == 1280 else f"an image encoder of width {weights.embedding_dim}"
        raise ValueError(f"the image encoder has width {width}, but the face adapter {weights.source} needs "
                         f"{needed}; load the image encoder the adapter was trained with.")


@torch.no_grad()
def clip_image_embeddings(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Face crops [N,H,W,3] in 0..1 -> CLIP penultimate hidden states [N,tokens,width] (ID-Animator's input)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N,H,W,3] face crops with values in 0..1, got {list(images.shape)}")
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


@torch.no_grad()
def face_tokens(weights: IDAnimatorWeights, embeddings: torch.Tensor, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CLIP embeddings [n_faces,tokens,E] -> face tokens [1,Q,C]: the Resampler per face, then the mean over
    faces (ID-Animator averages the projected tokens of several reference faces)."""
    resampler = weights.resampler
    home = next(resampler.parameters())
    resampler.to(device)
    try:
        tokens = resampler(embeddings.to(device, home.dtype))
    finally:
        resampler.to(home.device)
    return tokens.mean(dim=0, keepdim=True).to(dtype)


_MISSING = object()


@dataclass(frozen=True, eq=False)
class FaceIDPatch:
    """ID-Animator face adapter on the denoising UNet (key ``face_id``).

    ``embeddings``: CLIP ViT-H/14 penultimate hidden states of the reference face crops
    [n_faces, tokens, 1280] (:func:`clip_image_embeddings`); several faces are averaged after the
    Resampler. ``uncond_embeddings`` (optional, [1, tokens, 1280], :func:`clip_uncond_embeddings`)
    gives the tokens for the unconditional half as the authors do; without it that half gets zero
    tokens, which add exactly nothing (to_k_face / to_v_face have no bias). ``scale`` weighs face
    attention (0.8 by default); 0 turns the adapter off entirely, its LoRA included.

    While applied, ``run.face_tokens`` [1,Q,C] and ``run.face_tokens_uncond`` [1,Q,C] hold the tokens
    (on ``run.device``, UNet dtype): every context the sampler passes to ``model.unet`` during the
    call must end with them (:func:`append_face_tokens`), since each ``attn2`` splits off the last Q
    tokens. The attributes are removed on exit.
    """

    weights: IDAnimatorWeights
    embeddings: torch.Tensor
    scale: float = DEFAULT_SCALE
    uncond_embeddings: torch.Tensor | None = None
    lora_strength: float = 1.0
    key: str = "face_id"

    def __post_init__(self) -> None:
        for name in ("scale", "lora_strength"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"face adapter {name} must be a finite number >= 0, got {getattr(self, name)!r}; "
                                 f"ID-Animator uses scale {DEFAULT_SCALE} and LoRA strength 1, and scale 0 turns "
                                 "the adapter off")
            object.__setattr__(self, name, value)
        embeddings = self.embeddings if self.embeddings.ndim == 3 else self.embeddings.unsqueeze(0)
        for name, tensor in (("embeddings", embeddings), ("uncond_embeddings", self.uncond_embeddings)):
            if tensor is None:
                continue
            if tensor.ndim != 3 or tensor.shape[0] < 1 or tensor.shape[-1] != self.weights.embedding_dim:
                raise ValueError(f"{name} must be image-encoder hidden states [n_faces,tokens,"
                                 f"{self.weights.embedding_dim}], got {list(tensor.shape)}; the adapter needs "
                                 + (NEEDED_ENCODER if self.weights.embedding_dim == 1280 else
                                    f"an image encoder of width {self.weights.embedding_dim}"))
        object.__setattr__(self, "embeddings", embeddings)

    @property
    def num_faces(self) -> int:
        return int(self.embeddings.shape[0])

    @contextlib.contextmanager
    def applied(self, model: Any, run: Any) -> Iterator[None]:
        unet = model.unet
        dtype = next(unet.parameters()).dtype
        tokens = face_tokens(self.weights, self.embeddings, run.device, dtype)
        uncond = (face_tokens(self.weights, self.uncond_embeddings, run.device, dtype)
                  if self.uncond_embeddings is not None else torch.zeros_like(tokens))
        state = FaceState(num_tokens=int(tokens.shape[1]), scale=self.scale)
        lora = LoraPatch(self.weights.lora, self.lora_strength if self.scale > 0 else 0.0)
        previous = {name: getattr(run, name, _MISSING) for name in ("face_tokens", "face_tokens_uncond")}
        with face_attention_installed(unet, self.weights, state), lora.applied(unet):
            run.face_tokens, run.face_tokens_uncond = tokens, uncond
            run.notes.append(f"face ID: {self.num_faces} face(s), scale {self.scale:g}, "
                             f"{state.num_tokens} tokens after the text")
            try:
                yield
            finally:
                for name, value in previous.items():
                    if value is _MISSING:
                        delattr(run, name)
                    else:
                        setattr(run, name, value)
