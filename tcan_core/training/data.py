"""Training data: clip folders on disk and the datasets of TCAN's two training stages.

Three layouts are read (:func:`load_clips`): a folder written by ``python -m tcan_core
prepare-data`` (``manifest.json`` + ``clips/<name>/images|dwpose``), the TCAN authors'
preprocessed TikTok root (``train/<video>/images`` and ``train/<video>/dwpose``), and any folder
whose sub-folders each hold ``images/`` and ``dwpose/``. Frames are sorted by name in natural
order (``2.png`` before ``10.png``), and a clip's image and pose frames must pair up one to one.

The datasets follow the authors' ``magicanimate/data/dataset.py``:

- stage 1 (:class:`PairDataset`, their ``TikTokImageDataset2``): one item per video; a
  reference frame ``r`` uniform over the clip and a target ``t = (r + k) % L`` with ``k`` uniform
  in ``[m, L - m - 1]``, ``m = min(margin, L)``; clips of at most ``2 m`` frames take ``k``
  uniform in ``[1, L - 1]``; one-frame clips are left out (there is no second frame);
- stage 2 (:class:`ClipDataset`, their ``TikTokVideoDataset``): clips of ``frames`` consecutive
  frames from a uniform start, with the video's first frame as the reference; shorter videos are
  left out;
- both: one RandomResizedCrop (torchvision's parameters: area 0.9-1.0 of the frame, aspect
  0.9-1.0 times the output's) drawn per item and applied to the reference, the target frames and
  their pose images alike, resized with Pillow's bilinear filter (antialiased when shrinking, as
  torchvision does on the authors' PIL images); images in -1..1, pose images in 0..1.

Unlike the authors' code (Python's global ``random`` and torch's global RNG), every random choice
of item ``n`` is a function of ``(seed, n)`` only: the clip is ``randperm(len)[n % len]`` of epoch
``n // len`` (generator seeded with :func:`mix_seed` ``("epoch", seed, epoch)``), everything else
comes from a generator seeded with ``mix_seed("sample", seed, n)``. So worker processes, the
order items are asked for and any other use of the global RNG change nothing, and a resumed run
sees the same items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST = "manifest.json"
CLIPS_FOLDER = "clips"
IMAGES_FOLDER = "images"
POSES_FOLDER = "dwpose"
KEYPOINTS_FILE = "poses.json"
AUTHORS_SPLIT = "train"

LAYOUT_PACK = "prepare-data folder"
LAYOUT_AUTHORS = "TCAN authors' layout"
LAYOUT_FOLDERS = "clip folders"
LAYOUT_ONE = "one clip folder"
ACCEPTED_LAYOUTS = (
    "(a) a folder written by `python -m tcan_core prepare-data` (it holds manifest.json); "
    "(b) the TCAN authors' preprocessed TikTok root, holding train/<video>/images/ and train/<video>/dwpose/; "
    "(c) a folder whose sub-folders each hold images/ and dwpose/ (frames as .png/.jpg/.jpeg/.webp, "
    "paired by sorted name)")

# The authors' defaults (magicanimate/data/dataset.py).
DEFAULT_SCALE = (0.9, 1.0)
DEFAULT_RATIO = (0.9, 1.0)
DEFAULT_MARGIN = 30
DEFAULT_FRAMES = 16


@dataclass(frozen=True)
class Clip:
    """One video as frames: image and rendered-pose files in frame order, and the pack's pose JSON if any."""

    name: str
    images: tuple[Path, ...]
    poses: tuple[Path, ...]
    keypoints: Path | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class ClipSet:
    """The clips found in a data folder and the ones left out, with why: ``skipped`` is [(name, reason)]."""

    clips: list[Clip]
    skipped: list[tuple[str, str]]
    root: Path | None = None
    layout: str = ""

    def describe(self) -> str:
        """One paragraph: how many clips and frames, from where, and what was left out."""
        lengths = [len(c) for c in self.clips]
        where = f" from {self.root} ({self.layout})" if self.root is not None else ""
        text = f"{len(self.clips)} clip(s){where}"
        if lengths:
            text += (f", {sum(lengths)} frames in all, {min(lengths)} to {max(lengths)} per clip"
                     if len(lengths) > 1 else f", {lengths[0]} frames")
        text += "."
        if self.skipped:
            shown = "; ".join(f"{name}: {reason}" for name, reason in self.skipped[:10])
            more = f"; and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            text += f" Left out {len(self.skipped)}: {shown}{more}."
        return text


