"""The steps of diffusers' ``AttnProcessor2_0``, as pieces the pack's attention processors share.

The reference, PTM and face-ID processors each change one thing about attention (extra keys, a
scaled query, a second attention); everything else is diffusers' ``AttnProcessor2_0`` and must
stay bit-identical to it, so the steps live here once, in its order:
:func:`begin` (spatial norm, 4-D to tokens, mask preparation, group norm), :func:`project`
(q, k, v), :func:`multi_head_attention` (heads, q/k norms, fused SDPA) and :func:`finish`
(output projection, back to 4-D, residual, rescale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Prepared:
    """Inputs after :func:`begin`: tokens [B,N,C], the residual, the prepared mask and the 4-D shape if any."""

    hidden_states: torch.Tensor
    residual: torch.Tensor
    attention_mask: torch.Tensor | None
    shape_4d: tuple[int, int, int, int] | None


def begin(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
          attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> Prepared:
    """``AttnProcessor2_0`` up to the projections: [B,N,C] or [B,C,H,W] -> :class:`Prepared`."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape_4d = None
    if hidden_states.ndim == 4:
        shape_4d = tuple(hidden_states.shape)
        batch_size, channel, height, width = shape_4d
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return Prepared(hidden_states, residual, attention_mask, shape_4d)


def project(attn: Any, hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q from the tokens, k and v from the context (the tokens themselves when None); each [B,*,inner]."""
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


def multi_head_attention(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fused multi-head attention as ``AttnProcessor2_0`` runs it; q [R,N,inner], k, v [R,K,inner] -> [R,N,inner].

    ``row_scale`` [R] multiplies each row's query after the q norm, right before the dot product
    (TCAN's PTM divides the logits by T this way). It scales in place, so no second query is held:
    ``query`` itself is changed when there is no q norm.
    """
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query, key, value = (t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if row_scale is not None:
        query.mul_(row_scale.view(-1, 1, 1, 1))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(out.shape[0], -1, heads * head_dim).to(query.dtype)


def finish(attn: Any, hidden_states: torch.Tensor, residual: torch.Tensor,
           shape_4d: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Output projection, back to [B,C,H,W] when the input was 4-D, residual and rescale."""
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if shape_4d is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape_4d)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor
