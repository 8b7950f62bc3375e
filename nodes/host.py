"""The bridge between the pack and its host: ComfyUI when it is there, plain torch when not.

Everything nodes need from the host goes through this module: device and dtype, free memory,
progress bars, the interrupt check and model-file lookup. Inside ComfyUI it uses
``comfy.model_management``, ``comfy.utils.ProgressBar`` and ``folder_paths``; outside it falls
back to torch devices, tqdm and a models root set with :func:`set_models_root` (the command
line's ``--models DIR``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Iterator

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


def temp_directory() -> str:
    """ComfyUI's temp folder (served by /view as type "temp", emptied at start); outside ComfyUI
    ``$TCAN_TEMP_DIR`` or a folder in the system's temp directory."""
    if IN_COMFYUI:
        return _folder_paths.get_temp_directory()
    return os.environ.get("TCAN_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "tcan_temp")


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


# TCAN models built from ComfyUI's MODEL -------------------------------------------------------

COMFY_MODEL_PATCH = "comfy_model"


class ComfyModelWeights:
    """The patch a TCAN model from ComfyUI's MODEL carries: that MODEL (a clone, ComfyUI's clone semantics)
    and the map from each diffusers UNet parameter to its ``diffusion_model.`` key.

    The TCAN UNet is empty between calls; :func:`model_weights_loaded` binds the MODEL's weights into
    it for one sampling call, loaded and patched by ComfyUI itself.
    """

    key = COMFY_MODEL_PATCH

    def __init__(self, patcher, key_map: dict) -> None:
        self.patcher = patcher
        self.key_map = dict(key_map)

    @contextlib.contextmanager
    def applied(self, model, run) -> Iterator[None]:
        from tcan_core.animation.shared_unet import require_bound

        require_bound(model.unet, "TCAN model from MODEL")
        yield

    @contextlib.contextmanager
    def loaded(self, unet: torch.nn.Module) -> Iterator[None]:
        """ComfyUI loads the MODEL (whole, on its device) and applies its weight patches (LoRA loaders,
        merges) with ModelPatcher's own code; ``unet`` runs on those very tensors for the block. After
        it the patches are taken out again and the weights go back to ComfyUI's offload device."""
        from tcan_core.animation.shared_unet import unet_weights_bound

        patcher = self.patcher
        try:
            # A diffusers UNet cannot run ComfyUI's low-VRAM partial loads, so the MODEL is loaded whole.
            _mm.load_models_gpu([patcher], force_full_load=True)
            base = patcher.model
            with unet_weights_bound(unet, self.key_map,
                                    lambda key: _comfy_utils.get_attr(base, "diffusion_model." + key),
                                    comfy_model_dtype(patcher)):
                yield
        finally:
            patcher.unpatch_model(device_to=patcher.offload_device)


def comfy_model_dtype(model) -> torch.dtype:
    """The dtype the TCAN UNet runs a ComfyUI MODEL's weights in: their own dtype when torch computes in it
    (float32/float16/bfloat16: no copy), else ComfyUI's manual-cast dtype (float8 weights: a cast copy for
    the call). ComfyUI's manual cast of float16 weights to float32 on CPUs and old GPUs is not followed: it
    would hold a second, float32 copy of the UNet for every call."""
    base = model.model
    dtype = base.get_dtype()
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    return getattr(base, "manual_cast_dtype", None) or torch.float32


def tcan_model_from_comfy(model, appearance: str | None = None):
    """ComfyUI MODEL (+ optional appearance UNet file) -> (TCAN_MODEL sharing the MODEL's UNet weights, report).

    The MODEL is cloned (it is never changed); nothing of its weights is copied.
    """
    from tcan_core.animation.shared_unet import tcan_model_sharing_unet

    if not IN_COMFYUI or not hasattr(model, "clone") or not hasattr(model, "model_state_dict"):
        raise ValueError(f"model must be ComfyUI's MODEL (a ModelPatcher, e.g. Load Checkpoint's MODEL output), "
                         f"got {type(model).__name__}")
    patcher = model.clone()
    prefix = "diffusion_model."
    weights = {k[len(prefix):]: v for k, v in patcher.model_state_dict(prefix).items()}
    name = f"ComfyUI MODEL ({type(patcher.model).__name__})"
    tcan, key_map, report = tcan_model_sharing_unet({k: tuple(v.shape) for k, v in weights.items()},
                                                    comfy_model_dtype(patcher), name, base_weights=weights,
                                                    appearance=appearance)
    del weights
    patches = sum(1 for k in patcher.patches if k.startswith(prefix))
    if patches:
        report += f" {patches} UNet weight(s) carry ComfyUI patches (LoRA, merges), applied by ComfyUI at sampling."
    other = len(patcher.object_patches) + len(patcher.model_options.get("transformer_options", {}).get("patches", {})) \
        + len(patcher.model_options.get("transformer_options", {}).get("patches_replace", {}))
    if other:
        log.warning("TCAN Model from MODEL: %d non-weight patch(es) on the MODEL are not used", other)
        report += (f" {other} non-weight patch(es) of the MODEL (attention replacements, object patches, e.g. "
                   "IPAdapter or FreeU) do not reach the TCAN UNet; only weight patches do.")
    return tcan.with_patch(ComfyModelWeights(patcher, key_map)), report


@contextlib.contextmanager
def model_weights_loaded(tcan_model) -> Iterator[None]:
    """For one sampling call: the weights of a TCAN model from ComfyUI's MODEL bound and patched (no-op for
    a TCAN model loaded from files)."""
    patch = tcan_model.patch(COMFY_MODEL_PATCH)
    if patch is None:
        yield
        return
    with patch.loaded(tcan_model.unet):
        yield


# The pack's caches under ComfyUI's memory management ------------------------------------------

def _pack_caches() -> dict:
    """name -> (bytes held now, release function) for each cache the pack keeps between runs."""
    from tcan_core.face import analysis, clip_vision
    from tcan_core.pose import extract

    return {
        "CLIP image encoder": (clip_vision.clip_vision_cache_bytes(), clip_vision.clear_clip_vision_cache),
        "face analysis sessions": (analysis.analyzer_cache_bytes(), analysis.clear_analyzer_cache),
        "pose detector": (extract.backend_cache_bytes(), extract.clear_backend_cache),
    }


_registered_caches: dict[str, object] = {}
# Patchers ComfyUI has unloaded: kept until the next registration, because dropping the last reference
# inside ComfyUI's unload would run its cleanup while free_memory is still walking its list.
_released_caches: list[object] = []


def register_pack_caches() -> list[str]:
    """Put each filled cache of the pack (CLIP image encoder, face and pose sessions) under ComfyUI's model
    management, so that its free memory and "Unload models" release it like one of its own models.

    Each cache gets a ModelPatcher of its size around an empty module, loaded with ``load_models_gpu``;
    when ComfyUI unloads it (to make room, or on Unload models) its detach callback drops the cache.
    Outside ComfyUI nothing is registered. Returns the names registered by this call.
    """
    if not IN_COMFYUI:
        return []
    import comfy.model_patcher as mp

    _released_caches.clear()
    added = []
    for name, (size, release) in _pack_caches().items():
        if size <= 0 or name in _registered_caches:
            continue
        patcher = mp.ModelPatcher(torch.nn.Module(), load_device=torch_device(), offload_device=offload_device(),
                                  size=size)

        def on_detach(_patcher, _unpatch_all, name=name, release=release) -> None:
            held = _registered_caches.pop(name, None)
            if held is not None:
                _released_caches.append(held)
                release()
                log.info("ComfyUI-TCAN: %s released by ComfyUI's model management", name)

        patcher.add_callback(mp.CallbacksMP.ON_DETACH, on_detach)
        _registered_caches[name] = patcher
        _mm.load_models_gpu([patcher])
        added.append(name)
    return added
