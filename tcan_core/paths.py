"""Joining user-given names to a folder without ever leaving it."""

from __future__ import annotations

import os
from pathlib import Path


def safe_join(directory: str | os.PathLike, name: str, what: str = "file") -> Path:
    """``directory / name``, refusing names that would leave ``directory`` (absolute, ``..``, links out)."""
    base = Path(directory).resolve()
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ValueError(f"{what} {name!r} must be a path relative to {str(base)!r} "
                         "(no absolute paths, no '..')")
    candidate = (base / name).resolve()
    if base != candidate and base not in candidate.parents:
        raise ValueError(f"{what} {name!r} points outside {str(base)!r}; pick a file inside that folder")
    return candidate
