"""Reading tensors from model files safely, and loading them into modules strictly.

Files are recognised by their bytes, not their names: a safetensors header or a torch zip/pickle
archive. Torch archives are read only with ``torch.load(weights_only=True)``, which refuses
pickled Python objects that could run code.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .errors import ModelFileError, ModelFormatError

log = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]


def _container(path: Path) -> str:
    """'safetensors', 'torch-zip' or 'torch-legacy' from the first bytes of the file."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n < 100_000_000:
            return "safetensors"
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise ModelFileError(
        f"{path} is neither a safetensors file nor a PyTorch checkpoint (its first bytes are "
        f"{head[:8]!r}). It may be truncated, an HTML error page saved by a failed download, or "
        "another format; download the file again."
    )


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ModelFileError(f"{p} is a folder, not a model file; pass a .safetensors/.ckpt file "
                             "or use the loader for diffusers folders.")
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} does not exist")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p} is empty (0 bytes); download it again.")
    return p


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _unpickler_reason(exc: Exception) -> str:
    """The sentence of torch's weights-only refusal that says what the file holds, without terminal
    colour codes; torch's own advice (load with weights_only=False) is left out on purpose."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    reason = re.search(r"WeightsUnpickler error: (.*?\.)(?: Please| Check|$)", text)
    return reason.group(1) if reason else text


def _torch_load(p: Path, kind: str, map_location) -> object:
    try:
        return torch.load(p, map_location=map_location, weights_only=True, mmap=(kind == "torch-zip"))
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{p} holds pickled Python objects, not just tensors, so it was refused: the pack reads "
            f".ckpt/.pth files only with torch.load(weights_only=True) because pickles can run code "
            f"on your machine. Use the .safetensors version of this model, or convert the file "
            f"with a tool you trust. (torch said: {_unpickler_reason(exc)})"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{p} could not be read as a PyTorch checkpoint; it is probably "
                             f"truncated or corrupt: download it again. ({exc})") from exc


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _tensors_of(obj: object, p: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint, nested dicts flattened to dotted keys
    (``{"image_proj": {...}}`` -> ``image_proj.*``); a ``state_dict`` wrapper is unwrapped."""
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"{p} holds a {type(obj).__name__}, not a dictionary of tensors.")
    for wrapper in ("state_dict", "module", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and _flatten(inner):
            obj = inner
            break
    tensors = _flatten(obj)
    if not tensors:
        raise ModelFileError(f"{p} holds no tensors (keys: {', '.join(map(str, list(obj)[:8]))}).")
    return tensors


def load_state_dict_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or torch (.ckpt/.pth/.bin) file, on ``device``."""
    p = _check_path(path)
    kind = _container(p)
    if kind == "safetensors":
        # Plain reads, tensor by tensor: a memory map would keep every page it read counted next to the copies.
        lazy = LazyTensors(p)
        return {k: lazy[k].to(device) for k in lazy}
    return _tensors_of(_torch_load(p, kind, device), p)


def read_shapes(path: str | os.PathLike) -> Shapes:
    """Key -> shape of every tensor in a file, reading as little of it as the format allows."""
    p = _check_path(path)
    kind = _container(p)
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{p} is a truncated or corrupt safetensors file ({exc}); "
                                 "download it again.") from exc
    return {k: tuple(v.shape) for k, v in _tensors_of(_torch_load(p, kind, "cpu"), p).items()}


def shapes_of(sd: Mapping[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in sd.items()}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys that start with ``prefix``, with it removed (others are dropped)."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def format_keys(keys, limit: int = 8) -> str:
    """Sorted keys joined for an error message, the first ``limit`` of them and a count of the rest."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def fit_problems(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
                 owner: str = "model") -> str:
    """Missing, unexpected and wrong-shape keys of ``found`` against ``expected`` (key -> shape), as one
    phrase for an error message; empty when they fit."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    wrong = [f"{k} (file {list(found[k])}, {owner} {list(expected[k])})"
             for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {format_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {format_keys(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es): {format_keys(wrong, 4)}")
    return "; ".join(parts)


def load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, source: str | os.PathLike) -> None:
    """Load ``sd`` into ``module`` only if keys and shapes match exactly; else name the differences.

    Parameters of ``module`` may live on the meta device (built empty); they are replaced by the
    file's tensors (``assign=True``), so nothing is initialised twice.
    """
    problems = fit_problems(shapes_of(sd), shapes_of(module.state_dict()))
    if problems:
        raise ModelFormatError(f"{source}: the weights do not fit the {what}: {problems}")
    module.load_state_dict(dict(sd), strict=True, assign=True)
    meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if meta:
        raise ModelFormatError(f"{source}: the {what} has tensors the file did not fill: {format_keys(meta)}")


# safetensors dtype names -> torch dtypes (the ones SD-family files use).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def _libc_madvise():
    """libc's ``madvise`` on Linux, else None (other systems keep the pages until the mapping is freed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def release_mapped_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages of a tensor read through ``torch.load(mmap=True, weights_only=True)`` -> bytes released.

    Such tensors live in a private (copy-on-write) file mapping; once a tensor has been copied
    (cast to another dtype or device), its pages would otherwise stay counted in the process's
    memory next to the copy until the whole file is closed. ``MADV_DONTNEED`` on unmodified
    private file pages only unmaps them: a later read maps the file's bytes again. Only whole pages
    inside the tensor's storage are released, so neighbouring tensors are never touched.
    """
    if _madvise is None:
        return 0
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    if _madvise(first, last - first, _MADV_DONTNEED) != 0:
        log.debug("madvise(MADV_DONTNEED) failed with errno %d; the pages stay until the file is closed",
                  ctypes.get_errno())
        return 0
    return last - first


class LazyTensors(Mapping):
    """Key -> tensor of a model file, each tensor read only when it is asked for.

    safetensors files are read with plain file reads (no memory map, whose touched pages would
    stay counted in the process's memory next to the copies made from them), one tensor at a
    time; torch archives are opened with ``torch.load(mmap=True, weights_only=True)``, so their
    tensors stay backed by the file until converted. ``shapes`` needs no tensor data.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _check_path(path)
        self.kind = _container(self.path)
        self._torch: dict[str, torch.Tensor] | None = None
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        if self.kind == "safetensors":
            self._read_header()
        else:
            self._torch = _tensors_of(_torch_load(self.path, self.kind, "cpu"), self.path)

    def _read_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            try:
                header = json.loads(fh.read(n))
                if not isinstance(header, dict):
                    raise ValueError(f"the header is a {type(header).__name__}")
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelFileError(f"{self.path} is a truncated or corrupt safetensors file (bad header: "
                                     f"{exc}); download it again.") from exc
        start = 8 + n
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ModelFileError(f"{self.path}: tensor {key} has the unsupported dtype {entry.get('dtype')!r}")
            begin, end = (start + int(o) for o in entry["data_offsets"])
            if end > size:
                raise ModelFileError(f"{self.path} is a truncated or corrupt safetensors file: tensor {key} ends at "
                                     f"byte {end} but the file has {size}; download it again.")
            self._entries[key] = (dtype, tuple(int(d) for d in entry["shape"]), begin, end)

    @property
    def shapes(self) -> Shapes:
        if self._torch is not None:
            return shapes_of(self._torch)
        return {k: e[1] for k, e in self._entries.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._torch is not None:
            return self._torch[key]
        dtype, shape, begin, end = self._entries[key]
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(begin)
            if fh.readinto(memoryview(out.numpy())) != end - begin:
                raise ModelFileError(f"{self.path} is a truncated or corrupt safetensors file (tensor {key} is cut "
                                     "short); download it again.")
        return out.view(dtype).reshape(shape)

    def release(self, key: str) -> None:
        """Give back the memory the tensor ``key`` holds once the caller has copied it (torch archives:
        its mapped file pages; safetensors reads are fresh buffers, freed when the caller drops them)."""
        if self.kind == "torch-zip" and self._torch is not None:
            release_mapped_pages(self._torch[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._torch if self._torch is not None else self._entries)

    def __len__(self) -> int:
        return len(self._torch if self._torch is not None else self._entries)


def _owner(module: torch.nn.Module, key: str) -> tuple[torch.nn.Module, str]:
    path, _, name = key.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def bind_tensors(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make ``module``'s parameters/buffers named in ``tensors`` these very tensors (no copy).

    A ``Parameter`` is bound as the same object, so moving either owner's module to a device moves
    both; a plain tensor is wrapped in a ``Parameter`` that shares its storage.
    """
    for key, tensor in tensors.items():
        owner, name = _owner(module, key)
        if name in owner._parameters:
            if not isinstance(tensor, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            owner._parameters[name] = tensor
        elif name in owner._buffers:
            owner._buffers[name] = tensor
        else:
            raise KeyError(f"{type(module).__name__} has no parameter or buffer {key}")


def unbind_tensors(module: torch.nn.Module) -> None:
    """Replace every parameter of ``module`` by an empty one on the meta device (same shape and dtype),
    dropping the references :func:`bind_tensors` made."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def is_bound(module: torch.nn.Module) -> bool:
    """True when no parameter of ``module`` is on the meta device (its weights are there to run)."""
    return not any(p.is_meta for p in module.parameters())


def assign_streamed(module: torch.nn.Module, source: Mapping[str, torch.Tensor], key_map: Mapping[str, str],
                    what: str, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> None:
    """Fill ``module`` (built on the meta device) key by key: module key -> ``source[key_map[key]]``,
    cast to ``dtype``/``device`` one tensor at a time, so only one extra tensor is ever held.

    Keys and shapes must fit exactly (checked before anything is read); a tensor already in the
    right dtype and device is used as it is, without a copy. A tensor that was copied is released
    from a :class:`LazyTensors` source right away (a torch archive's mapped pages would otherwise
    stay resident next to the copy).
    """
    expected = shapes_of(module.state_dict())
    source_shapes = source.shapes if isinstance(source, LazyTensors) else shapes_of(source)
    found = {k: source_shapes[v] for k, v in key_map.items() if v in source_shapes}
    missing_src = [v for v in key_map.values() if v not in source_shapes]
    problems = fit_problems(found, expected)
    if missing_src or problems:
        detail = problems or f"{len(missing_src)} key(s) not in the file: {format_keys(missing_src)}"
        raise ModelFormatError(f"{path}: the weights do not fit the {what}: {detail}")
    for key, src in key_map.items():
        tensor = source[src]
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        out = tensor.to(device=device, dtype=cast)
        bind_tensors(module, {key: out})
        if isinstance(source, LazyTensors) and out.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
            source.release(src)
        del tensor, out
    meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if meta:
        raise ModelFormatError(f"{path}: the {what} has tensors the file did not fill: {format_keys(meta)}")
