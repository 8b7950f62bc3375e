"""The metric networks' weight files: where they are looked for, how each is recognised, how it is loaded.

Files are found in the ``tcan/metrics`` model folder or the torch hub cache (``<hub>/checkpoints``),
never downloaded. A file is recognised by its keys, not its name; loading is strict and reads
``.pth``/``.pt`` only with ``torch.load(weights_only=True)``. Each loaded network carries the SHA-256
of its files, so a report says exactly which weights made its numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..model_folders import WEIGHT_EXTENSIONS, list_model_files
from ..models.errors import ModelFileError, ModelFormatError
from ..models.state_dict import format_keys, load_state_dict_file, load_strict

log = logging.getLogger(__name__)

METRICS_FOLDER = "tcan_metrics"


@dataclass(frozen=True)
class MetricNetwork:
    """One feature network: the metrics it serves, the file names it is published under and where."""

    key: str
    title: str
    metrics: tuple[str, ...]
    filenames: tuple[str, ...]
    published: str


INCEPTION = MetricNetwork(
    "inception", "Inception-v3 (pytorch-fid's port of the TensorFlow FID network)", ("FID",),
    ("pt_inception-2015-12-05-6726825d.pth",),
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
ALEXNET = MetricNetwork(
    "alexnet", "AlexNet (torchvision ImageNet weights, the LPIPS trunk)", ("LPIPS",),
    ("alexnet-owt-7be5be79.pth",),
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (the LPIPS linear layers come with the lpips "
    "package)",
)
RESNET3D = MetricNetwork(
    "resnet3d50", "3D ResNet-50 (Kinetics; Hara et al.)", ("FID-VID",),
    ("resnet-50-kinetics.pth", "r3d50_K_200ep.pth"),
    "https://github.com/kenshohara/3D-ResNets-PyTorch (resnet-50-kinetics.pth is the Kinetics-400 file DisCo "
    "used; r3d50_K_200ep.pth the newer release)",
)
I3D = MetricNetwork(
    "i3d", "I3D (Kinetics-400; Carreira & Zisserman)", ("FVD",),
    ("i3d_pretrained_400.pt",),
    "https://github.com/wilson1yan/VideoGPT (i3d_pretrained_400.pt, the file DisCo and TCAN load)",
)
NETWORKS: tuple[MetricNetwork, ...] = (INCEPTION, ALEXNET, RESNET3D, I3D)


def hub_checkpoint_dir() -> Path:
    """torch's hub cache for weight files (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def identify(keys: Mapping[str, Sequence[int]]) -> str:
    """Which network a state dict (key -> shape) belongs to: a :data:`NETWORKS` key, ``lpips_linear``,
    ``vgg16`` or ``unknown``."""
    k = {name[len("module."):] if name.startswith("module.") else name: tuple(s) for name, s in keys.items()}
    if "Mixed_7c.branch_pool.conv.weight" in k and k.get("fc.weight", (0,))[0] == 1008:
        return "inception"
    if "Mixed_7c.branch_pool.conv.weight" in k:
        return "inception_torchvision"
    if k.get("features.0.weight") == (64, 3, 11, 11) and "classifier.6.weight" in k:
        return "alexnet"
    if k.get("features.0.weight") == (64, 3, 3, 3) and "features.28.weight" in k:
        return "vgg16"
    if "lin0.model.1.weight" in k:
        return "lpips_linear"
    if len(k.get("conv1.weight", ())) == 5 and "layer4.2.conv3.weight" in k:
        return "resnet3d50"
    if "Conv3d_1a_7x7.conv3d.weight" in k and "Mixed_5c.b3b.conv3d.weight" in k:
        return "i3d"
    return "unknown"


_DESCRIPTIONS = {"inception": INCEPTION.title, "alexnet": ALEXNET.title, "resnet3d50": RESNET3D.title,
                 "i3d": I3D.title, "lpips_linear": "LPIPS linear layers", "vgg16": "VGG-16 (torchvision)",
                 "inception_torchvision": "torchvision's Inception-v3 (ImageNet classifier, not the FID network)",
                 "unknown": "not a metric network"}


def describe(kind: str) -> str:
    """A readable name for a kind :func:`identify` returns."""
    return _DESCRIPTIONS.get(kind, kind)


