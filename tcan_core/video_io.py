"""Reading and writing images and videos for the command line, chosen by the output's extension.

Videos are written as H.264 in yuv420p through PyAV (which ComfyUI itself requires), because
browsers, and so ComfyUI's own video preview, play H.264 but not MPEG-4 part 2 (``mp4v``);
animated GIF and WebP keep every frame; a path without an extension gets one PNG per frame.
Every file is written under a temporary name first and renamed when complete, so a failed
run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

H264_SUFFIXES = (".mp4", ".mov", ".mkv")
ANIMATED_SUFFIXES = (".gif", ".webp")
# An output path without a suffix is a folder of PNG frames.
PNG_FRAMES = "a folder (no extension) for PNG frames"
OUTPUT_FORMATS = (*H264_SUFFIXES, *ANIMATED_SUFFIXES)
VIDEO_INPUT_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif", ".webp")
# H.264 encoders in order of preference: PyAV's wheels carry libx264; other FFmpeg builds may
# have only OpenH264 or a hardware encoder.
H264_ENCODERS = ("libx264", "libopenh264", "h264_nvenc", "h264_qsv", "h264_amf", "h264_videotoolbox",
                 "h264_v4l2m2m", "h264")


def check_output_path(path: str | os.PathLike) -> str:
    """The kind of output ``path`` asks for ('h264', 'gif', 'webp' or 'png'); a clear error for anything else,
    and for H.264 when no encoder works (so a run can stop before its heavy work)."""
    suffix = Path(path).suffix.lower()
    if suffix in H264_SUFFIXES:
        h264_encoder()
        return "h264"
    if suffix in ANIMATED_SUFFIXES:
        return suffix[1:]
    if suffix == "":
        return "png"
    raise ValueError(f"cannot write {str(path)!r}: unknown output extension {suffix!r}; use one of "
                     f"{', '.join(OUTPUT_FORMATS)} (H.264 video for .mp4/.mov/.mkv, animated GIF or WebP), "
                     f"or {PNG_FRAMES}")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be RGB uint8 [F,H,W,3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("there are no frames to write (0 frames)")
    return frames


def _check_fps(fps: float) -> float:
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a number above 0, got {fps}")
    return float(fps)


def _temporary(path: Path) -> Path:
    """A fresh name beside ``path`` with the same suffix (encoders pick the container from it)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _opens(name: str) -> bool:
    """Whether encoder ``name`` opens here (a hardware encoder is listed even where its device is absent)."""
    import av

    try:
        context = av.CodecContext.create(name, "w")
        context.width, context.height, context.pix_fmt = 64, 64, "yuv420p"
        context.time_base = Fraction(1, 12)
        context.open()
        return True
    except (av.error.FFmpegError, ValueError, KeyError, OSError):
        return False


