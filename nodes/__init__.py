"""Node registration: each ``nodes_<topic>.py`` module contributes its own mappings.

A topic module that fails to import (a broken install, say) is logged and skipped, so the rest
of the pack and ComfyUI keep working. Optional dependencies never fail an import: nodes that
need them import them when they run and say what to install.
"""

import importlib
import logging

from . import host

log = logging.getLogger(__name__)

TOPICS = (
    "nodes_setup",
    "nodes_pose_extract",
    "nodes_pose",
    "nodes_pose_edit",
    "nodes_tpc",
    "nodes_model",
    "nodes_comfy_model",
    "nodes_sampler",
    "nodes_face",
    "nodes_metrics",
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

host.register_model_folders()

for _topic in TOPICS:
    try:
        _mod = importlib.import_module(f".{_topic}", __name__)
    except Exception:
        log.exception("ComfyUI-TCAN: could not load %s; its nodes are disabled", _topic)
        continue
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
