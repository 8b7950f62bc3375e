"""One composable attention processor: an ordered list of contributions per attention.

Every feature that changes attention (TCAN's reference attention with TPC's calibrated keys, TCAN's
PTM, the face adapters) is a :class:`Contribution`; the :class:`ComposedAttnProcessor` on an
attention runs diffusers' ``AttnProcessor2_0`` (:mod:`.steps`) and lets each contribution act at
its hook point, in order:

1. :meth:`Contribution.context_tokens`: tokens taken off the end of the context (a face adapter's
   face tokens; the last contribution takes the last tokens);
2. :meth:`Contribution.check`: refuse inputs the contribution cannot handle;
3. :meth:`Contribution.observe`: see the normed tokens (the reference pass stores them);
4. :meth:`Contribution.query_scale` and :meth:`Contribution.chunk_rows`: a per-row query scale
   (PTM divides the logits by T) and independent row chunks (temporal attention);
5. :meth:`Contribution.attend`: replace plain attention of q, k, v (reference/TPC: extra keys and
   values with masks); the first contribution that answers wins;
6. :meth:`Contribution.branch`: an extra attention added to the output (a face adapter's
   ``scale * Attn(q, face)``); all branches are added, in order, so two face adapters stack.

With no contribution acting, the operations are exactly ``AttnProcessor2_0``'s. Each feature's
own processor class (``ReferenceAttnProcessor``, ``PTMAttnProcessor``, ``FaceAttnProcessor``) is
this processor with itself as the first contribution; :func:`contributing` adds a contribution to
an attention for a ``with`` block, appending to the composed processor already there, or installing
one and restoring the original processor object after.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch

from . import steps

log = logging.getLogger(__name__)


class Contribution:
    """One feature's part in an attention call; every hook does nothing unless a subclass overrides it."""

    def context_tokens(self) -> int:
        """How many tokens at the end of the context belong to this contribution (0: none)."""
        return 0

    def check(self, hidden_states: torch.Tensor) -> None:
        """Raise a ValueError when this contribution cannot handle ``hidden_states``."""

    def observe(self, hidden_states: torch.Tensor) -> None:
        """See the attention's input tokens [B,N,C] after its own norms."""

    def query_scale(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """A factor per row [B] for the query (after the q norm), or None."""
        return None

    def chunk_rows(self, rows: int, frames: int, channels: int, element_size: int) -> int | None:
        """Rows per chunk when rows are independent and may run in chunks, or None."""
        return None

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, row_scale: torch.Tensor | None) -> torch.Tensor | None:
        """Attention of q [B,N,inner] over k, v in place of the plain one, or None to leave it plain."""
        return None

    def branch(self, attn: Any, query: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """An extra attention output [B,N,inner] added to the result, given this contribution's context tokens."""
        return None


class ComposedAttnProcessor:
    """diffusers ``AttnProcessor2_0`` with an ordered list of :class:`Contribution` (see the module docstring)."""

    def __init__(self, contributions: list[Contribution] | None = None) -> None:
        self.contributions: list[Contribution] = list(contributions or [])

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        """[B,N,C] (or [B,C,H,W]) with an optional context [B,T(+extra),D] -> same shape as ``hidden_states``."""
        contributions = self.contributions
        taken: dict[int, torch.Tensor] = {}
        if encoder_hidden_states is not None:
            for index in range(len(contributions) - 1, -1, -1):
                count = contributions[index].context_tokens()
                if count <= 0:
                    continue
                total = encoder_hidden_states.shape[1]
                if total <= count:
                    raise ValueError(f"the face adapter expects text tokens followed by {count} face tokens, got a "
                                     f"context of {total} tokens; append the face tokens with append_face_tokens")
                encoder_hidden_states, taken[index] = (encoder_hidden_states[:, :total - count],
                                                       encoder_hidden_states[:, total - count:])
                if attention_mask is not None and attention_mask.shape[-1] == total:
                    attention_mask = attention_mask[..., :total - count]
        for contribution in contributions:
            contribution.check(hidden_states)

        prepared = steps.begin(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        hidden_states = prepared.hidden_states
        for contribution in contributions:
            contribution.observe(hidden_states)
        scale = None
        for contribution in contributions:
            factor = contribution.query_scale(hidden_states)
            if factor is not None:
                scale = factor if scale is None else scale * factor

        rows = hidden_states.shape[0]
        chunk = rows
        if hidden_states.ndim == 3:
            width = max(hidden_states.shape[2], int(getattr(attn, "inner_dim", hidden_states.shape[2])))
            for contribution in contributions:
                wanted = contribution.chunk_rows(rows, hidden_states.shape[1], width, hidden_states.element_size())
                if wanted is not None:
                    chunk = min(chunk, wanted)
        if chunk >= rows:
            return self._attend(attn, hidden_states, prepared.residual, encoder_hidden_states,
                                prepared.attention_mask, scale, taken, prepared.shape_4d)
        # Rows are independent (each is one location's frames): projections, attention and output
        # projection of one chunk are written out before the next starts.
        out = None
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            result = self._attend(
                attn, hidden_states[part], prepared.residual[part],
                None if encoder_hidden_states is None else encoder_hidden_states[part],
                None if prepared.attention_mask is None else prepared.attention_mask[part],
                None if scale is None else scale[part],
                {i: t[part] if t.shape[0] == rows else t for i, t in taken.items()}, None)
            if out is None:
                out = result.new_empty((rows, *result.shape[1:]))
            out[part] = result
            del result
        return out

    def _attend(self, attn: Any, hidden_states: torch.Tensor, residual: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                scale: torch.Tensor | None, taken: dict[int, torch.Tensor],
                shape_4d: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Projections, attention (a contribution's or plain), branches and the output projection of some rows."""
        query, key, value = steps.project(attn, hidden_states, encoder_hidden_states)
        out = None
        for contribution in self.contributions:
            out = contribution.attend(attn, query, key, value, attention_mask, scale)
            if out is not None:
                break
        if out is None:
            out = steps.multi_head_attention(attn, query, key, value, attention_mask, row_scale=scale)
        for index, contribution in enumerate(self.contributions):
            extra = contribution.branch(attn, query, taken.get(index))
            if extra is not None:
                out = out + extra
        # Free q, k, v before the output projection: they are most of the peak.
        del query, key, value
        return steps.finish(attn, out, residual, shape_4d)


@contextlib.contextmanager
def contributing(module: torch.nn.Module, paths: dict[str, Contribution],
                 make_processor: Callable[[Contribution], ComposedAttnProcessor]) -> Iterator[None]:
    """Add each ``paths[path]`` contribution to the attention at ``path`` of ``module`` for the ``with`` block.

    An attention that already has a :class:`ComposedAttnProcessor` gets the contribution appended
    to its list (and taken out after); any other gets ``make_processor(contribution)``, and its own
    processor object back after. Also on error.
    """
    undo: list[Callable[[], None]] = []
    try:
        for path, contribution in paths.items():
            attn = module.get_submodule(path)
            current = attn.processor
            if isinstance(current, ComposedAttnProcessor):
                current.contributions.append(contribution)
                undo.append(lambda p=current, c=contribution: _remove(p, c))
            else:
                attn.set_processor(make_processor(contribution))
                undo.append(lambda a=attn, p=current: a.set_processor(p))
        yield
    finally:
        for step in reversed(undo):
            step()


def _remove(processor: ComposedAttnProcessor, contribution: Contribution) -> None:
    processor.contributions = [c for c in processor.contributions if c is not contribution]
