"""Face nodes: Face Analysis, Face ID, Face Mix, Face Similarity, Character Image and Face Pass.

Thin over ``tcan_core.face`` (ID-Animator, IP-Adapter FaceID, TIFF). insightface and onnxruntime
are optional: they are imported when a node that needs them runs, which then says what to install.
"""

from __future__ import annotations

import json
import logging
import math

from tcan_core.face import build
from tcan_core.animation.sampler import SamplerSettings
from tcan_core.animation.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from tcan_core.face.id_adapter import DEFAULT_SCALE
from tcan_core.face.identity import combine_faces

from . import host
from .common import CATEGORY, with_report
from .nodes_sampler import conditioning_tensor, run_sampling, window_count

log = logging.getLogger(__name__)

FACE_CATEGORY = f"{CATEGORY}/face"
KNOWN_PACKS = ("antelopev2", "buffalo_l")
NONE = "none"
PACKS_DIR = "models/"
THRESHOLD_TOOLTIP = ("Detection score a face needs (insightface uses 0.5); lower it when a face is not found, "
                     "raise it when other things are taken for faces.")


def _analysis():
    """The face analysis module, after checking that insightface and onnxruntime import."""
    from tcan_core.face import analysis

    analysis.require_face_tools()
    return analysis


def face_packs() -> list[str]:
    """Model packs under models/insightface/models/, and the usual names even when absent (the error then
    says where to put them)."""
    from tcan_core.face.analysis import list_face_packs

    return sorted(set(list_face_packs(host.folder_paths_for("insightface"))) | set(KNOWN_PACKS))


def load_analyzer(face_pack: str):
    analysis = _analysis()
    pack = analysis.resolve_face_pack(host.folder_paths_for("insightface"), face_pack)
    analyzer = analysis.FaceAnalyzer.load(pack, device=str(host.torch_device()))
    host.register_pack_caches()
    return analysis, analyzer


def _pack_widget() -> tuple:
    return (face_packs(), {"default": "antelopev2",
                           "tooltip": "insightface model pack in models/insightface/models/ (antelopev2 or "
                                      "buffalo_l): its detector and 512-d recognition model."})


def _threshold_widget() -> tuple:
    return ("FLOAT", {"default": 0.5, "min": 0.05, "max": 0.99, "step": 0.01, "tooltip": THRESHOLD_TOOLTIP})


class TCANFaceAnalysis:
    DESCRIPTION = (
        "Finds the face in an image with insightface (models/insightface/models/antelopev2 or buffalo_l): aligned "
        "crop, 5 landmarks, 512-d identity and box, as a TCAN_FACE for Face ID, Face Mix, Face Similarity and the "
        "Face Pass. Several images: one face each, their identities averaged. Several faces in an image: the "
        "largest is used (or face_index). The preview shows the boxes (green: used) and the landmarks."
    )
    CATEGORY = FACE_CATEGORY
    FUNCTION = "analyze"
    RETURN_TYPES = ("TCAN_FACE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("face", "preview", "aligned_crops")
    OUTPUT_TOOLTIPS = ("the face identity", "the images with the detected faces marked",
                       "the aligned 224x224 face crops the face adapter sees")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "One or more images of the same person."}),
            "face_pack": _pack_widget(),
            "threshold": _threshold_widget(),
            "face_index": ("INT", {"default": -1, "min": -1, "max": 63,
                                   "tooltip": "-1: the largest face; 0, 1, ...: faces from the largest down."}),
        }}

    def analyze(self, image, face_pack: str, threshold: float, face_index: int):
        analysis, analyzer = load_analyzer(face_pack)
        result = analysis.analyze_images(analyzer, image, threshold=threshold, index=face_index)
        preview = analysis.draw_faces(image, result.detections, result.chosen)
        report = ". ".join([result.identity.describe(), *result.notes]) + "."
        return with_report(report, (result.identity, preview, result.identity.crops))


