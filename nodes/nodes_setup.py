"""Set-up nodes: check which model files the pack can see, from inside ComfyUI."""

from __future__ import annotations

from tcan_core.doctor import format_report, run_doctor

from . import host
from .common import CATEGORY, with_report


class TCANModelCheck:
    """Runs ``python -m tcan_core doctor`` inside ComfyUI and shows its report on the node."""

    DESCRIPTION = (
        "Lists, for every model the pack uses (SD1.5 checkpoint, OpenPose ControlNet, AnimateDiff "
        "motion module, pose detector, face models, ...), the files ComfyUI's model folders hold, what "
        "each file is (read from its keys, not its name) and, for anything missing, which folders were "
        "searched, which file names fit and where the file is published."
    )
    CATEGORY = f"{CATEGORY}/setup"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "check"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inspect_files": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Read each file's keys to tell what it is (SD1.5 or SDXL, motion module "
                               "version, ...). Off: list files by name only, which is faster on slow disks.",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, inspect_files):
        return float("nan")

    def check(self, inspect_files: bool):
        report = format_report(run_doctor(host.model_folders(), inspect=inspect_files))
        return with_report(report, (report,))


NODE_CLASS_MAPPINGS = {"TCANModelCheck": TCANModelCheck}
NODE_DISPLAY_NAME_MAPPINGS = {"TCANModelCheck": "TCAN Model Check"}
