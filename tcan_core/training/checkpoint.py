"""Training checkpoints and weight files, written whole or not at all.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` with the trained parameters in float32
(``trainable.safetensors``), the optimizer's state (``optimizer.safetensors``: its tensors, with the
rest of the state dict as JSON in the file's metadata), and ``state.json`` (step, settings, the
loss scaler). Everything is safetensors or JSON, so resuming never unpickles a file. The folder
is written under a temporary name and renamed when complete; a run killed while writing leaves
the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_TENSOR = "__tensor__"


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors.partial", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, name,
                  metadata=dict(metadata) if metadata else None)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write JSON to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json.partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
    return path


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """An optimizer state dict -> (its tensors by path, the same structure as JSON with tensor references)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {_TENSOR: path}
        if isinstance(value, Mapping):
            return {"__keys__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")]
                                 for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)],
                    "__tuple__": isinstance(value, tuple)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store optimizer state of type {type(value).__name__} at {path}")

    return tensors, walk(state, "s")


def _unflatten_optimizer(structure: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(structure, dict):
        if _TENSOR in structure:
            return tensors[structure[_TENSOR]]
        if "__keys__" in structure:
            return {_unflatten_optimizer(k, tensors): _unflatten_optimizer(v, tensors) for k, v in structure["__keys__"]}
        if "__list__" in structure:
            items = [_unflatten_optimizer(v, tensors) for v in structure["__list__"]]
            return tuple(items) if structure["__tuple__"] else items
    return structure


def checkpoint_folders(out: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``out/checkpoints`` as (step, folder), oldest first."""
    root = Path(out) / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_FOLDER.match(child.name)
            if match and (child / STATE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(out: Path, step: int, trainable: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
                    state: Mapping[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` under ``out/checkpoints`` (whole or not at all); keep the newest ``keep``."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    partial = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    try:
        save_safetensors(partial / TRAINABLE, {k: v.float() for k, v in trainable.items()})
        tensors, structure = _flatten_optimizer(optimizer)
        save_safetensors(partial / OPTIMIZER, tensors, {"structure": json.dumps(structure)})
        write_json(partial / STATE, dict(state, step=step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    for _, old in checkpoint_folders(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint of step %d written to %s", step, final)
    return final


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable tensors, optimizer state dict, state) from a checkpoint folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [name for name in (TRAINABLE, OPTIMIZER, STATE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder} lacks {', '.join(missing)}; it is incomplete. Delete it to "
                                "resume from the one before, or start again with --overwrite")
    trainable = load_file(folder / TRAINABLE)
    with safe_open(folder / OPTIMIZER, framework="pt") as handle:
        structure = json.loads(handle.metadata()["structure"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    optimizer = _unflatten_optimizer(structure, tensors)
    state = json.loads((folder / STATE).read_text())
    return trainable, optimizer, state
