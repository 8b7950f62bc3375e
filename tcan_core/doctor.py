"""``doctor``: which model files the pack can see, what each one is, and what is missing.

Files are classified from their keys and shapes (headers only where the format allows), never
from their names. For a slot with nothing usable the report says which folders were searched,
which file names fit and where the file is published.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .bases import SD15 as SD15_FACTS
from .model_folders import SLOTS, ModelFolders, Slot
from .models.controlnet import check_controlnet
from .models.detect import guess_other_kind
from .models.errors import ModelFileError, ModelFormatError
from .models.motion_module import check_motion_module
from .models.sd15 import check_sd15
from .models.state_dict import read_shapes
from .models.tcan_ckpt import (APPEARANCE_UNET, KIND_DESCRIPTIONS, KIND_NODES, TCAN_UNET, TEMPORAL_CONTROLNET, UNKNOWN,
                               detect_tcan_checkpoint, strip_module_prefix)

log = logging.getLogger(__name__)

# Slots whose files users name freely: every file in the folder is classified by its keys.
_CLASSIFIED_BY_CONTENT = ("clip_vision", "id_adapter")


@dataclass
class FoundFile:
    name: str
    path: str
    what: str
    usable: bool


@dataclass
class SlotReport:
    slot: Slot
    searched: list[str]
    files: list[FoundFile] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return any(f.usable for f in self.files)


# Why a recognised file is not taken, for the slots whose files are told apart by content.
_CLIP_H_WIDTH = 1280


def _classify_weights(slot: Slot, path: Path) -> tuple[str, bool]:
    """(description, usable) for one weights file or diffusers folder in ``slot``.

    The SD1.5 checkpoint, ControlNet and motion-module slots run their loaders' own checks
    (keys, shapes, base model), so a file marked usable here is one the loader accepts.
    """
    if slot.kind == "sd15":
        return check_sd15(path).describe(), True
    if slot.kind == "controlnet":
        return check_controlnet(path).describe(), True
    if slot.kind == "motion":
        return check_motion_module(path).describe(), True
    if path.is_dir():
        return "a folder (not a model file this slot reads)", False
    if slot.kind == "metrics":
        from .metrics.weights import describe, identify

        kind = identify(read_shapes(path))
        return describe(kind), kind == slot.key[len("metrics_"):]
    if path.suffix.lower() == ".onnx":
        return "an ONNX model (its role is read when the node loads it)", True
    shapes = read_shapes(path)
    if slot.kind == "tcan":
        adapter = _face_adapter_kind(shapes, path)
        if adapter is not None:
            return f"{adapter} face adapter (not taken by this slot): choose it in TCAN Face ID", False
        kind = detect_tcan_checkpoint(strip_module_prefix(shapes, str(path)))
        if kind == UNKNOWN:
            return f"{guess_other_kind(shapes)}; not taken: not a TCAN checkpoint", False
        usable = kind in (APPEARANCE_UNET, TCAN_UNET, TEMPORAL_CONTROLNET)
        return f"{KIND_DESCRIPTIONS[kind]}" + ("" if usable else " (not taken by this slot)") + f": {KIND_NODES[kind]}", usable
    if slot.key == "clip_vision":
        patch = next((s for k, s in shapes.items() if k.endswith("patch_embedding.weight")), None)
        if patch is None:
            return f"{guess_other_kind(shapes)}; not taken: this slot needs a CLIP image encoder", False
        width = int(patch[0])
        size = {1280: "ViT-H/14", 1024: "ViT-L/14", 1664: "ViT-bigG/14"}.get(width, f"width {width}")
        if width != _CLIP_H_WIDTH:
            return (f"CLIP vision encoder {size}; not taken: ID-Animator and IP-Adapter FaceID need ViT-H/14 "
                    f"(width {_CLIP_H_WIDTH}), this one has width {width}"), False
        return f"CLIP vision encoder {size}", True
    if slot.key == "id_adapter":
        name = _face_adapter_kind(shapes, path)
        if name is None:
            kind = detect_tcan_checkpoint(strip_module_prefix(shapes, str(path)))
            other = KIND_DESCRIPTIONS[kind] if kind != UNKNOWN else guess_other_kind(shapes)
            return f"{other}; not taken: this slot needs a face adapter", False
        widths = {s[1] for k, s in shapes.items() if k.endswith(("to_k_ip.weight", "to_k_face.weight"))}
        width = ", ".join(str(w) for w in sorted(widths)) or "unknown"
        what = f"{name} face adapter (cross-attention width {width})"
        if widths != {SD15_FACTS.context_width}:
            return f"{what}; not taken: SD1.5 needs cross-attention width {SD15_FACTS.context_width}", False
        return what, True
    return guess_other_kind(shapes), True


def _face_adapter_kind(shapes: dict, path: Path) -> str | None:
    """'ID-Animator' or 'IP-Adapter FaceID' when the file is a face adapter, else None."""
    from .face.adapters import detect_face_adapter

    try:
        kind = detect_face_adapter(shapes, str(path))
    except ModelFormatError:
        return None
    return {"id-animator": "ID-Animator", "ip-adapter-faceid": "IP-Adapter FaceID"}.get(kind, kind)


def _insightface_packs(names: list[str]) -> dict[str, list[str]]:
    """``models/<pack>/*.onnx`` files grouped by pack (antelopev2, buffalo_l)."""
    packs: dict[str, list[str]] = {}
    for n in names:
        parts = Path(n).parts
        if len(parts) >= 3 and parts[-3] == "models" and parts[-2] in ("antelopev2", "buffalo_l"):
            packs.setdefault(parts[-2], []).append(parts[-1])
    return packs


def _inspect(slot: Slot, folders: ModelFolders, inspect: bool) -> SlotReport:
    searched = [*slot.extra_folders, slot.folder]
    report = SlotReport(slot, [d for f in searched for d in folders.paths(f)])
    names = sorted({n for f in searched for n in folders.list(f)})
    wanted = {Path(e).name for e in slot.expected}
    if slot.kind == "insightface":
        for pack, files in sorted(_insightface_packs(names).items()):
            report.files.append(FoundFile(f"models/{pack}", "", f"{len(files)} ONNX files", True))
        return report
    if slot.kind == "onnx_pair":
        hits = _unique(folders, searched, [n for n in names if Path(n).name in wanted])
        complete = wanted <= {Path(n).name for n in hits}
        missing = ", ".join(sorted(wanted - {Path(n).name for n in hits}))
        report.files += [FoundFile(n, "", "ONNX" + ("" if complete else f"; not taken: its pair {missing} is missing"),
                                   complete) for n in hits]
        return report
    if slot.kind == "files" and slot.key not in _CLASSIFIED_BY_CONTENT:
        names = [n for n in names if Path(n).name in wanted]
    else:
        names = [n for n in names if not n.endswith(".onnx")]
    for n in _unique(folders, searched, names):
        path = ""
        try:
            path = _resolve(folders, searched, n)
            what, ok = _classify_weights(slot, Path(path)) if inspect else ("not inspected", True)
        except (ModelFileError, OSError) as exc:
            what, ok = f"unreadable: {_without_path(exc, path)}", False
        except ModelFormatError as exc:
            what, ok = f"refused by the loader: {_without_path(exc, path)}", False
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not hide the rest of the report
            log.debug("doctor could not read %s", n, exc_info=True)
            what, ok = f"unreadable: {type(exc).__name__}: {_without_path(exc, path)}", False
        report.files.append(FoundFile(n, path, what, ok))
    return report


def _without_path(exc: Exception, path: str) -> str:
    """A loader's message with the file's full path shortened: the report already names the file."""
    text = str(exc)
    if not path:
        return text
    return text.replace(f"{path}: ", "").replace(path, "the file")


def _resolve(folders: ModelFolders, searched: list[str], name: str) -> str:
    for folder in searched:
        try:
            return folders.resolve(folder, name)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{name} is listed but cannot be opened in {', '.join(searched)} "
                            "(a broken link, or it was removed while the check ran)")


def _unique(folders: ModelFolders, searched: list[str], names: list[str]) -> list[str]:
    """``names`` without a second name for a file already listed (a folder searched inside another)."""
    seen: set[str] = set()
    out = []
    # The shortest name of a file wins: the one relative to the innermost folder searched.
    for n in sorted(names, key=lambda n: (len(Path(n).parts), n)):
        try:
            key = os.path.abspath(_resolve(folders, searched, n))
        except (FileNotFoundError, ValueError):
            key = n
        if key not in seen:
            seen.add(key)
            out.append(n)
    return sorted(out)


def run_doctor(folders: ModelFolders, inspect: bool = True) -> list[SlotReport]:
    """One report per model slot of DESIGN.md section 5."""
    return [_inspect(slot, folders, inspect) for slot in SLOTS]


LEGEND = (
    "How to read this report: [ok] a usable file was found for the model; [MISSING] the model is required "
    "and no usable file was found; [optional, not found] the model is optional and no usable file was found. "
    "Under each model: '+' a file the pack can use, '-' a file that is there but not taken, with the reason."
)


def format_report(reports: list[SlotReport]) -> str:
    """A plain-text report: per slot, what was found and, where nothing usable was, what to do."""
    lines = [LEGEND, ""]
    for r in reports:
        mark = "ok" if r.found else ("MISSING" if r.slot.required else "optional, not found")
        lines.append(f"[{mark}] {r.slot.title}")
        for f in r.files:
            lines.append(f"    {'+' if f.usable else '-'} {f.name}: {f.what}")
        if not r.found:
            lines.append("    searched: " + (", ".join(r.searched) if r.searched else "(no folders)"))
            lines.append("    expected: " + ", ".join(r.slot.expected))
            lines.append("    published at: " + r.slot.published)
    missing = [r.slot.title for r in reports if r.slot.required and not r.found]
    lines.append("")
    lines.append("All required models found." if not missing else f"Missing required models: {'; '.join(missing)}.")
    return "\n".join(lines)