def h264_encoder() -> str:
    """The name of the first H.264 encoder of this PyAV build that opens; a clear error when none does."""
    import av

    for name in H264_ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except (av.error.FFmpegError, ValueError, KeyError):
            continue
        if _opens(name):
            return name
    raise ValueError("this PyAV/FFmpeg build has no working H.264 encoder; write a .gif or .webp, or PNG frames "
                       "(an output path without an extension), or install the PyAV wheel from PyPI "
                       "(pip install av), which includes libx264")


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p halves the chroma resolution, so width and height must be even: repeat the last row/column."""
    height, width = frames.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        log.info("padding %dx%d frames to %dx%d for H.264 (yuv420p needs even sizes)",
                 width, height, width + pad_w, height + pad_h)
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _write_h264(path: Path, frames: np.ndarray, fps: float) -> None:
    import av

    frames = _even(frames)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(h264_encoder(), rate=Fraction(fps).limit_denominator(100_000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"} if stream.codec_context.codec.name == "libx264" else {}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def _write_animated(path: Path, frames: np.ndarray, fps: float, kind: str) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    # GIF stores delays in hundredths of a second; Pillow rounds the millisecond value.
    options = dict(save_all=True, append_images=images[1:], duration=round(1000.0 / fps), loop=0)
    if kind == "webp":
        options.update(lossless=False, quality=90, method=4)
    else:
        options.update(optimize=False, disposal=1)
    images[0].save(path, format=kind.upper(), **options)


def _write_pngs(folder: Path, frames: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        final = folder / f"{i:05d}.png"
        temporary = _temporary(final)
        try:
            Image.fromarray(frame).save(temporary, format="PNG")
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)


def write_frames(path: str | os.PathLike, frames: np.ndarray, fps: float = 12.0) -> str:
    """RGB uint8 [F,H,W,3] -> a file chosen by ``path``'s extension (see :func:`check_output_path`); -> a description."""
    path = Path(path)
    kind = check_output_path(path)
    frames = _check_frames(frames)
    fps = _check_fps(fps)
    if kind == "png":
        _write_pngs(path, frames)
        return f"{len(frames)} PNG frames in {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        if kind == "h264":
            _write_h264(temporary, frames, fps)
        else:
            _write_animated(temporary, frames, fps, kind)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    what = {"h264": "H.264 video", "gif": "animated GIF", "webp": "animated WebP"}[kind]
    return f"{what} {path} ({len(frames)} frames at {fps:g} fps)"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> RGB uint8 [H,W,3]; says when the file does not exist or is not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the image {path} does not exist; check the path")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give an image file (PNG or JPEG)")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read the image {path}: it is not an image file Pillow can open ({exc}); "
                         "give a PNG or JPEG file") from exc


def fit_max_side(frame: np.ndarray, max_side: int) -> np.ndarray:
    """One frame [H,W,3] scaled down (area filter) so its longer side is at most ``max_side``; 0 keeps it."""
    import cv2

    height, width = frame.shape[:2]
    if max_side == 0 or max(height, width) <= max_side:
        return frame
    k = max_side / max(height, width)
    return cv2.resize(frame, (max(1, round(width * k)), max(1, round(height * k))), interpolation=cv2.INTER_AREA)


def _read_animated(path: Path, max_frames: int | None, max_side: int = 0) -> tuple[np.ndarray, float]:
    """An animated GIF or WebP through Pillow (FFmpeg does not decode animated WebP)."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    frames: list[np.ndarray] = []
    durations: list[float] = []
    try:
        with Image.open(path) as image:
            for frame in ImageSequence.Iterator(image):
                frames.append(fit_max_side(np.array(frame.convert("RGB")), max_side))
                durations.append(float(frame.info.get("duration") or 0.0))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read the animation {path} ({exc}); give an mp4/mov/mkv/webm/gif/webp file "
                         "or a pose JSON") from exc
    mean = float(np.mean(durations)) if durations else 0.0
    return np.ascontiguousarray(np.stack(frames)), (1000.0 / mean if mean > 0 else 12.0)


def read_video(path: str | os.PathLike, max_frames: int | None = None, max_side: int = 0) -> tuple[np.ndarray, float]:
    """A video file -> (RGB uint8 [F,H,W,3], fps); says when the file does not exist or cannot be decoded.

    ``max_side`` > 0 scales each frame down as it is decoded so its longer side is at most that, so a
    long 4K video never sits in memory at full size.
    """
    import av

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the video {path} does not exist; check the path")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if path.suffix.lower() in ANIMATED_SUFFIXES:
        return _read_animated(path, max_frames, max_side)
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream; give a video file or a pose JSON")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 12.0
            for frame in container.decode(stream):
                frames.append(fit_max_side(frame.to_ndarray(format="rgb24"), max_side))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot read the video {path}: {exc}; give an mp4/mov/mkv/webm/gif file "
                         "or a pose JSON") from exc
    if not frames:
        raise ValueError(f"the video {path} has no readable frames")
    return np.ascontiguousarray(np.stack(frames)), fps
