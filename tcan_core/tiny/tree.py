"""The whole tiny model tree the demo and the tests use: every kit, one models root."""

from __future__ import annotations

from pathlib import Path

from .sd15 import TinyTree, write_tiny_model_tree


def write_demo_tree(root: str | Path, seed: int = 0) -> TinyTree:
    """Write every tiny model the pack can load into ``root`` (ComfyUI folder layout)."""
    return write_tiny_model_tree(root, seed)
