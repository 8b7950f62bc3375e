"""The bridge between the pack and its host: ComfyUI when it is there, plain torch when not.

Everything nodes need from the host goes through this module: device and dtype, free memory,
progress bars, the interrupt check and model-file lookup. Inside ComfyUI it uses
``comfy.model_management``, ``comfy.utils.ProgressBar`` and ``folder_paths``; outside it falls
back to torch devices, tqdm and a models root set with :func:`set_models_root` (the command
line's ``--models DIR``).
"""

from __future__ import annotations

import logging
import os
import torch

from tcan_core.model_folders import (
    CONTROLNET_AUX_CKPT_DIRS,
    FOLDERS,
    ModelFolders,
    list_model_files,
    resolve_in_folders,
    with_sub_folders,
)

log = logging.getLogger(__name__)

try:
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
except ImportError:
    _mm = _comfy_utils = _folder_paths = None

IN_COMFYUI = _folder_paths is not None

_fallback_folders = ModelFolders(os.environ.get("TCAN_MODELS_DIR"))


def set_models_root(root: str | os.PathLike | None) -> None:
    """Outside ComfyUI: search model folders under ``root`` (ignored inside ComfyUI)."""
    global _fallback_folders
    _fallback_folders = ModelFolders(root)


def register_model_folders() -> None:
    """Register the pack's model folders with ComfyUI, keeping paths users already added.

    Paths from ``extra_model_paths.yaml`` are registered before custom nodes load, so an
    existing entry keeps its paths and gains ours; its extensions are widened to ours.
    """
    if not IN_COMFYUI:
        return
    models_dir = _folder_paths.models_dir
    for name, (subdirs, exts) in FOLDERS.items():
        defaults = [os.path.join(models_dir, s) for s in subdirs]
        if name == "tcan_pose":
            base = os.path.dirname(models_dir)
            defaults += [os.path.join(base, d) for d in CONTROLNET_AUX_CKPT_DIRS]
        paths, old_exts = _folder_paths.folder_names_and_paths.get(name, ([], set()))
        paths = list(paths) + [p for p in defaults if p not in paths]
        _folder_paths.folder_names_and_paths[name] = (paths, set(old_exts) | set(exts))


def folder_paths_for(folder: str) -> list[str]:
    """Directories searched for a model folder."""
    if IN_COMFYUI:
        return with_sub_folders(folder, _folder_paths.get_folder_paths(folder), _folder_paths.get_folder_paths)
    return _fallback_folders.paths(folder)


def list_models(folder: str) -> list[str]:
    """Model names for a dropdown: files with the folder's extensions and diffusers folders."""
    return list_model_files(folder_paths_for(folder), FOLDERS[folder][1])


def model_path(folder: str, name: str) -> str:
    """Full path of a model chosen in a widget; resolved only inside the folder's directories."""
    return resolve_in_folders(folder, name, folder_paths_for(folder))


def model_folders() -> ModelFolders:
    """A tcan_core folder resolver that sees the same folders as the host."""
    if not IN_COMFYUI:
        return _fallback_folders
    return ModelFolders(None, {name: folder_paths_for(name) for name in FOLDERS})


def output_directory() -> str:
    """ComfyUI's output folder, or the current directory outside ComfyUI."""
    if IN_COMFYUI:
        return _folder_paths.get_output_directory()
    return os.getcwd()


def input_directory() -> str:
    """ComfyUI's input folder, or the current directory outside ComfyUI."""
    if IN_COMFYUI:
        return _folder_paths.get_input_directory()
    return os.getcwd()


def torch_device() -> torch.device:
    """The device models run on."""
    if IN_COMFYUI:
        return _mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    """Where weights wait when they are not in use."""
    if IN_COMFYUI:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def unet_dtype(device: torch.device | None = None) -> torch.dtype:
    """Compute dtype for the diffusion models on ``device``: half precision on GPUs, float32 on CPU."""
    device = device or torch_device()
    if IN_COMFYUI:
        return _mm.unet_dtype(device=device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def free_memory(bytes_needed: int, device: torch.device | None = None) -> None:
    """Ask the host to make room for ``bytes_needed`` on ``device`` (unloading its own models)."""
    device = device or torch_device()
    if IN_COMFYUI:
        _mm.free_memory(bytes_needed, device)
    elif device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device | None = None) -> int:
    """Free memory on ``device`` in bytes."""
    device = device or torch_device()
    if IN_COMFYUI:
        return int(_mm.get_free_memory(device))
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def soft_empty_cache() -> None:
    if IN_COMFYUI:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_interrupt() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """A progress bar over ``total`` steps: ComfyUI's bar on the node, else tqdm on the console.

    ``update(n, preview=None)`` advances by ``n``; ``preview`` is an optional IMAGE ``[H,W,3]``
    tensor in 0..1 shown on the node while it runs.
    """

    def __init__(self, total: int, desc: str = "TCAN"):
        self.total = max(int(total), 1)
        self.done = 0
        self._bar = None
        self._tqdm = None
        if IN_COMFYUI:
            self._bar = _comfy_utils.ProgressBar(self.total)
        else:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, leave=False, disable=None)

    def update(self, n: int = 1, preview: torch.Tensor | None = None) -> None:
        self.done = min(self.done + n, self.total)
        if self._bar is not None:
            if preview is not None:
                from PIL import Image

                arr = (preview.detach().float().clamp(0, 1) * 255).byte().cpu().numpy()
                self._bar.update_absolute(self.done, self.total, ("JPEG", Image.fromarray(arr), 512))
            else:
                self._bar.update_absolute(self.done, self.total)
        if self._tqdm is not None:
            self._tqdm.update(n)

    def step(self, n: int = 1) -> None:
        """Check for Cancel, then advance by ``n``: the ``callback(n)`` tcan_core loops take."""
        check_interrupt()
        self.update(n)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
