"""Key-name rules every loader shares: the training wrapper's ``module.`` prefix, and what a LoRA key is."""

from __future__ import annotations

import re
from typing import Iterable, Mapping, TypeVar

from .errors import ModelFormatError

WRAPPER_PREFIX = "module."
_PEFT_LORA = re.compile(r"\.lora_[AB](?:\.[^.]+)?\.weight$")

V = TypeVar("V")


def unwrapped_names(keys: Iterable[str]) -> list[str]:
    """Key names without the leading ``module.`` that DDP/accelerate wrappers add."""
    return [key.removeprefix(WRAPPER_PREFIX) for key in keys]


def strip_module_prefix(sd: Mapping[str, V], source: str) -> dict[str, V]:
    """A state dict with its keys unwrapped (:func:`unwrapped_names`); a key present both ways is an error."""
    out: dict[str, V] = {}
    for key, value in sd.items():
        name = key.removeprefix(WRAPPER_PREFIX)
        if name in out:
            raise ModelFormatError(f"{source} holds {name!r} both with and without the 'module.' prefix; "
                                   "save the model again from one (unwrapped) module.")
        out[name] = value
    return out


def is_lora_key(key: str) -> bool:
    """Whether ``key`` is a LoRA factor in peft, diffusers (also per-processor) or kohya naming."""
    return bool(_PEFT_LORA.search(key)) or key.startswith(("lora_unet_", "lora_te")) or ".lora." in key \
        or ".lora_linear_layer." in key or "_lora.down." in key or "_lora.up." in key