def file_sha256(path: str | os.PathLike, _cache: dict = {}) -> str:  # noqa: B006 - a process-wide cache
    """SHA-256 of a file (cached by path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


@dataclass
class WeightsSearch:
    """Where metric weights are looked for: the ``tcan/metrics`` folders, then the torch hub cache."""

    metrics_dirs: list[str] = field(default_factory=list)
    hub_dirs: list[str] = field(default_factory=lambda: [str(hub_checkpoint_dir())])

    def searched(self) -> str:
        """The searched folders, for messages."""
        return ", ".join([*self.metrics_dirs, *self.hub_dirs]) or "(no folders)"

    def find(self, network: MetricNetwork) -> Path | None:
        """The file for ``network``: one of its published names, else (in the metrics folders) any file whose
        keys are that network's."""
        for d in [*self.metrics_dirs, *self.hub_dirs]:
            for name in list_model_files([d], WEIGHT_EXTENSIONS):
                if Path(name).name in network.filenames:
                    return Path(d) / name
        for d in self.metrics_dirs:
            for name in list_model_files([d], WEIGHT_EXTENSIONS):
                if Path(name).name in network.filenames:
                    continue
                try:
                    kind = identify({k: v.shape for k, v in load_state_dict_file(Path(d) / name).items()})
                except (ModelFileError, ModelFormatError, OSError):
                    continue
                if kind == network.key:
                    return Path(d) / name
        return None

    def missing_reason(self, network: MetricNetwork) -> str:
        """Why a metric is left out when ``network``'s file is not found: where to put which file, where it is published."""
        return (f"no {network.title} weights: put {' or '.join(network.filenames)} into the tcan/metrics model "
                f"folder (searched {self.searched()}); published at {network.published}")


