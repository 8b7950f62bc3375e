"""``python -m tcan_core evaluate``: score folders of generated videos against their targets, or run the
TikTok self-reconstruction protocol (animate each test video from its first frame and its own poses, then
score it), writing ``evaluation.md``, ``evaluation.csv`` and ``evaluation.json``."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np

from ..model_folders import ModelFolders
from .evaluate import ALL_METRICS, CLIP_POOLS, EvalSettings, FaceScorer, VideoPair, evaluate_pairs
from .frames import RESIZE_HELP
from .report import to_markdown, write_reports
from .weights import METRICS_FOLDER, WeightsSearch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")
PROTOCOLS = ("tiktok",)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: _natural_key(p.name))


def list_videos(folder: str | Path) -> dict[str, Path]:
    """Videos in ``folder`` by name: video files (name without suffix) and sub-folders of frames; a folder that
    holds frames itself is one video named after the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a folder of videos or of frame folders")
    videos: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            videos[p.stem] = p
        elif p.is_dir() and _images_in(p):
            videos[p.name] = p
    if not videos and _images_in(folder):
        videos[folder.name] = folder
    return videos


def read_frames(path: str | Path) -> np.ndarray:
    """A video file or a folder of frames (natural name order) -> RGB uint8 ``[F,H,W,3]``."""
    import cv2

    from ..pipeline import read_video

    path = Path(path)
    if path.is_file():
        return read_video(path)[0]
    frames = []
    for f in _images_in(path):
        image = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read the frame {f}; it is not a PNG/JPEG image")
        frames.append(image[..., ::-1])
    if not frames:
        raise ValueError(f"{path} holds no frames (PNG/JPEG)")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames in {path} differ in size ({', '.join(f'{s[1]}x{s[0]}' for s in sizes)}); "
                         "a video's frames must share one size")
    return np.ascontiguousarray(np.stack(frames))


