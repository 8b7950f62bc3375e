"""tcan_core: the library behind ComfyUI-TCAN (pose-driven human image animation).

It never imports ComfyUI; everything it needs from a host comes in as plain arguments.
Run ``python -m tcan_core --help`` (or ``tcan --help`` after ``pip install``) for the command line.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "comfyui-tcan"


def _read_version() -> str:
    """The pack's version from its one source, ``pyproject.toml``: beside a clone, else the installed metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        text = ""
    # A regex, not tomllib: ComfyUI still runs on Python 3.10, which has no TOML reader.
    table = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.S | re.M)
    if table and re.search(rf'^name\s*=\s*"{DISTRIBUTION}"', table.group(1), re.M):
        found = re.search(r'^version\s*=\s*"([^"]+)"', table.group(1), re.M)
        if found:
            return found.group(1)
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        # A copy of the folder without its pyproject.toml and not installed by pip.
        return "0+unknown"


__version__ = _read_version()
