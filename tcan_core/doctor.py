"""``doctor``: which model files the pack can see, what each one is, and what is missing.

Files are classified from their keys and shapes (headers only where the format allows), never
from their names. For a slot with nothing usable the report says which folders were searched,
which file names fit and where the file is published.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .bases import SD15 as SD15_FACTS
from .model_folders import SLOTS, ModelFolders, Slot
from .models.controlnet import detect_controlnet_source
from .models.detect import SD15, Detection, detect_motion_module, guess_other_kind
from .models.errors import ModelFileError, ModelFormatError
from .models.sd15 import detect_sd15_source
from .models.state_dict import read_shapes

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


def _classify_weights(slot: Slot, path: Path) -> tuple[str, bool]:
    """(description, usable) for one weights file or diffusers folder in ``slot``."""
    if slot.kind == "sd15":
        det = detect_sd15_source(path)
        ok = det.kind == "checkpoint" and det.base == SD15 and det.details.get("in_channels", 4) == 4 \
            and "missing" not in det.details.values()
        return det.describe(), ok
    if slot.kind == "controlnet":
        det = detect_controlnet_source(path)
        return det.describe(), det.kind == "controlnet" and det.base == SD15
    if path.is_dir():
        return "a folder", False
    if path.suffix.lower() == ".onnx":
        return "an ONNX model (its role is read when the node loads it)", True
    shapes = read_shapes(path)
    if slot.kind == "motion":
        det: Detection = detect_motion_module(shapes)
        return det.describe(), det.kind == "motion" and det.base == SD15 and "version" in det.details
    if slot.key == "clip_vision":
        patch = next((s for k, s in shapes.items() if k.endswith("patch_embedding.weight")), None)
        if patch is None:
            return guess_other_kind(shapes), False
        size = {1280: "ViT-H/14", 1024: "ViT-L/14", 1664: "ViT-bigG/14"}.get(int(patch[0]), f"width {patch[0]}")
        return f"CLIP vision encoder {size}", int(patch[0]) == 1280
    if slot.key == "id_adapter":
        from .face.adapters import detect_face_adapter

        try:
            kind = detect_face_adapter(shapes, str(path))
        except ModelFormatError:
            return guess_other_kind(shapes), False
        widths = {s[1] for k, s in shapes.items() if k.endswith(("to_k_ip.weight", "to_k_face.weight"))}
        width = ", ".join(str(w) for w in sorted(widths)) or "unknown"
        name = {"id-animator": "ID-Animator", "ip-adapter-faceid": "IP-Adapter FaceID"}.get(kind, kind)
        return f"{name} face adapter (cross-attention width {width})", widths == {SD15_FACTS.context_width}
    return guess_other_kind(shapes), True


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
        hits = [n for n in names if Path(n).name in wanted]
        complete = wanted <= {Path(n).name for n in hits}
        report.files += [FoundFile(n, "", "ONNX" + ("" if complete else " (its pair is missing)"), complete)
                         for n in hits]
        return report
    if slot.kind == "files" and slot.key not in _CLASSIFIED_BY_CONTENT:
        names = [n for n in names if Path(n).name in wanted]
    else:
        names = [n for n in names if not n.endswith(".onnx")]
    for n in names:
        path = Path(_resolve(folders, searched, n))
        try:
            what, ok = _classify_weights(slot, path) if inspect else ("not inspected", True)
        except (ModelFileError, ModelFormatError, OSError, KeyError, ValueError) as exc:
            what, ok = f"unreadable: {exc}", False
        report.files.append(FoundFile(n, str(path), what, ok))
    return report


def _resolve(folders: ModelFolders, searched: list[str], name: str) -> str:
    for folder in searched:
        try:
            return folders.resolve(folder, name)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(name)


def run_doctor(folders: ModelFolders, inspect: bool = True) -> list[SlotReport]:
    """One report per model slot of DESIGN.md section 5."""
    return [_inspect(slot, folders, inspect) for slot in SLOTS]


def format_report(reports: list[SlotReport]) -> str:
    """A plain-text report: per slot, what was found and, where nothing usable was, what to do."""
    lines = []
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
