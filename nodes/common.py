"""Small pieces every node module shares: categories, optional imports, widget helpers."""

from __future__ import annotations

import importlib
from types import ModuleType

CATEGORY = "TCAN"

# import name -> what to pip install for it
OPTIONAL_PACKAGES = {
    "onnxruntime": "onnxruntime-gpu (or onnxruntime on a machine without CUDA)",
    "insightface": "insightface",
    "controlnet_aux": "controlnet_aux",
}


def require(module: str, node: str) -> ModuleType:
    """Import an optional dependency, or raise an error that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = OPTIONAL_PACKAGES.get(module, module)
        raise RuntimeError(
            f"{node} needs the Python package '{module}', which is not installed or failed to "
            f"import ({exc}). Install it into ComfyUI's Python with: pip install {package}"
        ) from exc


def with_report(text: str, result: tuple) -> dict:
    """A node return value that also shows ``text`` on the node (web/tcan.js displays it)."""
    return {"ui": {"text": [text]}, "result": result}
