"""Evaluation metrics (issue 14): pixel metrics against independent references, the Frechet distance against its
closed form, each feature network round-tripped through its published file format, the clear errors, and the
evaluate command end to end (folders and the TikTok protocol on tiny models and a tiny synthetic dataset)."""

from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.ndimage import uniform_filter

from tcan_core.metrics import (
    EvalSettings,
    VideoPair,
    WeightsSearch,
    evaluate_pairs,
    frechet_distance,
    image_to_uint8,
    load_networks,
    match_frames,
    plot_curves,
    to_csv,
    to_json,
)
from tcan_core.metrics import pixel
from tcan_core.metrics.weights import load_resnet3d
from tcan_core.models.errors import ModelFormatError

SMALL = dict(fid_size=75, fid_vid_size=32, fvd_size=32)


def _images(seed=0, shape=(3, 40, 52, 3)):
    rng = np.random.default_rng(seed)
    random = rng.integers(0, 256, shape, dtype=np.uint8)
    y, x = np.mgrid[:shape[1], :shape[2]]
    ramp = np.broadcast_to(((x * 5 + y * 3) % 256).astype(np.uint8)[None, ..., None], shape).copy()
    checker = np.broadcast_to((((x // 4 + y // 4) % 2) * 255).astype(np.uint8)[None, ..., None], shape).copy()
    return random, ramp, checker


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) written from the paper: 7x7 mean filter, unbiased (co)variances, K1 .01, K2 .03."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    n = 49
    mu_a, mu_b = uniform_filter(a, 7), uniform_filter(b, 7)
    va = (uniform_filter(a * a, 7) - mu_a ** 2) * n / (n - 1)
    vb = (uniform_filter(b * b, 7) - mu_b ** 2) * n / (n - 1)
    cov = (uniform_filter(a * b, 7) - mu_a * mu_b) * n / (n - 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return float(s[3:-3, 3:-3].mean())


@pytest.mark.parametrize("which", [0, 1, 2])
def test_pixel_metrics_match_independent_references(which):
    from skimage.metrics import peak_signal_noise_ratio

    gen = _images(0)[which]
    noise = np.random.default_rng(1).integers(-40, 41, gen.shape)
    tgt = np.clip(gen.astype(int) + noise, 0, 255).astype(np.uint8)
    for i in range(gen.shape[0]):
        g, t = gen[i].astype(np.float64), tgt[i].astype(np.float64)
        assert pixel.l1(gen, tgt)[i] == pytest.approx(np.abs(g - t).mean() / 255.0, rel=1e-12)
        assert pixel.l1_disco(gen, tgt)[i] == pytest.approx(np.abs(g - t).mean() / (40 * 52), rel=1e-12)
        assert pixel.psnr(gen, tgt)[i] == pytest.approx(peak_signal_noise_ratio(tgt[i], gen[i], data_range=255),
                                                        rel=1e-10)
        grey_g = cv2.cvtColor(np.ascontiguousarray(gen[i][..., ::-1]), cv2.COLOR_BGR2GRAY)
        grey_t = cv2.cvtColor(np.ascontiguousarray(tgt[i][..., ::-1]), cv2.COLOR_BGR2GRAY)
        assert pixel.ssim(gen, tgt)[i] == pytest.approx(_ssim_reference(grey_g, grey_t), abs=1e-6)
    # identical frames give the ideal values
    assert np.all(pixel.l1(gen, gen) == 0) and np.all(pixel.l1_disco(gen, gen) == 0)
    assert np.all(np.isinf(pixel.psnr(gen, gen))) and np.all(pixel.psnr_disco(gen, gen) == 100.0)
    assert np.allclose(pixel.ssim(gen, gen), 1.0)


def test_disco_psnr_reproduces_the_uint8_wrap_around():
    a = np.full((3, 8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 16          # 16^2 = 256 wraps to 0: DisCo scores a 16-level error as a perfect 100 dB
    b[1] -= 17          # -17 wraps to 239; 239^2 = 57121 wraps to 33
    b[2, :4] += 2       # small errors do not wrap: both definitions agree
    legacy, correct = pixel.psnr_disco(b, a), pixel.psnr(b, a)
    assert legacy[0] == 100.0 and correct[0] == pytest.approx(10 * math.log10(255 ** 2 / 256))
    assert legacy[1] == pytest.approx(20 * math.log10(255 / math.sqrt(33)))
    assert correct[1] == pytest.approx(10 * math.log10(255 ** 2 / 289))
    assert legacy[1] - correct[1] > 9.0
    assert legacy[2] == pytest.approx(correct[2])


def _exact_samples(rng, n, mean, var):
    """Samples whose sample mean and unbiased sample covariance are exactly ``mean`` and ``diag(var)``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)
    return z * np.sqrt(var) + mean


def test_frechet_distance_matches_the_closed_form_and_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    a, b = _exact_samples(rng, 200, mu1, v1), _exact_samples(rng, 150, mu2, v2)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    # general covariances, and fewer samples than dimensions (the nuclear-norm path) against scipy's sqrtm
    for n, dim in ((300, 10), (12, 40)):
        a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
        b = rng.normal(size=(n + 5, dim)) * 0.7 + 0.3
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        m = a.mean(0) - b.mean(0)
        ref = m @ m + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples.*one sample has no covariance"):
        frechet_distance(a[:1], b, "FVD")


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
    """The four networks at their real architectures with random weights, in their published formats."""
    from tcan_core.tiny.metrics import write_metric_weights

    root = tmp_path_factory.mktemp("metric_models")
    files = write_metric_weights(root / "tcan" / "metrics")
    return root, files


@pytest.fixture(scope="module")
def networks(metric_weights):
    root, _ = metric_weights
    nets, skipped = load_networks(WeightsSearch([str(root / "tcan" / "metrics")], []), ["LPIPS", "FID", "FID-VID",
                                                                                       "FVD"])
    assert skipped == {}
    return nets


def test_each_network_loads_from_its_format_and_gives_features_of_the_right_shape(networks, metric_weights, one_thread):
    from pytorch_fid import inception as pf

    _, files = metric_weights
    with torch.inference_mode():
        x = torch.rand(2, 3, 299, 299)
        feats = networks["FID"].module(x)
        assert feats.shape == (2, 2048)
        # the same network as pytorch-fid's own InceptionV3 wrapper (its pool3 block) with these weights
        sd = torch.load(files["inception"], weights_only=True)
        net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        for name, mod in networks["FID"].module.net.named_children():
            setattr(net, name, mod)
        net.load_state_dict(sd)
        original = pf.fid_inception_v3
        pf.fid_inception_v3 = lambda: net
        try:
            reference = pf.InceptionV3([3], resize_input=False).eval()(x)[0].flatten(1)
        finally:
            pf.fid_inception_v3 = original
        assert torch.allclose(feats, reference, atol=1e-4)

        assert networks["FID-VID"].module.features(torch.randn(2, 3, 8, 32, 32)).shape == (2, 2048)
        assert networks["FID-VID"].module.fc.out_features == 700  # r3d50_K_200ep: Kinetics-700 head, unused
        assert networks["FVD"].module.features(torch.rand(2, 3, 8, 32, 32) * 2 - 1).shape == (2, 400)

        lp = networks["LPIPS"].module
        a, b = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
        assert lp(a, b).flatten().shape == (3,) and torch.all(lp(a, a).flatten().abs() < 1e-6)
        # the trunk is torchvision's AlexNet with the file's weights (lpips keeps its layer indices)
        import torchvision

        alex = torchvision.models.alexnet(weights=None)
        alex.load_state_dict(torch.load(files["alexnet"], weights_only=True))
        assert torch.allclose(lp.net.slice2(lp.net.slice1(a)), alex.features[:5](a), atol=1e-5)
    assert all(len(h) == 64 for net in networks.values() for h in net.settings()["files"].values())


def test_disco_layout_and_wrong_network_files(metric_weights, tmp_path):
    _, files = metric_weights
    sd = torch.load(files["resnet3d50"], weights_only=True)["state_dict"]
    disco = {f"module.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet-50-kinetics.pth"
    torch.save({"epoch": 200, "arch": "resnet-50", "state_dict": disco}, path)
    net = load_resnet3d(path).module
    x = torch.randn(1, 3, 8, 32, 32)
    reference = load_resnet3d(files["resnet3d50"]).module
    with torch.inference_mode():
        assert torch.equal(net.features(x), reference.features(x))

    wrong = tmp_path / "metrics" / "r3d50_K_200ep.pth"
    wrong.parent.mkdir()
    shutil.copy(files["i3d"], wrong)
    with pytest.raises(ModelFormatError, match=r"holds I3D .*not the 3D ResNet-50.*resnet-50-kinetics.pth"):
        load_networks(WeightsSearch([str(wrong.parent)], []), ["FID-VID"])


def _pair(name="v", frames=9, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    g = np.clip(t.astype(int) + rng.integers(-20, 21, t.shape), 0, 255).astype(np.uint8)
    return VideoPair(name, g, t)


def test_all_metrics_on_two_videos_and_the_reports(networks, tmp_path, one_thread):
    pairs = [_pair("a", seed=0), _pair("b", seed=1)]
    settings = EvalSettings(clip_stride=1, **SMALL)
    ticks = []
    result = evaluate_pairs(pairs, settings, networks=networks, progress=ticks.append)
    assert sum(ticks) == sum(result.counts.values())
    assert result.counts == {"LPIPS": 18, "FID": 36, "FID-VID": 8, "FVD": 8}
    for m in ("L1", "L1 (DisCo)", "PSNR", "PSNR (DisCo uint8)", "SSIM", "LPIPS", "FID", "FID-VID", "FVD"):
        assert math.isfinite(result.summary[m]) and result.summary[m] >= 0, m
    assert "face cosine" in result.skipped and "insightface" in result.skipped["face cosine"]
    assert len(result.per_frame["a"]["LPIPS"]) == 9
    same = evaluate_pairs([VideoPair(p.name, p.target, p.target) for p in pairs], settings, networks=networks)
    assert same.summary["FID"] == pytest.approx(0, abs=1e-3) and same.summary["FVD"] == pytest.approx(0, abs=1e-3)
    assert same.summary["LPIPS"] == pytest.approx(0, abs=1e-6) and same.summary["SSIM"] == pytest.approx(1)
    assert result.summary["FID"] > 1e-3 and result.summary["FVD"] > 1e-6
    payload = json.loads(to_json(same))
    assert payload["summary"]["PSNR"] == "inf" and payload["settings"]["clip_length"] == 8
    assert set(payload["settings"]["weights"]) == {"LPIPS", "FID", "FID-VID", "FVD"}
    assert to_csv(result).splitlines()[0].startswith("video,L1,L1 (DisCo),PSNR,PSNR (DisCo uint8),SSIM,LPIPS")
    plot = plot_curves(result.per_frame["a"])
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.shape[1] == 120 * 6


def test_missing_weights_leave_the_metric_out_with_the_reason(tmp_path):
    nets, skipped = load_networks(WeightsSearch([str(tmp_path)], []), ["FVD", "FID"])
    assert nets == {}
    assert "i3d_pretrained_400.pt" in skipped["FVD"] and "VideoGPT" in skipped["FVD"]
    assert "pt_inception-2015-12-05-6726825d.pth" in skipped["FID"]
    result = evaluate_pairs([_pair()], EvalSettings(metrics=("L1", "FVD")), WeightsSearch([str(tmp_path)], []))
    assert set(result.summary) == {"L1"} and "FVD" in result.skipped


def test_bad_inputs_get_clear_errors(networks):
    p = _pair(frames=9)
    with pytest.raises(ValueError, match="has 9 frames but the target has 7.*same frames"):
        match_frames(p.generated, p.target[:7])
    with pytest.raises(ValueError, match=r"generated frames are 48x40 but the target frames are 24x20.*resize rule"):
        match_frames(p.generated, p.target[:, ::2, ::2])
    g, t = match_frames(p.generated, np.ascontiguousarray(p.target[:, ::2, ::2]), "target")
    assert g.shape == t.shape == (9, 20, 24, 3)
    with pytest.raises(ValueError, match="needs clips of 8 frames, but the video 'v' has only 5"):
        evaluate_pairs([_pair(frames=5)], EvalSettings(metrics=("FVD",), **SMALL), networks=networks)
    with pytest.raises(ValueError, match="at least 2 videos, got 1.*meaningless"):
        evaluate_pairs([_pair()], EvalSettings(metrics=("FID-VID",), clip_pool="video", **SMALL), networks=networks)
    with pytest.raises(ValueError, match="needs at least 2 clips, these videos give 1.*meaningless"):
        evaluate_pairs([_pair(frames=8)], EvalSettings(metrics=("FVD",), **SMALL), networks=networks)
    with pytest.raises(ValueError, match=r"values in 0..1, got 0..255.*divided by 255"):
        image_to_uint8(torch.linspace(0, 255, 384).reshape(2, 8, 8, 3), "generated")
    with pytest.raises(ValueError, match="4 channels.*3 channels"):
        image_to_uint8(torch.rand(2, 8, 8, 4), "target")
    with pytest.raises(ValueError, match="unknown metric"):
        EvalSettings(metrics=("FOO",)).check()
    with pytest.raises(ValueError, match="resize rule '300' is not understood"):
        evaluate_pairs([p], EvalSettings(metrics=("L1",), resize="300"))


def test_cancel_stops_the_evaluation(networks):
    class Stop(Exception):
        pass

    def cancel():
        raise Stop

    with pytest.raises(Stop):
        evaluate_pairs([_pair()], EvalSettings(metrics=("LPIPS",)), networks=networks, check_cancel=cancel)


def _write_frames(folder, frames):
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:05d}.png"), np.ascontiguousarray(f[..., ::-1]))


def test_evaluate_command_on_folders(tmp_path, capsys, monkeypatch):
    from tcan_core.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache, whatever this machine has

    gen, tgt = tmp_path / "gen", tmp_path / "tgt"
    for s, name in enumerate(("clip_a", "clip_b")):
        p = _pair(name, seed=s)
        _write_frames(gen / name, p.generated)
        _write_frames(tgt / name, p.target)
    out = tmp_path / "out"
    args = ["evaluate", "--generated", str(gen), "--target", str(tgt), "--models", str(tmp_path / "models"),
            "--out", str(out), "--metrics", "L1,PSNR,PSNR (DisCo uint8),SSIM,FVD"]
    assert main(args) == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert set(data["per_video"]) == {"clip_a", "clip_b"} and "FVD" in data["skipped"]
    assert len(data["per_frame"]["clip_a"]["PSNR"]) == 9
    assert (out / "evaluation.md").read_text().count("| clip_") == 2
    capsys.readouterr()
    other = tmp_path / "other"
    _write_frames(other / "unrelated", _pair().target)
    assert main(["evaluate", "--generated", str(other), "--target", str(tgt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 generated videos has a target of the same name" in err and "clip_a" in err


def test_tiktok_protocol_end_to_end_on_tiny_models(metric_weights, tiny_tree, tmp_path, one_thread):
    from tcan_core.cli import main
    from tcan_core.demo_scene import driving_dance
    from tcan_core.pose.pose_json import save_pose_json
    from tcan_core.pose.render import render_poses
    from tcan_core.pose_format import to_pose_keypoint

    root, files = metric_weights
    models = tiny_tree.root
    (models / "tcan" / "metrics").mkdir(parents=True, exist_ok=True)
    for path in files.values():
        target = models / "tcan" / "metrics" / path.name
        if not target.exists():
            target.symlink_to(path)
    data = tmp_path / "tiktok"
    for i in range(2):
        poses = driving_dance(frames=8, width=64, height=64)
        _write_frames(data / f"video_{i}" / "images", np.roll(render_poses(poses, 64, 64), i * 5, axis=2))
        save_pose_json(to_pose_keypoint(poses), data / f"video_{i}" / "poses.json")
    out = tmp_path / "eval"
    assert main(["evaluate", "--protocol", "tiktok", "--data", str(data), "--models", str(models), "--out", str(out),
                 "--width", "64", "--height", "64", "--steps", "1", "--no-tpc", "--resize", "64x64",
                 "--fid-size", "75", "--fid-vid-size", "32", "--fvd-size", "32", "--face-pack", "none"]) == 0
    data_out = json.loads((out / "evaluation.json").read_text())
    for m in ("L1", "PSNR", "SSIM", "LPIPS", "FID", "FID-VID", "FVD"):
        assert isinstance(data_out["summary"][m], float), m
    assert data_out["settings"]["protocol"] == "tiktok" and data_out["settings"]["resize"] == "64x64"
    assert data_out["settings"]["weights"]["FVD"]["files"]
    assert len(list((out / "generated" / "video_1").glob("*.png"))) == 8
    assert (out / "evaluation.csv").read_text().startswith("video,")


def test_doctor_lists_the_metric_weights(metric_weights, tmp_path):
    from tcan_core.doctor import format_report, run_doctor
    from tcan_core.model_folders import ModelFolders

    _, files = metric_weights
    (tmp_path / "tcan" / "metrics").mkdir(parents=True)
    shutil.copy(files["i3d"], tmp_path / "tcan" / "metrics" / "i3d_pretrained_400.pt")
    reports = {r.slot.key: r for r in run_doctor(ModelFolders(tmp_path))}
    assert reports["metrics_i3d"].found and not reports["metrics_i3d"].slot.required
    assert not reports["metrics_inception"].found
    text = format_report(list(reports.values()))
    assert "I3D (Kinetics-400)" in text and "pytorch-fid/releases" in text


def test_video_metrics_node(pack, metric_weights, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache, whatever this machine has
    from conftest import node, result

    _, files = metric_weights
    folder = tmp_path / "tcan" / "metrics"
    folder.mkdir(parents=True)
    for key in ("alexnet", "lpips_linear"):
        (folder / files[key].name).symlink_to(files[key])
    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    host.set_models_root(tmp_path)
    try:
        metrics = node(pack, "TCANVideoMetrics")
        p = _pair(frames=4, size=(32, 40))
        gen, tgt = torch.from_numpy(p.generated).float() / 255, torch.from_numpy(p.target).float() / 255
        out = metrics.measure(gen, tgt, "L1, PSNR (DisCo uint8), SSIM, LPIPS, FVD", "none", 8, 1, "none")
        (report, plot, payload), text = result(out)
        assert report == text and "| **all** |" in report and "FVD: no I3D" in report
        data = json.loads(payload)
        assert len(data["per_frame"]["video"]["LPIPS"]) == 4 and data["summary"]["LPIPS"] > 0
        assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
        with pytest.raises(ValueError, match="reference_face is connected but face_pack is 'none'"):
            metrics.measure(gen, tgt, "L1, face cosine", "none", 8, 1, "none", reference_face=object())
        with pytest.raises(ValueError, match="4 channels"):
            metrics.measure(torch.rand(4, 32, 40, 4), tgt, "L1", "none", 8, 1, "none")
    finally:
        host.set_models_root(None)


def test_face_cosine_against_the_target_faces_and_a_reference(tmp_path, one_thread):
    pytest.importorskip("insightface")
    from tcan_core.face.analysis import FaceAnalyzer, analyze_images, resolve_face_pack
    from tcan_core.metrics import FaceScorer
    from tcan_core.tiny.face_onnx import draw_test_faces, write_tiny_face_pack

    write_tiny_face_pack(tmp_path, "buffalo_l")
    analyzer = FaceAnalyzer.load(resolve_face_pack([str(tmp_path / "insightface")], "buffalo_l"))
    face_a = draw_test_faces(640, 640, [(300, 280, 100)], seed=4)
    face_b = draw_test_faces(640, 640, [(320, 300, 100)], seed=9)
    generated = np.stack([face_a, np.zeros_like(face_a), face_b])
    target = np.stack([face_a, face_a, face_a])
    settings = EvalSettings(metrics=("face cosine",))
    result = evaluate_pairs([VideoPair("v", generated, target)], settings, face=FaceScorer(analyzer))
    scores = result.per_frame["v"]["face cosine"]
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] is None and scores[2] < 0.999
    assert result.summary["face cosine"] == pytest.approx((scores[0] + scores[2]) / 2)
    assert result.summary["face distance"] == pytest.approx(1 - result.summary["face cosine"])
    reference = analyze_images(analyzer, torch.from_numpy(face_a[None]).float() / 255).identity
    with_ref = evaluate_pairs([VideoPair("v", generated, target)], settings, face=FaceScorer(analyzer, reference))
    assert with_ref.per_frame["v"]["face cosine"][0] == pytest.approx(1.0, abs=1e-5)
    assert with_ref.per_frame["v"]["face cosine"][2] == pytest.approx(scores[2], abs=1e-5)