class TCANFaceID:
    DESCRIPTION = (
        "Keeps the face's identity in the animation: a face adapter on the denoising UNet. ID-Animator "
        "(animator.ckpt: face crop -> CLIP ViT-H/14 image encoder from models/clip_vision -> 16 face tokens) or "
        "IP-Adapter FaceID SD1.5 (ip-adapter-faceid_sd15.bin: the 512-d identity -> 4 face tokens, plus its "
        "LoRA). Adapter files from models/tcan or models/ipadapter, told apart by their keys. Composes with the "
        "motion module, APPA LoRA, temporal ControlNet and PTM."
    )
    CATEGORY = f"{CATEGORY}/model"
    FUNCTION = "patch"
    RETURN_TYPES = ("TCAN_MODEL",)
    RETURN_NAMES = ("tcan_model",)
    OUTPUT_TOOLTIPS = ("a clone of the model with the face adapter",)

    @classmethod
    def INPUT_TYPES(cls):
        adapters = ([f"tcan/{n}" for n in host.list_models("tcan")]
                    + [f"ipadapter/{n}" for n in host.list_models("ipadapter")])
        return {"required": {
            "tcan_model": ("TCAN_MODEL", {"tooltip": "The TCAN model (TCAN Load Model and patch nodes)."}),
            "face": ("TCAN_FACE", {"tooltip": "The identity to keep (TCAN Face Analysis or Face Mix)."}),
            "adapter_name": (adapters, {
                "tooltip": "ID-Animator animator.ckpt (models/tcan) or IP-Adapter FaceID SD1.5 "
                           "(models/ipadapter)."}),
            "clip_vision_name": ([NONE] + host.list_models("clip_vision"), {
                "default": NONE,
                "tooltip": "CLIP ViT-H/14 image encoder (models/clip_vision), needed by ID-Animator; "
                           "IP-Adapter FaceID does not use it."}),
            "scale": ("FLOAT", {"default": DEFAULT_SCALE, "min": 0.0, "max": 3.0, "step": 0.05,
                                "tooltip": "Weight of face attention (ID-Animator: 0.8); 0 turns the adapter off."}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                        "tooltip": "Strength of the adapter's own LoRA (1 as trained)."}),
        }}

    def patch(self, tcan_model, face, adapter_name: str, clip_vision_name: str, scale: float, lora_strength: float):
        folder, _, name = adapter_name.partition("/")
        if folder not in ("tcan", "ipadapter") or not name:
            raise ValueError(f"adapter_name {adapter_name!r} must be tcan/<file> or ipadapter/<file>")
        encoder = None if clip_vision_name == NONE else host.model_path("clip_vision", clip_vision_name)
        model, report = build.add_face_id(tcan_model, host.model_path(folder, name), face, encoder, scale,
                                          lora_strength, device=host.torch_device())
        host.register_pack_caches()
        return with_report(report, (model,))


class TCANFaceMix:
    DESCRIPTION = (
        "Mixes two to four identities with weights into one (identity mixing); sweeping the weights "
        "interpolates from one face to another. Weights (1, 0) give exactly the first face."
    )
    CATEGORY = FACE_CATEGORY
    FUNCTION = "mix"
    RETURN_TYPES = ("TCAN_FACE",)
    RETURN_NAMES = ("face",)
    OUTPUT_TOOLTIPS = ("the mixed identity",)

    @classmethod
    def INPUT_TYPES(cls):
        weight = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                  "tooltip": "How much this face counts (weights are normalised to sum 1)."}
        face = ("TCAN_FACE", {"tooltip": "An identity (TCAN Face Analysis or another Face Mix)."})
        return {
            "required": {
                "face_1": face, "weight_1": ("FLOAT", dict(weight)),
                "face_2": face, "weight_2": ("FLOAT", dict(weight)),
            },
            "optional": {
                "face_3": face, "weight_3": ("FLOAT", dict(weight)),
                "face_4": face, "weight_4": ("FLOAT", dict(weight)),
            },
        }

    def mix(self, face_1, weight_1, face_2, weight_2, face_3=None, weight_3=1.0, face_4=None, weight_4=1.0):
        pairs = [(f, w) for f, w in ((face_1, weight_1), (face_2, weight_2), (face_3, weight_3), (face_4, weight_4))
                 if f is not None]
        total = sum(w for _, w in pairs) or 1.0
        mixed = combine_faces([f for f, _ in pairs], [w for _, w in pairs])
        share = ", ".join(f"{w / total:.2f}" for _, w in pairs)
        return with_report(f"{len(pairs)} faces mixed with shares {share}.", (mixed,))


class TCANFaceSimilarity:
    DESCRIPTION = (
        "TIFF's identity metric: cosine similarity of the reference identity to the largest face in each frame, "
        "their mean, and a plot over the frames, so you can see which frames lost the face. Frames without a "
        "face are marked on the plot and left out of the mean (not scored as 0)."
    )
    CATEGORY = FACE_CATEGORY
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "FLOAT", "STRING")
    RETURN_NAMES = ("plot", "mean_similarity", "per_frame")
    OUTPUT_TOOLTIPS = ("similarity over the frames", "mean cosine similarity of the frames with a face (NaN if none)",
                       "JSON list: similarity per frame, null where no face was found")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference": ("TCAN_FACE", {"tooltip": "The identity to compare with (TCAN Face Analysis)."}),
            "frames": ("IMAGE", {"tooltip": "The frames to measure (the TCAN Sampler's output)."}),
            "face_pack": _pack_widget(),
            "threshold": _threshold_widget(),
        }}

    def measure(self, reference, frames, face_pack: str, threshold: float):
        analysis, analyzer = load_analyzer(face_pack)
        with host.Progress(frames.shape[0], "TCAN Face Similarity") as bar:
            result = analysis.face_similarity(analyzer, reference, frames, threshold=threshold,
                                              progress=bar.update, check_cancel=host.check_interrupt)
        mean = math.nan if result.mean is None else float(result.mean)
        per_frame = json.dumps([None if s is None else round(float(s), 5) for s in result.scores])
        return with_report(result.report(), (result.plot, mean, per_frame))


