"""The face nodes on the tiny model tree, through the host's model folders: Face Analysis, Face ID (both
adapter formats), Face Mix, Face Similarity, Character Image and Face Pass, and their clear errors."""

from __future__ import annotations

import importlib
import json
import math
import shutil

import pytest
import torch

from conftest import node, rel, result
from tcan_core.animation.text import encode_empty_prompt
from tcan_core.animation.vae import DiffusersVAE

pytest.importorskip("insightface")
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


def picture(faces, width=320, height=320, seed=0) -> torch.Tensor:
    from tcan_core.tiny.face_onnx import draw_test_faces

    return torch.from_numpy(draw_test_faces(width, height, faces, seed=seed)).float()[None] / 255.0


@pytest.fixture(scope="module")
def face(pack, demo_models):
    (identity, preview, crops), report = result(node(pack, "TCANFaceAnalysis").analyze(
        picture([(160, 150, 48)]), "buffalo_l", 0.5, -1))
    assert "CPUExecutionProvider" in report
    assert preview.shape == (1, 320, 320, 3) and crops.shape == (1, 224, 224, 3)
    return identity


@pytest.fixture(scope="module")
def other_face(pack, demo_models):
    (identity, _, _), _ = result(node(pack, "TCANFaceAnalysis").analyze(
        picture([(160, 150, 48)], seed=7), "buffalo_l", 0.5, -1))
    return identity


@pytest.fixture(scope="module")
def loaded(pack, demo_models):
    (model,), _ = result(node(pack, "TCANLoadModel").load(rel(demo_models, "sd15_safetensors", "checkpoints"),
                                                          "none (training-free: base UNet)"))
    return model


def test_face_packs_are_listed_with_the_usual_names(pack, demo_models):
    packs = pack.NODE_CLASS_MAPPINGS["TCANFaceAnalysis"].INPUT_TYPES()["required"]["face_pack"][0]
    assert {"antelopev2", "buffalo_l"} <= set(packs)
    # The usual names are always offered; a pack only discovery can know must be listed too.
    own = demo_models.root / "insightface" / "models" / "my_own_pack"
    shutil.copytree(demo_models.root / "insightface" / "models" / "buffalo_l", own)
    try:
        packs = pack.NODE_CLASS_MAPPINGS["TCANFaceAnalysis"].INPUT_TYPES()["required"]["face_pack"][0]
    finally:
        shutil.rmtree(own)
    assert "my_own_pack" in packs


def test_face_analysis_reports_several_faces_and_uses_the_largest(pack, demo_models):
    image = picture([(70, 160, 24), (200, 160, 48)])
    (identity, _, _), report = result(node(pack, "TCANFaceAnalysis").analyze(image, "buffalo_l", 0.5, -1))
    assert "2 faces" in report
    assert identity.box_size > 40


def test_face_analysis_without_a_face_says_what_to_do(pack, demo_models):
    with pytest.raises(ValueError, match="no face found.*lower the detection threshold"):
        node(pack, "TCANFaceAnalysis").analyze(torch.zeros(1, 128, 128, 3), "buffalo_l", 0.5, -1)


def test_a_missing_pack_names_the_folder(pack, demo_models):
    shutil.rmtree(demo_models.root / "insightface" / "models" / "antelopev2", ignore_errors=True)
    with pytest.raises(FileNotFoundError, match="models/insightface/models"):
        node(pack, "TCANFaceAnalysis").analyze(picture([(160, 150, 48)]), "antelopev2", 0.5, -1)