def _state(path: Path, network: MetricNetwork) -> dict[str, torch.Tensor]:
    """The file's tensors, checked to be ``network``'s, with a ``module.`` prefix removed."""
    sd = load_state_dict_file(path)
    kind = identify({k: v.shape for k, v in sd.items()})
    if kind != network.key:
        raise ModelFormatError(
            f"{path} holds {describe(kind)} (keys such as {format_keys(list(sd), 4)}), not the {network.title} "
            f"that {'/'.join(network.metrics)} needs. Put {' or '.join(network.filenames)} into the tcan/metrics "
            f"model folder (published at {network.published}) and move this file out.")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _fill_bn_counters(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``num_batches_tracked`` counters that checkpoints saved before torch 0.4.1 lack (unused in eval)."""
    out = dict(sd)
    for name, buf in module.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in out:
            out[name] = torch.zeros_like(buf)
    return out


@dataclass
class LoadedNetwork:
    """A network in eval mode, with the files it came from and their SHA-256 (taken when it was loaded)."""

    network: MetricNetwork
    module: torch.nn.Module
    files: dict[str, str]
    sha256: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sha256 = {p: file_sha256(p) for p in self.files.values()}

    def settings(self) -> dict:
        """The network and the SHA-256 of each of its files, for a report's settings."""
        return {"network": self.network.title, "files": dict(self.sha256)}


def fid_inception_module() -> torch.nn.Module:
    """pytorch-fid's FID Inception-v3 with empty weights (its own builder would download them)."""
    from pytorch_fid import inception as pf

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    # The FID network's blocks differ from torchvision's (pooling in A/C/E); pytorch-fid's classes carry them.
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


def load_inception(path: str | os.PathLike) -> LoadedNetwork:
    """pytorch-fid's FID Inception-v3 from its checkpoint; the module maps ``[N,3,299,299]`` 0..1 to ``[N,2048]``."""
    path = Path(path)
    sd = _state(path, INCEPTION)
    net = fid_inception_module()
    load_strict(net, _fill_bn_counters(net, sd), INCEPTION.title, path)
    return LoadedNetwork(INCEPTION, _FIDInception(net).eval(), {"inception": str(path)})


class _FIDInception(torch.nn.Module):
    """pytorch-fid's pool3 features: images ``[N,3,299,299]`` in 0..1 -> ``[N,2048]``."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = 2 * x - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(n, name)(x)
        x = torch.nn.functional.max_pool2d(x, 3, 2)
        x = n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x))
        x = torch.nn.functional.max_pool2d(x, 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        return x.mean(dim=(2, 3))


# The five linear layers are 1,472 floats (6 KB); bigger files are other networks and are not opened.
LPIPS_LINEAR_MAX_BYTES = 1 << 20


def lpips_linear_file(search: WeightsSearch) -> Path | None:
    """The LPIPS v0.1 AlexNet linear layers: a file in the metrics folders with their keys, else the copy the
    lpips package installs."""
    for d in search.metrics_dirs:
        for name in list_model_files([d], WEIGHT_EXTENSIONS):
            if (Path(d) / name).stat().st_size > LPIPS_LINEAR_MAX_BYTES:
                continue
            try:
                if identify({k: v.shape for k, v in load_state_dict_file(Path(d) / name).items()}) == "lpips_linear":
                    return Path(d) / name
            except (ModelFileError, ModelFormatError, OSError):
                continue
    try:
        import lpips
    except ImportError:
        return None
    bundled = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    return bundled if bundled.is_file() else None


def load_lpips(alexnet_path: str | os.PathLike, linear_path: str | os.PathLike) -> LoadedNetwork:
    """LPIPS v0.1 (Zhang et al. 2018) with the AlexNet trunk: ``(x, y)`` ``[N,3,H,W]`` in -1..1 -> ``[N]``."""
    import lpips

    alexnet_path, linear_path = Path(alexnet_path), Path(linear_path)
    trunk = _state(alexnet_path, ALEXNET)
    lin = load_state_dict_file(linear_path)
    if identify({k: v.shape for k, v in lin.items()}) != "lpips_linear":
        raise ModelFormatError(f"{linear_path} does not hold the LPIPS linear layers (keys such as "
                               f"{format_keys(list(lin), 4)}); use weights/v0.1/alex.pth from the lpips package")
    # pretrained/pnet_rand: build without lpips's own loading, which would read or download files itself.
    with warnings.catch_warnings():
        # lpips builds its trunk with torchvision's deprecated ``pretrained=False``; nothing is downloaded.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net="alex", version="0.1", pnet_rand=True, verbose=False)
    # lpips keeps torchvision's layer indices inside its slices: features.<i> -> net.slice<k>.<i>.
    slice_of = {i: s for s, idx in enumerate((range(0, 2), range(2, 5), range(5, 8), range(8, 10), range(10, 12)), 1)
                for i in idx}
    sd = {f"net.slice{slice_of[int(k.split('.')[1])]}.{k[len('features.'):]}": v
          for k, v in trunk.items() if k.startswith("features.")}
    sd.update(lin)
    expected = model.state_dict()
    # The input scaling is a fixed buffer of lpips itself, not part of either file.
    sd.update({k: v for k, v in expected.items() if k.startswith("scaling_layer.")})
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(f"{alexnet_path} / {linear_path}: the weights do not fit LPIPS (missing "
                               f"{format_keys(missing)}; unexpected {format_keys(unexpected)})")
    model.load_state_dict(sd, strict=True)
    return LoadedNetwork(ALEXNET, model.eval(), {"alexnet": str(alexnet_path), "lpips_linear": str(linear_path)})


def _load_kinetics_net(path: str | os.PathLike, spec, build, head_key: str, file_key: str) -> LoadedNetwork:
    """A Kinetics 3D network built with the class count its head holds (400 without a head), loaded strictly."""
    path = Path(path)
    sd = _state(path, spec)
    net = build(num_classes=int(sd[head_key].shape[0]) if head_key in sd else 400)
    load_strict(net, _fill_bn_counters(net, sd), spec.title, path)
    return LoadedNetwork(spec, net.eval(), {file_key: str(path)})


def load_resnet3d(path: str | os.PathLike) -> LoadedNetwork:
    """The 3D ResNet-50 from ``resnet-50-kinetics.pth`` or ``r3d50_K_200ep.pth`` (classes read from the file)."""
    from .nets3d import ResNet3D50

    return _load_kinetics_net(path, RESNET3D, ResNet3D50, "fc.weight", "resnet3d50")


def load_i3d(path: str | os.PathLike) -> LoadedNetwork:
    """I3D from ``i3d_pretrained_400.pt`` (classes read from the file)."""
    from .nets3d import InceptionI3D

    return _load_kinetics_net(path, I3D, InceptionI3D, "logits.conv3d.weight", "i3d")


def load_networks(search: WeightsSearch, wanted: Sequence[str]) -> tuple[dict[str, LoadedNetwork], dict[str, str]]:
    """The networks the metrics in ``wanted`` need: (metric -> network, metric -> why it is left out)."""
    nets: dict[str, LoadedNetwork] = {}
    skipped: dict[str, str] = {}
    for metric in wanted:
        try:
            _load_one(search, metric, nets, skipped)
        except ImportError as exc:
            package = {"LPIPS": "lpips", "FID": "pytorch-fid"}.get(metric, str(exc.name))
            skipped[metric] = f"the Python package {package!r} is not installed (pip install {package})"
    return nets, skipped


def _load_one(search: WeightsSearch, metric: str, nets: dict, skipped: dict) -> None:
    """Load the network of one metric into ``nets``, or record in ``skipped`` why it cannot be."""
    if metric == "LPIPS":
        trunk, lin = search.find(ALEXNET), lpips_linear_file(search)
        if trunk is None:
            skipped[metric] = search.missing_reason(ALEXNET)
        elif lin is None:
            skipped[metric] = ("no LPIPS linear layers: install the lpips package (pip install lpips) or put its "
                               "weights/v0.1/alex.pth into the tcan/metrics model folder")
        else:
            nets[metric] = load_lpips(trunk, lin)
        return
    loaders = {"FID": (INCEPTION, load_inception), "FID-VID": (RESNET3D, load_resnet3d), "FVD": (I3D, load_i3d)}
    if metric not in loaders:
        return
    network, loader = loaders[metric]
    path = search.find(network)
    if path is None:
        skipped[metric] = search.missing_reason(network)
    else:
        nets[metric] = loader(path)
