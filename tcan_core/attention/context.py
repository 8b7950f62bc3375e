"""Extra tokens appended after the text context (face adapters), and splitting them off again."""

from __future__ import annotations

import torch


def append_tokens(context: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """[B,T,C] text context and [1,n,C] (or [B,n,C]) extra tokens -> [B,T+n,C], text first; None -> unchanged."""
    if tokens is None:
        return context
    if context.ndim != 3 or tokens.ndim != 3 or tokens.shape[-1] != context.shape[-1]:
        raise ValueError(f"context must be [B,T,C] and face tokens [1,n,C] with the same C, got "
                         f"{list(context.shape)} and {list(tokens.shape)}")
    if tokens.shape[0] not in (1, context.shape[0]):
        raise ValueError(f"face tokens must have batch 1 or the context's batch {context.shape[0]}, got "
                         f"{tokens.shape[0]}")
    extra = tokens.to(context).expand(context.shape[0], -1, -1)
    return torch.cat([context, extra], dim=1)
