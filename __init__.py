"""ComfyUI-TCAN: pose-driven human image animation (TCAN, TPC, ID-Animator, TIFF, DiffSFSR).

ComfyUI imports this file; it registers the pack's nodes and its web extension. Importing is
cheap: no model is loaded and nothing is downloaded. ``tcan_core`` (the library) is made
importable by adding this folder to ``sys.path``.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
