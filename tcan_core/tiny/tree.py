"""The whole tiny model tree the demo and the tests use: every kit, one models root."""

from __future__ import annotations

from pathlib import Path

from .sd15 import TinyTree, write_tiny_model_tree


def write_demo_tree(root: str | Path, seed: int = 0) -> TinyTree:
    """Write every tiny model the pack can load into ``root`` (ComfyUI folder layout): the SD1.5
    set, the OpenPose ControlNet, the motion modules, APPA LoRAs, the TCAN checkpoints in the
    authors' and the pack's layouts and the DWPose ONNX pair (needs ``onnx``)."""
    from .lora import write_tiny_loras
    from .pose_onnx import write_dwpose_models
    from .tcan_ckpt import write_tiny_tcan_models

    tree = write_tiny_model_tree(root, seed)
    detector, pose = write_dwpose_models(Path(root) / "tcan" / "pose")
    tree.files["dwpose_detector"], tree.files["dwpose_pose"] = Path(detector), Path(pose)
    unet = tree.modules["unet"]
    loras = write_tiny_loras(Path(root) / "loras", unet, layouts=("peft", "kohya"), seed=seed)
    tree.files.update({f"lora_{layout}": path for layout, path in loras.files.items()})
    tcan = write_tiny_tcan_models(root, unet, tree.modules["controlnet"], tree.modules["motion_v2"], seed)
    tree.files.update({f"tcan_{name}": path for name, path in tcan.items()})
    return tree
