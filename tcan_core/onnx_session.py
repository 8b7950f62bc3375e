"""The one onnxruntime helper for pose and face models: which execution providers a torch device asks for,
and a session that really runs where it says.

A device string means the same for every ONNX model of the pack: ``cuda`` / ``cuda:N`` asks for
the CUDA provider on GPU N (then the CPU as fallback), ``cpu`` for the CPU only, and no device (the
face tools' default) for CUDA when onnxruntime has it, then the CPU.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_ORT_DTYPES = {"tensor(float16)": np.float16, "tensor(uint8)": np.uint8, "tensor(double)": np.float64}


def _onnxruntime():
    return importlib.import_module("onnxruntime")


def cuda_device_id(device: str) -> int | None:
    """The CUDA device index of a torch device string ("cuda" -> 0, "cuda:1" -> 1), None for others."""
    kind, _, index = str(device).partition(":")
    if kind != "cuda":
        return None
    return int(index) if index.isdigit() else 0


def providers_for(device: str | None, available: list[str]) -> list[Any]:
    """Execution providers for ``device`` among ``available``: CUDA first (with its device id) when asked and there."""
    if device is None:
        return [p for p in (CUDA, CPU) if p in available]
    device_id = cuda_device_id(device)
    if device_id is not None and CUDA in available:
        return [(CUDA, {"device_id": device_id}), CPU]
    return [CPU]


def shape_of(arg) -> list:
    """The declared shape of a session input or output (symbolic dimensions as they are), [] when unknown."""
    return list(arg.shape) if arg.shape is not None else []


def is_dynamic(dim) -> bool:
    """True for a symbolic or unset dimension."""
    return not isinstance(dim, int) or dim <= 0


def _probe_feed(session) -> dict[str, np.ndarray]:
    """Zeros for every input, dynamic dimensions set to 1."""
    return {a.name: np.zeros([1 if is_dynamic(d) else d for d in shape_of(a)], _ORT_DTYPES.get(a.type, np.float32))
            for a in session.get_inputs()}


def open_session(path: str, device: str = "cpu", published: str = "where the model is published"):
    """An onnxruntime session for ``path`` and the provider it really runs on.

    On a ``cuda`` device CUDA is asked for first. onnxruntime-gpu lists CUDA as available even
    when its libraries cannot load; it then builds the session on the CPU without failing. So the
    session's own provider list is read back, and a CUDA session must also run once on zeros
    before it is trusted; otherwise the CPU is used.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model file not found: {path}")
    ort = _onnxruntime()
    attempts: list[list] = [[CPU]]
    wanted = providers_for(device, ort.get_available_providers())
    if wanted[0] != CPU:
        attempts.insert(0, wanted)
    error: Exception | None = None
    for providers in attempts:
        asked_cuda = providers[0] != CPU
        try:
            session = ort.InferenceSession(path, providers=providers)
        # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...) with no common base
        except Exception as exc:  # noqa: BLE001
            error = exc
            continue
        used = session.get_providers()
        if asked_cuda and CUDA in used:
            try:
                session.run(None, _probe_feed(session))
            except Exception as exc:  # noqa: BLE001
                log.warning("CUDA session for %s failed its first run (%s); using the CPU", path, exc)
                continue
        elif asked_cuda:
            log.warning("onnxruntime could not load CUDA for %s; using the CPU", path)
        return session, used[0]
    raise ValueError(f"{path} could not be opened as an ONNX model ({error}); the file may be "
                     f"damaged or not an ONNX file. Download it again from {published}.")
