"""The whole tiny model tree the demo and the tests use: every kit, one models root."""

from __future__ import annotations

from pathlib import Path

from .sd15 import TinyTree, write_tiny_model_tree


def write_demo_tree(root: str | Path, seed: int = 0) -> TinyTree:
    """Write every tiny model the pack can load into ``root`` (ComfyUI folder layout): the SD1.5
    set, the OpenPose ControlNet, the motion modules and the DWPose ONNX pair (needs ``onnx``)."""
    from .pose_onnx import write_dwpose_models

    tree = write_tiny_model_tree(root, seed)
    detector, pose = write_dwpose_models(Path(root) / "tcan" / "pose")
    tree.files["dwpose_detector"], tree.files["dwpose_pose"] = Path(detector), Path(pose)
    return tree