def match_videos(generated: str | Path, target: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(name, generated path, target path) for every generated video with a target of the same name, and the
    generated names without one; an error when none match."""
    gen, tgt = list_videos(generated), list_videos(target)
    if not gen:
        raise ValueError(f"{generated} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no folders of frames")
    if not tgt:
        raise ValueError(f"{target} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no folders of frames")
    pairs = [(n, gen[n], tgt[n]) for n in gen if n in tgt]
    if not pairs:
        raise ValueError(
            f"none of the {len(gen)} generated videos has a target of the same name: generated "
            f"{', '.join(sorted(gen)[:8])}; targets {', '.join(sorted(tgt)[:8])}. Name each generated video (file "
            "without its suffix, or frame folder) like its target")
    unmatched = sorted(n for n in gen if n not in tgt)
    if unmatched:
        log.warning("generated videos without a target (left out): %s", ", ".join(unmatched))
    return pairs, unmatched


def weights_search(models: str | Path | None) -> WeightsSearch:
    """The metrics folders under a models root, then the torch hub cache."""
    return WeightsSearch(ModelFolders(models).paths(METRICS_FOLDER) if models else [])


def face_scorer(models: str | Path | None, pack: str | None) -> tuple[FaceScorer | None, str | None]:
    """The face analysis for the identity metric, or why there is none."""
    if pack == "none":
        return None, "turned off (--face-pack none)"
    try:
        from ..face import analysis

        analysis.require_face_tools()
    except Exception as exc:  # noqa: BLE001 - any failure to import the optional face tools means no face metric
        return None, f"the face tools are not available ({exc})"
    dirs = ModelFolders(models).paths("insightface") if models else []
    names = [pack] if pack else [p for p in ("antelopev2", "buffalo_l") if p in analysis.list_face_packs(dirs)]
    if not names:
        return None, (f"no insightface pack (antelopev2 or buffalo_l) in {', '.join(dirs) or '(no models root)'}; "
                      "put one into models/insightface/models")
    return FaceScorer(analysis.FaceAnalyzer.load(analysis.resolve_face_pack(dirs, names[0]))), None


def settings_from(args: argparse.Namespace) -> EvalSettings:
    metrics = tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else ALL_METRICS
    return EvalSettings(metrics=metrics, resize=args.resize, clip_length=args.clip_length,
                        clip_stride=args.clip_stride, clip_pool=args.clip_pool, batch_size=args.batch_size,
                        fid_size=args.fid_size, fid_vid_size=args.fid_vid_size, fvd_size=args.fvd_size)


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiktok_videos(data: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Test videos of a TikTok-style dataset: sub-folders of ``data`` with an ``images/`` frame folder."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"the dataset folder {data} does not exist")
    videos = {p.name: p for p in sorted(data.iterdir()) if p.is_dir() and (p / "images").is_dir()
              and _images_in(p / "images")}
    if names:
        missing = [n for n in names if n not in videos]
        if missing:
            raise ValueError(f"the dataset {data} has no video {', '.join(missing)} (with an images/ folder); it has "
                             f"{', '.join(videos) or 'none'}")
        videos = {n: videos[n] for n in names}
    if not videos:
        raise ValueError(f"{data} holds no test videos: each video is a folder with an images/ folder of frames "
                         "(and optionally poses.json, a POSE_KEYPOINT JSON)")
    return videos


def run_tiktok(data: str | Path, models: str | Path, out: str | Path, options, names: list[str] | None = None,
               max_frames: int | None = None, progress=None) -> list[VideoPair]:
    """Self-reconstruction: each video animated from its first frame with its own poses (``poses.json`` or DWPose
    on its frames) by the pack's pipeline; generated frames written to ``out/generated/<video>/``."""
    import cv2

    from ..pipeline import animate, extract_poses_from
    from ..pose.pose_json import load_pose_json
    from ..pose_format import parse_pose_keypoint

    folders = ModelFolders(models)
    pairs = []
    for name, folder in tiktok_videos(data, names).items():
        frames = read_frames(folder / "images")
        if max_frames is not None:
            frames = frames[:max_frames]
        pose_file = folder / "poses.json"
        if pose_file.is_file():
            poses = parse_pose_keypoint(load_pose_json(pose_file)).first(frames.shape[0])
        else:
            poses = extract_poses_from(frames, folders.paths("tcan_pose"))
        reference_pose = poses.first(1)
        result = animate(frames[0], poses, folders, reference_pose, options, progress=progress)
        target_dir = Path(out) / "generated" / name
        target_dir.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(result.frames):
            cv2.imwrite(str(target_dir / f"{i:05d}.png"), np.ascontiguousarray(frame[..., ::-1]))
        pairs.append(VideoPair(name, result.frames, frames[:result.frames.shape[0]]))
        log.info("animated %s: %d frames", name, result.frames.shape[0])
    return pairs


def run_evaluate(args: argparse.Namespace) -> int:
    """The ``evaluate`` command."""
    from tqdm.auto import tqdm

    settings = settings_from(args)
    settings.check()
    out = Path(args.out)
    if args.protocol:
        if not args.data:
            raise ValueError("--protocol tiktok needs --data DATA (the test videos, each with an images/ folder)")
        from ..pipeline import AnimateOptions

        options = AnimateOptions(width=args.width, height=args.height, steps=args.steps, seed=args.seed,
                                 tau=args.tau, tpc=not args.no_tpc)
        names = args.videos.split(",") if args.videos else None
        with tqdm(desc="animate", unit="window", disable=None) as bar:
            pairs = run_tiktok(args.data, args.models, out, options, names, args.max_frames,
                               progress=lambda n, preview: bar.update(n))
        unmatched: list[str] = []
    else:
        if not (args.generated and args.target):
            raise ValueError("evaluate needs --generated G and --target T (folders of videos or frame folders), or "
                             "--protocol tiktok --data DATA --models DIR")
        matched, unmatched = match_videos(args.generated, args.target)
        pairs = [VideoPair(n, read_frames(g), read_frames(t)) for n, g, t in matched]
        if args.max_frames:
            pairs = [VideoPair(p.name, p.generated[:args.max_frames], p.target[:args.max_frames]) for p in pairs]
    face, why = face_scorer(args.models, args.face_pack) if "face cosine" in settings.metrics else (None, None)
    skipped = {"face cosine": why} if why else {}
    with tqdm(desc="metrics", unit="pass", disable=None) as bar:
        result = evaluate_pairs(pairs, settings, weights_search(args.models), face=face, skipped=skipped,
                                device=_device(args.device), progress=bar.update)
    if unmatched:
        result.settings["generated_without_target"] = unmatched
    result.settings["protocol"] = args.protocol or "folders"
    paths = write_reports(result, out)
    print(to_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_evaluate_parser(sub) -> None:
    """Register ``evaluate`` on the command line's sub-parsers."""
    p = sub.add_parser("evaluate", help="score generated videos against targets (L1, PSNR, SSIM, LPIPS, face, FID, "
                                        "FID-VID, FVD), or run the TikTok protocol")
    p.add_argument("--generated", metavar="G", help="folder of generated videos (files or frame folders)")
    p.add_argument("--target", metavar="T", help="folder of target videos, matched to G by name")
    p.add_argument("--protocol", choices=PROTOCOLS, help="tiktok: animate each video in --data from its first frame "
                                                          "and its own poses, then score it")
    p.add_argument("--data", metavar="DATA", help="test set for --protocol: one folder per video with images/ "
                                                  "(and optionally poses.json)")
    p.add_argument("--videos", help="comma-separated video names of DATA to use (default: all)")
    p.add_argument("--models", default="models", metavar="DIR",
                   help="models root; metric weights are read from DIR/tcan/metrics and the torch hub cache")
    p.add_argument("--out", default="evaluation", metavar="DIR", help="folder for evaluation.md/.csv/.json")
    p.add_argument("--metrics", help=f"comma-separated subset of: {', '.join(ALL_METRICS)} (default: all)")
    p.add_argument("--resize", default=None, help=f"resize rule: {RESIZE_HELP}. Default: none; 256x256 for "
                                                  "--protocol tiktok")
    p.add_argument("--clip-length", type=int, default=8, help="frames per clip for FID-VID/FVD (TCAN: 8)")
    p.add_argument("--clip-stride", type=int, default=1, help="frames between clip starts (TCAN: 1)")
    p.add_argument("--clip-pool", choices=CLIP_POOLS, default="clip",
                   help="clip: every clip is one sample (TCAN/DisCo frame folders); video: a video's feature is the "
                        "mean over its clips")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fid-size", type=int, default=299, help="Inception input size (299; other sizes are for quick "
                                                             "checks only: the numbers are then not comparable)")
    p.add_argument("--fid-vid-size", type=int, default=112, help="3D ResNet-50 input size (112)")
    p.add_argument("--fvd-size", type=int, default=224, help="I3D input size (224)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--face-pack", help="insightface pack for the face metric (default: antelopev2 or buffalo_l if "
                                       "present; 'none' to skip)")
    p.add_argument("--max-frames", type=int, help="use only the first N frames of each video")
    p.add_argument("--width", type=int, default=512, help="--protocol: generation width (TCAN: 512)")
    p.add_argument("--height", type=int, default=512, help="--protocol: generation height (TCAN: 512)")
    p.add_argument("--steps", type=int, default=25, help="--protocol: sampling steps (TCAN: 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=3.0, help="--protocol: PTM tau (TCAN: 3)")
    p.add_argument("--no-tpc", action="store_true", help="--protocol: skip TPC (the reference is the video's own "
                                                         "first frame)")
    p.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.resize is None:
        args.resize = "256x256" if args.protocol else "none"
    return run_evaluate(args)
