"""Model folders and model slots: where each file the pack reads lives (DESIGN.md section 5).

This module is the single place that names folders, their file extensions and the files each
slot expects. ComfyUI's bridge (``nodes/host.py``) registers these folders with ``folder_paths``;
the command line resolves them under a ``--models DIR`` root with :class:`ModelFolders`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping


WEIGHT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
ONNX_EXTENSIONS = (".onnx",)

# folder name -> (default sub-folders of the models root, file extensions).
# Names match ComfyUI's folder_paths keys so users' existing folders are reused.
FOLDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "checkpoints": (("checkpoints",), WEIGHT_EXTENSIONS),
    "controlnet": (("controlnet",), WEIGHT_EXTENSIONS),
    "animatediff_models": (("animatediff_models",), WEIGHT_EXTENSIONS),
    "loras": (("loras",), WEIGHT_EXTENSIONS),
    "tcan": (("tcan",), WEIGHT_EXTENSIONS + ONNX_EXTENSIONS),
    "tcan_pose": (("tcan/pose", "annotator"), ONNX_EXTENSIONS + WEIGHT_EXTENSIONS),
    "insightface": (("insightface",), ONNX_EXTENSIONS),
    "clip_vision": (("clip_vision",), WEIGHT_EXTENSIONS),
    "ipadapter": (("ipadapter",), WEIGHT_EXTENSIONS),
    "tcan_metrics": (("tcan/metrics",), WEIGHT_EXTENSIONS),
}

# Folders comfyui_controlnet_aux downloads its annotators into, relative to the models root's
# parent (its default is custom_nodes/comfyui_controlnet_aux/ckpts); searched so users do not
# download pose models twice.
CONTROLNET_AUX_CKPT_DIRS = ("custom_nodes/comfyui_controlnet_aux/ckpts",)

# A folder also searched in (a sub-folder of) every directory of another folder: DWPose files
# anywhere under a ``tcan`` folder (its default place is ``tcan/pose``) are found wherever that
# folder is, including one set for ``tcan`` in extra_model_paths.yaml.
SUB_FOLDERS: dict[str, tuple[tuple[str, str], ...]] = {"tcan_pose": (("tcan", ""),)}


def with_sub_folders(folder: str, own: Iterable[str], paths_of: Callable[[str], Iterable[str]]) -> list[str]:
    """``own`` directories of ``folder`` followed by its sub-folders of other folders (:data:`SUB_FOLDERS`), once each."""
    out: list[str] = []
    linked = [os.path.join(p, sub) if sub else str(p) for parent, sub in SUB_FOLDERS.get(folder, ())
              for p in paths_of(parent)]
    for d in [*own, *linked]:
        if os.path.normpath(d) not in {os.path.normpath(o) for o in out}:
            out.append(d)
    return out


@dataclass(frozen=True)
class Slot:
    """One model file the pack can use: what it is, where it goes, and where it is published."""

    key: str
    title: str
    folder: str
    expected: tuple[str, ...]
    published: str
    kind: str
    required: bool = True
    extra_folders: tuple[str, ...] = field(default_factory=tuple)


SLOTS: tuple[Slot, ...] = (
    Slot(
        "sd15", "SD1.5 base checkpoint", "checkpoints",
        ("v1-5-pruned-emaonly.safetensors", "any SD1.5 fine-tune (.safetensors/.ckpt or a diffusers folder)"),
        "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sd15",
    ),
    Slot(
        "controlnet", "OpenPose ControlNet (SD1.5)", "controlnet",
        ("control_v11p_sd15_openpose.pth", "control_v11p_sd15_openpose_fp16.safetensors"),
        "https://huggingface.co/lllyasviel/ControlNet-v1-1 (fp16 safetensors: "
        "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors)",
        "controlnet",
    ),
    Slot(
        "motion", "AnimateDiff motion module (SD1.5)", "animatediff_models",
        ("mm_sd_v15_v2.ckpt", "v3_sd15_mm.ckpt", "mm_sd_v15.ckpt"),
        "https://huggingface.co/guoyww/animatediff",
        "motion",
    ),
    Slot(
        "tcan", "TCAN trained parts (optional: appearance UNet, stage-2 UNet, ControlNetT)", "tcan",
        ("*.ckpt / *.safetensors written by TCAN training",),
        "no public TCAN weights exist; train them with the pack or the authors' code "
        "(https://github.com/eccv2024tcan/TCAN)",
        "tcan", required=False,
    ),
    Slot(
        "dwpose", "DWPose pose detector (ONNX)", "tcan_pose",
        ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
        "https://huggingface.co/yzd-v/DWPose",
        "onnx_pair",
    ),
    Slot(
        "openpose", "OpenPose body/hand networks (optional backend)", "tcan_pose",
        ("body_pose_model.pth", "hand_pose_model.pth"),
        "https://huggingface.co/lllyasviel/Annotators",
        "files", required=False,
    ),
    Slot(
        "insightface", "insightface model pack (face detection + 512-d identity)", "insightface",
        ("models/antelopev2/*.onnx", "models/buffalo_l/*.onnx"),
        "the insightface project's model packs (antelopev2 or buffalo_l)",
        "insightface", required=False,
    ),
    Slot(
        "face_swap", "Face swap model for TCAN Face Pass (optional; its licence is yours to check)", "insightface",
        ("inswapper_128.onnx",),
        "the insightface project's inswapper_128.onnx (published for non-commercial research use)",
        "files", required=False,
    ),
    Slot(
        "clip_vision", "CLIP ViT-H/14 image encoder (for ID-Animator)", "clip_vision",
        ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "model.safetensors"),
        "https://huggingface.co/h94/IP-Adapter (models/image_encoder)",
        "files", required=False,
    ),
    Slot(
        "id_adapter", "Face ID adapter (ID-Animator or IP-Adapter FaceID SD1.5)", "tcan",
        ("animator.ckpt", "ip-adapter-faceid_sd15.bin"),
        "https://huggingface.co/ID-Animator/ID-Animator, https://huggingface.co/h94/IP-Adapter-FaceID",
        "files", required=False, extra_folders=("ipadapter",),
    ),
    # The evaluation metrics' feature networks (tcan_core.metrics.weights names the same files; a metric
    # whose file is missing is left out of the evaluation). Also read from the torch hub cache.
    *(Slot(f"metrics_{key}", f"{title} for {metric} (optional, evaluation only)", "tcan_metrics", names, url,
           "metrics", required=False)
      for key, title, metric, names, url in (
          ("inception", "Inception-v3 (pytorch-fid)", "FID", ("pt_inception-2015-12-05-6726825d.pth",),
           "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"),
          ("alexnet", "AlexNet (torchvision)", "LPIPS", ("alexnet-owt-7be5be79.pth",),
           "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
          ("resnet3d50", "3D ResNet-50 (Kinetics)", "FID-VID", ("resnet-50-kinetics.pth", "r3d50_K_200ep.pth"),
           "https://github.com/kenshohara/3D-ResNets-PyTorch"),
          ("i3d", "I3D (Kinetics-400)", "FVD", ("i3d_pretrained_400.pt",), "https://github.com/wilson1yan/VideoGPT"),
      )),
)


class ModelFolders:
    """Resolves folder names to directories under one models root (outside ComfyUI).

    ``extra`` maps a folder name to more directories to search, after the root's own.
    """

    def __init__(self, root: str | os.PathLike | None, extra: Mapping[str, Iterable[str]] | None = None):
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.extra = {k: [str(Path(p)) for p in v] for k, v in (extra or {}).items()}

    def paths(self, folder: str) -> list[str]:
        """Directories searched for ``folder``, in order."""
        if folder not in FOLDERS:
            raise KeyError(f"unknown model folder {folder!r}; known: {', '.join(FOLDERS)}")
        out: list[str] = []
        if self.root is not None:
            out += [str(self.root / sub) for sub in FOLDERS[folder][0]]
            if folder == "tcan_pose":
                out += [str(self.root.parent / d) for d in CONTROLNET_AUX_CKPT_DIRS]
        out += self.extra.get(folder, [])
        if folder in SUB_FOLDERS:
            out = with_sub_folders(folder, out, self.paths)
        return out

    def extensions(self, folder: str) -> tuple[str, ...]:
        return FOLDERS[folder][1]

    def list(self, folder: str) -> list[str]:
        """Relative names of the model files (and diffusers folders) found for ``folder``."""
        return list_model_files(self.paths(folder), self.extensions(folder))

    def resolve(self, folder: str, name: str) -> str:
        """Full path of ``name`` inside one of ``folder``'s directories; never outside them."""
        return resolve_in_folders(folder, name, self.paths(folder))


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (``model_index.json``) or a single diffusers model folder."""
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "config.json").is_file())


def list_model_files(dirs: Iterable[str], extensions: Iterable[str]) -> list[str]:
    """Files with one of ``extensions`` (and diffusers folders) below ``dirs``, as relative names.

    Symbolic links to files and folders are followed, as ComfyUI's own loaders follow them; a
    broken link is not listed, so every name listed is one :func:`resolve_in_folders` finds.
    """
    exts = tuple(e.lower() for e in extensions)
    found: set[str] = set()
    for d in dirs:
        base = Path(d)
        if not base.is_dir():
            continue
        visited: set[str] = set()
        for dirpath, subdirs, files in os.walk(base, followlinks=True):
            here = Path(dirpath)
            real = os.path.realpath(here)
            if real in visited:
                # A link back to a folder already walked (a loop): its files are listed once.
                subdirs[:] = []
                continue
            visited.add(real)
            if here != base and is_diffusers_folder(here):
                found.add(here.relative_to(base).as_posix())
                subdirs[:] = []
                continue
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]
            for f in files:
                if f.lower().endswith(exts) and (here / f).is_file():
                    found.add((here / f).relative_to(base).as_posix())
    return sorted(found)


def model_join(directory: str | os.PathLike, name: str, folder: str = "model") -> Path:
    """``directory / name`` for a model name from a widget or the command line.

    The *name* may not leave the folder (no absolute path, no ``..``), but symbolic links inside
    the folder are followed: the folder's owner placed them there, as users do to keep models on
    another drive, and ComfyUI's own loaders follow them too.
    """
    if not name or os.path.isabs(name) or ".." in Path(name).parts or Path(name).drive:
        raise ValueError(
            f"model name {name!r} must be a path relative to the {folder!r} model folder "
            f"(no absolute paths, no '..')"
        )
    return Path(os.path.abspath(directory)) / name


def resolve_in_folders(folder: str, name: str, dirs: Iterable[str]) -> str:
    """Full path of ``name`` (a file or a diffusers folder) inside ``dirs``.

    Names that would leave the folder (absolute paths, ``..``) are refused, so a widget value
    can never point elsewhere on disk; links placed inside the folder are followed (see :func:`model_join`).
    """
    dirs = list(dirs)
    for d in dirs:
        candidate = model_join(d, name, folder)
        if candidate.is_file() or is_diffusers_folder(candidate):
            return str(candidate)
    searched = "\n  ".join(dirs) if dirs else "(no folders registered)"
    hints = "".join(f"\n{slot.title}: expected {', '.join(slot.expected)}; published at {slot.published}"
                    for slot in SLOTS if folder in (slot.folder, *slot.extra_folders))
    raise FileNotFoundError(
        f"model {name!r} was not found in the {folder!r} folder. Searched:\n  {searched}\n"
        f"Put the file in one of these folders (or add a folder for {folder!r} in "
        f"extra_model_paths.yaml).{hints}"
    )
