"""ComfyUI-TCAN: pose-driven human image animation (TCAN, TPC, ID-Animator, TIFF, DiffSFSR).

ComfyUI imports this file; it registers the pack's nodes and its web extension. Importing is
cheap: no model is loaded and nothing is downloaded. ``tcan_core`` (the library) is imported
from this folder, also when a ``pip install``-ed copy of it sits in site-packages.
"""

import logging
import os
import sys

log = logging.getLogger(__name__)

_here = os.path.dirname(os.path.abspath(__file__))

if "tcan_core" not in sys.modules:
    # This folder goes first only while tcan_core itself is imported: for good it is appended,
    # since its nodes/ package would hide ComfyUI's own nodes.py if it came first.
    sys.path.insert(0, _here)
    try:
        import tcan_core  # noqa: F401
    finally:
        sys.path.remove(_here)
if _here not in sys.path:
    sys.path.append(_here)

_library = os.path.dirname(os.path.realpath(sys.modules["tcan_core"].__file__))
if os.path.normcase(_library) != os.path.normcase(os.path.realpath(os.path.join(_here, "tcan_core"))):
    log.warning(
        "ComfyUI-TCAN: tcan_core was already imported from %s, not from this pack (%s); its nodes may not "
        "match it. Remove the other copy (pip uninstall comfyui-tcan) or update both to one version.",
        _library, _here)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