def natural_key(name: str) -> tuple:
    """Sort key that orders the digit runs of ``name`` by value: ``frame2`` before ``frame10``."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", name) if part)


def list_frames(folder: Path) -> tuple[Path, ...]:
    """Image files (png/jpg/jpeg/webp) directly in ``folder``, in natural name order; () when it is missing."""
    if not folder.is_dir():
        return ()
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return tuple(sorted(files, key=lambda p: natural_key(p.name)))


def size_check(width: int, height: int) -> None:
    """Raise a ValueError unless ``width`` and ``height`` are multiples of 8 and at least 64 (SD1.5's latent grid)."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
        if value < 64 or value % 8:
            low, high = max(64, value // 8 * 8), max(64, -(-value // 8) * 8)
            raise ValueError(f"{name} must be a multiple of 8 and at least 64, got {value}; "
                             f"the nearest valid {name}s are {low} and {high}" if low != high else
                             f"{name} must be a multiple of 8 and at least 64, got {value}; use {low}")


def _clip_from_folder(name: str, folder: Path, keypoints: Path | None,
                      skipped: list[tuple[str, str]]) -> Clip | None:
    """The clip in ``folder``/images and ``folder``/dwpose, or None (with the reason in ``skipped``)."""
    images, poses = list_frames(folder / IMAGES_FOLDER), list_frames(folder / POSES_FOLDER)
    if not (folder / IMAGES_FOLDER).is_dir() or not (folder / POSES_FOLDER).is_dir():
        missing = [f"{sub}/" for sub in (IMAGES_FOLDER, POSES_FOLDER) if not (folder / sub).is_dir()]
        skipped.append((name, f"no {' and no '.join(missing)} folder in {folder}"))
        return None
    if not images and not poses:
        skipped.append((name, f"no image files (.png/.jpg/.jpeg/.webp) in {folder / IMAGES_FOLDER}"))
        return None
    if len(images) != len(poses):
        raise ValueError(
            f"clip {name!r} has {len(images)} image frame(s) in {folder / IMAGES_FOLDER} but {len(poses)} pose "
            f"frame(s) in {folder / POSES_FOLDER}; every frame needs its rendered pose (paired by sorted name). "
            "Render the missing poses (or remove the extra frames), or prepare the clip again with "
            "`python -m tcan_core prepare-data`")
    return Clip(name, images, poses, keypoints)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable manifest ({exc}); run `python -m tcan_core prepare-data "
                         f"--out {root}` again to rewrite it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("clips"), list):
        raise ValueError(f"{path} has no list of clips; it was not written by prepare-data. Run `python -m "
                         f"tcan_core prepare-data --out {root}` again to rewrite it")
    return data


def _from_manifest(root: Path) -> ClipSet:
    from tcan_core.paths import safe_join

    data = _read_manifest(root)
    clips: list[Clip] = []
    skipped: list[tuple[str, str]] = [(str(s.get("name", "?")), str(s.get("reason", "")))
                                      for s in data.get("skipped", []) if isinstance(s, dict)]
    for entry in data["clips"]:
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        folder = safe_join(root / CLIPS_FOLDER, name, "clip name in manifest.json")
        if not folder.is_dir():
            skipped.append((name, f"listed in {MANIFEST} but {folder} is missing; run prepare-data again"))
            continue
        keypoints = folder / KEYPOINTS_FILE
        clip = _clip_from_folder(name, folder, keypoints if keypoints.is_file() else None, skipped)
        if clip is not None:
            clips.append(clip)
    return ClipSet(clips, skipped, root, LAYOUT_PACK)


def _from_sub_folders(root: Path, layout: str) -> ClipSet:
    subs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))
    if not subs:
        raise ValueError(f"the data folder {root} has no sub-folders, so no clip was found; accepted layouts: "
                         f"{ACCEPTED_LAYOUTS}. To make one from videos, run `python -m tcan_core prepare-data "
                         "--videos VIDEOS --out DATA`")
    clips: list[Clip] = []
    skipped: list[tuple[str, str]] = []
    for sub in subs:
        clip = _clip_from_folder(sub.name, sub, None, skipped)
        if clip is not None:
            clips.append(clip)
    return ClipSet(clips, skipped, root, layout)


