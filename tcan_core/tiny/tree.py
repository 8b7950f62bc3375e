"""The whole tiny model tree the demo and the tests use: every kit, one models root."""

from __future__ import annotations

from pathlib import Path

from .sd15 import TinyTree, write_tiny_model_tree


def write_demo_tree(root: str | Path, seed: int = 0) -> TinyTree:
    """Write every tiny model the pack can load into ``root`` (ComfyUI folder layout): the SD1.5
    set, the OpenPose ControlNet, the motion modules, APPA LoRAs, the TCAN checkpoints in the
    authors' and the pack's layouts, the DWPose ONNX pair and the face kit (needs ``onnx``)."""
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
    tree.files.update(write_face_models(root, unet))
    return tree


def write_face_models(root: str | Path, unet) -> dict[str, Path]:
    """The face kit in ComfyUI's folders: insightface packs (buffalo_l, antelopev2) and a swap model,
    ID-Animator's animator.ckpt (models/tcan), IP-Adapter FaceID (models/ipadapter) and the CLIP image
    encoder (models/clip_vision)."""
    from .face_adapter import write_tiny_clip_vision, write_tiny_id_animator, write_tiny_ip_faceid
    from .face_onnx import write_tiny_face_pack, write_tiny_inswapper

    root = Path(root)
    return {
        "face_pack_buffalo_l": write_tiny_face_pack(root, "buffalo_l"),
        "face_pack_antelopev2": write_tiny_face_pack(root, "antelopev2"),
        "inswapper": write_tiny_inswapper(root),
        "id_animator": write_tiny_id_animator(root / "tcan" / "animator.ckpt", unet),
        "ip_faceid": write_tiny_ip_faceid(root / "ipadapter" / "ip-adapter-faceid_sd15.bin", unet),
        "clip_vision": write_tiny_clip_vision(root / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    }