def test_insightface_missing_names_what_to_install(pack, demo_models, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_insightface(name, *args, **kwargs):
        if name.split(".")[0] == "insightface":
            raise ImportError("No module named 'insightface'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_insightface)
    with pytest.raises(RuntimeError, match="pip install insightface"):
        node(pack, "TCANFaceAnalysis").analyze(picture([(160, 150, 48)]), "buffalo_l", 0.5, -1)


def test_face_mix_one_zero_is_the_first_face(pack, face, other_face):
    (mixed,), _ = result(node(pack, "TCANFaceMix").mix(face, 1.0, other_face, 0.0))
    assert mixed is face
    (half,), report = result(node(pack, "TCANFaceMix").mix(face, 1.0, other_face, 1.0))
    assert half.num_faces == 2 and "0.50, 0.50" in report
    assert abs(float(half.embedding.norm()) - 1.0) < 1e-5


def test_face_similarity_scores_the_reference_one_and_reports_faceless_frames(pack, demo_models, face):
    frames = torch.cat([picture([(160, 150, 48)]), torch.zeros(1, 320, 320, 3)])
    (plot, mean, per_frame), report = result(node(pack, "TCANFaceSimilarity").measure(face, frames, "buffalo_l", 0.5))
    scores = json.loads(per_frame)
    assert abs(scores[0] - 1.0) < 1e-4 and scores[1] is None
    assert abs(mean - 1.0) < 1e-4 and "1" in report
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
    (_, none_mean, _), _ = result(node(pack, "TCANFaceSimilarity").measure(face, torch.zeros(2, 64, 64, 3),
                                                                           "buffalo_l", 0.5))
    assert math.isnan(none_mean)


def test_face_pass_is_off_by_default_and_swaps_when_enabled(pack, demo_models, face, other_face):
    frames = torch.cat([picture([(160, 150, 48)], seed=7), torch.zeros(1, 320, 320, 3)])
    spec = pack.NODE_CLASS_MAPPINGS["TCANFacePass"].INPUT_TYPES()["required"]
    assert spec["enabled"][1]["default"] is False
    swapper = rel(demo_models, "inswapper", "insightface")
    assert swapper in spec["swap_model"][0] and not any(n.startswith("models/") for n in spec["swap_model"][0])
    (same,), report = result(node(pack, "TCANFacePass").apply(frames, face, False, swapper, "buffalo_l", 0.5, 0.1))
    assert same is frames and "off" in report
    with pytest.raises(ValueError, match="no swap_model"):
        node(pack, "TCANFacePass").apply(frames, face, True, "none", "buffalo_l", 0.5, 0.1)
    (swapped,), report = result(node(pack, "TCANFacePass").apply(frames, face, True, swapper, "buffalo_l", 0.5, 0.1))
    assert not torch.equal(swapped[0], frames[0]) and torch.equal(swapped[1], frames[1])


@pytest.mark.parametrize("adapter,encoder", [("id_animator", True), ("ip_faceid", False)])
def test_face_id_patches_a_clone(pack, demo_models, loaded, face, adapter, encoder):
    folder = "tcan" if adapter == "id_animator" else "ipadapter"
    clip = rel(demo_models, "clip_vision", "clip_vision") if encoder else "none"
    spec = pack.NODE_CLASS_MAPPINGS["TCANFaceID"].INPUT_TYPES()["required"]
    name = f"{folder}/{rel(demo_models, adapter, folder)}"
    assert name in spec["adapter_name"][0]
    (model,), report = result(node(pack, "TCANFaceID").patch(loaded, face, name, clip, 0.8, 1.0))
    assert [p.key for p in model.patches] == ["face_id"] and loaded.patches == ()
    assert report


def test_face_id_of_id_animator_without_a_clip_encoder_says_which_one(pack, demo_models, loaded, face):
    name = f"tcan/{rel(demo_models, 'id_animator', 'tcan')}"
    with pytest.raises(ValueError, match="ViT-H/14"):
        node(pack, "TCANFaceID").patch(loaded, face, name, "none", 0.8, 1.0)


def test_character_image_node(pack, demo_models, loaded, face):
    context = encode_empty_prompt(demo_models.modules["text_encoder"])
    conditioning = [[context, {}]]
    (model,), _ = result(node(pack, "TCANTemporalControlNet").patch(
        loaded, rel(demo_models, "controlnet_ldm", "controlnet"), "off", 1.0, 0.0, 1.0))
    (model,), _ = result(node(pack, "TCANFaceID").patch(
        model, face, f"ipadapter/{rel(demo_models, 'ip_faceid', 'ipadapter')}", "none", 0.8, 1.0))
    poses = torch.zeros(1, SIZE, SIZE, 3)
    poses[0, 16:48, 28:36] = 1.0
    (image, latent), report = result(node(pack, "TCANCharacterImage").generate(
        model, poses, conditioning, conditioning, DiffusersVAE(demo_models.modules["vae"]), 1, 2, 7.5, "DDIM", SIZE,
        SIZE))
    assert image.shape == (1, SIZE, SIZE, 3) and latent["samples"].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert "No Face ID" not in report and "No ControlNet" not in report


@pytest.mark.parametrize("call", ["analyze", "measure", "apply"])
def test_an_empty_batch_into_a_face_node_says_the_batch_is_empty(pack, demo_models, face, call):
    empty = torch.zeros(0, 64, 64, 3)
    with pytest.raises(ValueError, match="empty batch"):
        if call == "analyze":
            node(pack, "TCANFaceAnalysis").analyze(empty, "buffalo_l", 0.5, -1)
        elif call == "measure":
            node(pack, "TCANFaceSimilarity").measure(face, empty, "buffalo_l", 0.5)
        else:
            swap = rel(demo_models, "inswapper", "insightface")
            node(pack, "TCANFacePass").apply(empty, face, True, swap, "buffalo_l", 0.5, 0.1)


def test_face_analysis_runs_on_the_hosts_device(pack, demo_models, monkeypatch):
    """The face models are asked for the device the host samples on (onnxruntime providers follow it)."""
    from tcan_core.face import analysis

    asked = []
    real_load = analysis.FaceAnalyzer.load.__func__

    def load(cls, pack_dir, providers=None, device=None):
        asked.append(device)
        return real_load(cls, pack_dir, providers, "cpu")

    monkeypatch.setattr(analysis.FaceAnalyzer, "load", classmethod(load))
    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cuda", 1))
    node(pack, "TCANFaceAnalysis").analyze(picture([(160, 150, 48)]), "buffalo_l", 0.5, -1)
    assert asked == ["cuda:1"]