def load_clips(data: str | Path) -> ClipSet:
    """The clips of a data folder in any of the accepted layouts (see the module docstring)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"the data folder {root} does not exist; give the --out folder of `python -m "
                                "tcan_core prepare-data`, or a folder in one of the accepted layouts: "
                                f"{ACCEPTED_LAYOUTS}")
    if not root.is_dir():
        raise ValueError(f"the data path {root} is a file, not a folder; accepted layouts: {ACCEPTED_LAYOUTS}")
    if (root / MANIFEST).is_file():
        found = _from_manifest(root)
    elif (root / AUTHORS_SPLIT).is_dir():
        found = _from_sub_folders(root / AUTHORS_SPLIT, LAYOUT_AUTHORS)
    elif (root / IMAGES_FOLDER).is_dir() and (root / POSES_FOLDER).is_dir():
        skipped: list[tuple[str, str]] = []
        clip = _clip_from_folder(root.name, root, None, skipped)
        found = ClipSet([clip] if clip else [], skipped, root, LAYOUT_ONE)
    else:
        found = _from_sub_folders(root, LAYOUT_FOLDERS)
    if not found.clips:
        reasons = "; ".join(f"{n}: {r}" for n, r in found.skipped[:10]) or "nothing was listed"
        raise ValueError(f"no usable clip in the data folder {found.root} (read as: {found.layout}); {reasons}. "
                         f"Accepted layouts: {ACCEPTED_LAYOUTS}")
    for name, reason in found.skipped:
        log.warning("training data: left out %s: %s", name, reason)
    return found


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (the first 8 bytes of SHA-256 of their repr): the same on every machine."""
    digest = hashlib.sha256(repr(tuple(parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                seed: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, h, w) for a ``height`` x ``width`` image, drawn from ``seed`` alone.

    torchvision's ``get_params`` draws from the global RNG; it runs inside ``fork_rng`` so the
    caller's RNG state is neither used nor changed.
    """
    from torchvision.transforms import RandomResizedCrop

    shape_only = torch.empty(1, 1, 1).expand(1, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))
    return int(top), int(left), int(h), int(w)


def frame_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read the frame {path} ({exc}); replace or remove it, or prepare the clip "
                         "again with `python -m tcan_core prepare-data`") from exc


def read_frames(paths: Sequence[Path], size: tuple[int, int], crop: tuple[int, int, int, int],
                out: tuple[int, int]) -> torch.Tensor:
    """Image files -> the ``crop`` (top, left, h, w) of each, resized to ``out`` (H, W): float32 ``[N,3,H,W]`` in 0..1.

    Pillow's bilinear filter widens with the scale factor, so shrinking is antialiased, as in
    torchvision's ``resized_crop`` on the PIL images of the authors' stage 1. A file that is not
    ``size`` (H, W) (a pose image drawn at another size) is first resized to it, so the crop
    lands on the same content in every file.
    """
    from PIL import Image, UnidentifiedImageError

    top, left, h, w = crop
    box = (left, top, left + w, top + h)
    arrays: list[np.ndarray] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                frame = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read the frame {path} ({exc}); replace or remove it, or prepare the clip "
                             "again with `python -m tcan_core prepare-data`") from exc
        if frame.size != (size[1], size[0]):
            frame = frame.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(frame.resize((out[1], out[0]), Image.Resampling.BILINEAR, box=box)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


class _CroppedFrames(Dataset):
    """What both stages share: checked settings, the clip of item ``n`` and the one crop of an item."""

    def __init__(self, width: int, height: int, scale: Sequence[float], ratio: Sequence[float], seed: int):
        size_check(width, height)
        scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must be two numbers 0 < low <= high <= 1, got {scale}; the authors use "
                             f"{DEFAULT_SCALE}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop aspect ratio must be two numbers 0 < low <= high, got {ratio}; the authors "
                             f"use {DEFAULT_RATIO}")
        self.width, self.height, self.seed = int(width), int(height), int(seed)
        self.scale = scale
        # The authors train square crops with ratio 0.9-1.0; for another output aspect the crop's
        # width/height range is taken relative to it, so the crop is never squeezed more than theirs.
        aspect = width / height
        self.ratio = (ratio[0] * aspect, ratio[1] * aspect)
        self.clips: list[Clip] = []
        self.skipped: list[tuple[str, str]] = []
        self._epoch: tuple[int, torch.Tensor] | None = None
        self._warned: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return len(self.clips)

    def _keep(self, clips: Sequence[Clip], shortest: int, what: str) -> None:
        """Keep the clips with at least ``shortest`` frames; the others go to ``skipped`` with a warning."""
        for clip in clips:
            if len(clip) >= shortest:
                self.clips.append(clip)
            else:
                reason = f"{len(clip)} frame(s), {what} needs at least {shortest}"
                self.skipped.append((clip.name, reason))
                log.warning("training data: left out clip %s: %s", clip.name, reason)

    def clip_of(self, n: int) -> Clip:
        """The clip of item ``n``: entry ``n % len`` of epoch ``n // len``'s permutation of the clips."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise IndexError(f"item numbers are whole numbers from 0, got {n!r}")
        epoch, slot = divmod(int(n), len(self.clips))
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(mix_seed("epoch", self.seed, epoch))
            self._epoch = (epoch, torch.randperm(len(self.clips), generator=generator))
        return self.clips[int(self._epoch[1][slot])]

    def generator(self, n: int) -> torch.Generator:
        """The generator of every other random choice of item ``n``: seeded with ``mix_seed("sample", seed, n)``."""
        return torch.Generator().manual_seed(mix_seed("sample", self.seed, int(n)))

    def _check_aspect(self, size: tuple[int, int]) -> None:
        """Warn (once per frame size) when no crop of the allowed area and aspect fits in the frame.

        A crop of area ``s * W * H`` and aspect ``r`` fits when ``s * W/H <= r <= W/H / s``; when no
        ``r`` of the range does, torchvision falls back to one centre crop, the same for every item.
        """
        aspect = size[1] / size[0]
        if self.scale[0] * aspect <= self.ratio[1] and self.ratio[0] <= aspect / self.scale[0]:
            return
        if size not in self._warned:
            self._warned.add(size)
            log.warning("frames of %dx%d (aspect %.2f) cannot hold a crop of %.0f%% of their area at the output's "
                        "aspect %.2f (%dx%d), so every item gets the same centre crop and the random crop is lost; "
                        "train at about the videos' aspect ratio", size[1], size[0], aspect, self.scale[0] * 100,
                        self.width / self.height, self.width, self.height)

    def load(self, images: Sequence[Path], poses: Sequence[Path],
             generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """``images`` then ``poses`` with one random resized crop for all: float32 [N,3,H,W] in 0..1.

        The crop is drawn for the size of the first image; every other file is brought to that size first.
        """
        size = frame_size(images[0])
        self._check_aspect(size)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        crop = crop_params(size[0], size[1], self.scale, self.ratio, seed)
        return read_frames([*images, *poses], size, crop, (self.height, self.width)), {"size": size, "crop": crop}


class PairDataset(_CroppedFrames):
    """Stage 1 of TCAN's training (paper section 3): item ``n`` -> reference frame, target frame, target's pose image.

    Returns ``reference`` [3,H,W] and ``target`` [1,3,H,W] in -1..1, ``poses`` [1,3,H,W] in 0..1,
    ``clip`` (its name), ``frames`` (reference index, target index), and ``size`` (H, W) and ``crop``
    (top, left, h, w) of the source frames (for keypoints, e.g. TPC in training).
    """

    def __init__(self, clips: Sequence[Clip], width: int = 512, height: int = 512, margin: int = DEFAULT_MARGIN,
                 scale: Sequence[float] = DEFAULT_SCALE, ratio: Sequence[float] = DEFAULT_RATIO, seed: int = 0):
        super().__init__(width, height, scale, ratio, seed)
        if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
            raise ValueError(f"margin must be a whole number of frames, 0 or more, got {margin!r}; the authors use "
                             f"{DEFAULT_MARGIN}")
        self.margin = int(margin)
        # A pair needs two frames (the authors' code fails on a one-frame video).
        self._keep(clips, 2, "stage 1 (a reference and a different target frame)")
        if not self.clips:
            raise ValueError(f"no clip has the 2 frames stage 1 needs (a reference and a target); got "
                             f"{len(clips)} clip(s). Add videos with more than one frame")

    def pair(self, length: int, generator: torch.Generator) -> tuple[int, int]:
        """(reference, target) frame indices of a ``length``-frame clip, by the authors' margin rule."""
        reference = int(torch.randint(length, (1,), generator=generator))
        margin = min(self.margin, length)
        # The authors fall back when length < 2m; at exactly 2m their range [m, m - 1] is empty (their
        # code raises), so the fallback covers it too.
        low, high = (1, length - 1) if length <= 2 * margin else (margin, length - margin - 1)
        offset = int(torch.randint(low, high + 1, (1,), generator=generator))
        return reference, (reference + offset) % length

    def __getitem__(self, n: int) -> dict:
        clip = self.clip_of(n)
        generator = self.generator(n)
        ref, target = self.pair(len(clip), generator)
        out, where = self.load([clip.images[ref], clip.images[target]], [clip.poses[target]], generator)
        return {"reference": out[0].mul(2).sub_(1), "target": out[1:2].mul(2).sub_(1), "poses": out[2:3].contiguous(),
                "clip": clip.name, "frames": (ref, target), **where}


class ClipDataset(_CroppedFrames):
    """Stage 2 of TCAN's training (paper section 3): item ``n`` -> ``frames`` consecutive frames, poses, first frame.

    Returns ``reference`` [3,H,W] (the video's first frame) and ``target`` [F,3,H,W] in -1..1,
    ``poses`` [F,3,H,W] in 0..1, ``clip`` (its name), ``frames`` (start, stop), ``size`` and ``crop`` (as stage 1).
    """

    def __init__(self, clips: Sequence[Clip], width: int = 512, height: int = 512, frames: int = DEFAULT_FRAMES,
                 scale: Sequence[float] = DEFAULT_SCALE, ratio: Sequence[float] = DEFAULT_RATIO, seed: int = 0):
        super().__init__(width, height, scale, ratio, seed)
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError(f"frames per clip must be a whole number, at least 1, got {frames!r}; TCAN uses "
                             f"{DEFAULT_FRAMES}")
        self.frames = int(frames)
        self._keep(clips, self.frames, f"stage 2 with --frames {self.frames}")
        if not self.clips:
            lengths = [len(c) for c in clips]
            found = (f"the {len(lengths)} clip(s) have {min(lengths)} to {max(lengths)} frames" if lengths
                     else "no clip was given")
            raise ValueError(f"no clip has the {self.frames} frames stage 2 needs: {found}. Add longer videos, or "
                             f"lower --frames to at most {max(lengths, default=1)} (TCAN uses {DEFAULT_FRAMES})")

    def __getitem__(self, n: int) -> dict:
        clip = self.clip_of(n)
        generator = self.generator(n)
        start = int(torch.randint(len(clip) - self.frames + 1, (1,), generator=generator))
        stop = start + self.frames
        out, where = self.load([clip.images[0], *clip.images[start:stop]], clip.poses[start:stop], generator)
        count = self.frames + 1
        return {"reference": out[0].mul(2).sub_(1), "target": out[1:count].mul(2).sub_(1),
                "poses": out[count:].contiguous(), "clip": clip.name, "frames": (start, stop), **where}