class TCANCharacterImage:
    DESCRIPTION = (
        "TIFF's first stage: a full-body image of the person from the prompt, keeping the face of the model's "
        "Face ID patch, in the pose of an OpenPose image (the model's ControlNet). The motion module, the "
        "ControlNet's temporal layers and reference attention are off. Use the image as the TCAN Sampler's "
        "reference."
    )
    CATEGORY = FACE_CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = ("one image per pose image", "its latents")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tcan_model": ("TCAN_MODEL", {"tooltip": "The TCAN model with TCAN Face ID and TCAN Temporal ControlNet."}),
            "pose_image": ("IMAGE", {"tooltip": "The full-body OpenPose image(s) (TCAN Pose Render)."}),
            "positive": ("CONDITIONING", {"tooltip": "Describe the character: clothes, body, setting."}),
            "negative": ("CONDITIONING", {"tooltip": "What to avoid."}),
            "vae": ("VAE", {"tooltip": "The SD1.5 VAE."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of the initial noise: try a few until the character looks right."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                              "tooltip": "Guidance scale: how strongly the prompt is followed."}),
            "scheduler": (list(SCHEDULERS), {"default": DEFAULT_SCHEDULER, "tooltip": "The sampling scheduler."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                              "tooltip": "Image width, a multiple of 8; keep the pose image's aspect ratio."}),
            "height": ("INT", {"default": 768, "min": 64, "max": 4096, "step": 8,
                               "tooltip": "Image height, a multiple of 8 (portrait suits a full body)."}),
        }}

    def generate(self, tcan_model, pose_image, positive, negative, vae, seed, steps, cfg, scheduler, width, height):
        from tcan_core.face.character import character_image

        settings = SamplerSettings(seed=seed, steps=steps, cfg=cfg, scheduler=scheduler, width=width, height=height)
        windows = window_count(int(pose_image.shape[0]), settings)
        result = run_sampling(tcan_model, steps * windows, "TCAN Character Image", lambda device, progress: (
            character_image(tcan_model, pose_image, conditioning_tensor(positive, "positive"),
                            conditioning_tensor(negative, "negative"), vae, settings, device=device,
                            progress=progress, check_cancel=host.check_interrupt)))
        report = f"{result.frames.shape[0]} image(s) at {width}x{height}; {tcan_model.describe()}. " + " ".join(
            result.notes)
        return with_report(report.strip(), (result.frames, {"samples": result.latents}))


class TCANFacePass:
    DESCRIPTION = (
        "TIFF's face module, off by default: in every frame the largest face is replaced with the reference "
        "identity by an insightface swap model you have (e.g. inswapper_128.onnx in models/insightface) and "
        "blended back with a feathered mask; frames without a face pass through unchanged. The swap model's "
        "licence is yours to check: inswapper_128 is published for non-commercial research only."
    )
    CATEGORY = FACE_CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("the frames with the face replaced where one was found",)

    @classmethod
    def INPUT_TYPES(cls):
        swappers = [n for n in host.list_models("insightface") if not n.startswith(PACKS_DIR)]
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "The animated frames."}),
            "reference": ("TCAN_FACE", {"tooltip": "The identity to put in (TCAN Face Analysis)."}),
            "enabled": ("BOOLEAN", {"default": False,
                                    "tooltip": "Off: frames pass through. Check the swap model's licence first."}),
            "swap_model": ([NONE] + swappers, {
                "default": NONE, "tooltip": "An insightface swap model in models/insightface (inswapper_128.onnx)."}),
            "face_pack": _pack_widget(),
            "threshold": _threshold_widget(),
            "feather": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01,
                                  "tooltip": "Width of the soft edge of the pasted face, as a fraction of its crop."}),
        }}

    def apply(self, frames, reference, enabled: bool, swap_model: str, face_pack: str, threshold: float,
              feather: float):
        if not enabled:
            return with_report("Face pass off: frames unchanged.", (frames,))
        if swap_model == NONE:
            raise ValueError("TCAN Face Pass is enabled but no swap_model is chosen; put an insightface swap model "
                             "(inswapper_128.onnx) in models/insightface and pick it, or turn the pass off")
        analysis, analyzer = load_analyzer(face_pack)
        from tcan_core.face.face_pass import FaceSwapper, face_pass

        swapper = FaceSwapper.load(host.model_path("insightface", swap_model))
        with host.Progress(frames.shape[0], "TCAN Face Pass") as bar:
            result = face_pass(analyzer, swapper, reference, frames, threshold=threshold, feather=feather,
                               progress=bar.update, check_cancel=host.check_interrupt)
        return with_report(result.report, (result.frames,))


NODE_CLASS_MAPPINGS = {
    "TCANFaceAnalysis": TCANFaceAnalysis,
    "TCANFaceID": TCANFaceID,
    "TCANFaceMix": TCANFaceMix,
    "TCANFaceSimilarity": TCANFaceSimilarity,
    "TCANCharacterImage": TCANCharacterImage,
    "TCANFacePass": TCANFacePass,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TCANFaceAnalysis": "TCAN Face Analysis",
    "TCANFaceID": "TCAN Face ID",
    "TCANFaceMix": "TCAN Face Mix",
    "TCANFaceSimilarity": "TCAN Face Similarity",
    "TCANCharacterImage": "TCAN Character Image",
    "TCANFacePass": "TCAN Face Pass",
}
