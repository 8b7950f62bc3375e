"""Base model families: one module of facts per base (:mod:`.sd15`); the lowest layer of tcan_core."""

from .facts import BaseModelFacts, base_by_block_widths, base_by_context_width
from .sd15 import SD15

__all__ = ["SD15", "BaseModelFacts", "base_by_block_widths", "base_by_context_width"]
