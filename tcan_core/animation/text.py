"""Text conditioning for the sampler: checks on ComfyUI's CONDITIONING and a headless empty prompt.

TCAN samples with empty prompts on both sides of guidance. Headless (the command line, the demo,
the tests) the empty prompt is encoded without tokenizer files: CLIP's tokenizer turns "" into
the start token followed by end tokens to 77 positions (SD1.5's tokenizer pads with the end token).
"""

from __future__ import annotations

import math

import torch

from ..bases import SD15, base_by_context_width

SD15_CONTEXT_WIDTH = SD15.context_width
CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_LENGTH = SD15.context_tokens


def empty_prompt_ids(batch: int = 1) -> torch.Tensor:
    """Token ids of the empty prompt, [batch, 77]: BOS then EOS padding."""
    ids = torch.full((batch, CLIP_LENGTH), CLIP_EOS, dtype=torch.long)
    ids[:, 0] = CLIP_BOS
    return ids


@torch.no_grad()
def encode_empty_prompt(text_encoder: torch.nn.Module) -> torch.Tensor:
    """Last hidden states of a CLIP text model for the empty prompt, [1, 77, width]."""
    device = next(text_encoder.parameters()).device
    return text_encoder(empty_prompt_ids().to(device))[0]


def check_context(context: torch.Tensor, name: str, width: int = SD15_CONTEXT_WIDTH) -> torch.Tensor:
    """Validate text conditioning [1, tokens, width] for an SD1.5 UNet; -> the same tensor."""
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{name} conditioning must be a tensor [1, tokens, {width}], got {shape}; "
                         "connect a CLIPTextEncode output")
    if context.shape[-1] != width:
        base = base_by_context_width(int(context.shape[-1]))
        raise ValueError(f"{name} conditioning is {context.shape[-1]} wide, which is {base}'s text encoder; "
                         f"the TCAN model is SD1.5 and needs {width}-wide CLIP-L conditioning. Encode the "
                         "prompt with the CLIP of an SD1.5 checkpoint (Load Checkpoint -> CLIPTextEncode).")
    if context.shape[0] != 1:
        raise ValueError(f"{name} conditioning has a batch of {context.shape[0]}; give one prompt per side")
    return context


def match_token_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat two contexts [1, n*77, C] along tokens to a common length (as ComfyUI does for long prompts)."""
    if a.shape[1] == b.shape[1]:
        return a, b
    length = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, length // a.shape[1], 1), b.repeat(1, length // b.shape[1], 1)
