"""The metric networks at their real architectures with random weights, saved in the published files' formats
(for the tests and the benchmark; their numbers mean nothing, their shapes and code paths are the real ones)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def calibrate_batch_norm(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.nn.Module:
    """Set every batch norm's running statistics to those of one forward pass on ``inputs``, so activations of a
    randomly initialised deep network keep unit scale instead of fading to denormal numbers (slow and all-zero)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one pass, exactly that pass's statistics
    module.train()
    with torch.no_grad():
        module(*inputs)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return module.eval()


def write_metric_weights(folder: str | Path, seed: int = 0, r3d_layout: str = "r3d50") -> dict[str, Path]:
    """Write into ``folder`` (a ``tcan/metrics`` model folder): pytorch-fid's Inception checkpoint, torchvision's
    AlexNet, LPIPS linear layers, the 3D ResNet-50 (``r3d50``: r3d50_K_200ep.pth layout with 700 classes;
    ``disco``: resnet-50-kinetics.pth with ``module.`` keys and 400 classes) and I3D."""
    import lpips
    import torchvision

    from ..metrics.nets3d import InceptionI3D, ResNet3D50
    from ..metrics.weights import fid_inception_module

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    files: dict[str, Path] = {}

    net = fid_inception_module()
    net.fc = torch.nn.Identity()
    calibrate_batch_norm(net, torch.rand(2, 3, 96, 96) * 2 - 1)
    net.fc = torch.nn.Linear(2048, 1008)
    files["inception"] = folder / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), files["inception"])

    files["alexnet"] = folder / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), files["alexnet"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
    files["lpips_linear"] = folder / "lpips_v0.1_alex.pth"
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("lin")}, files["lpips_linear"])

    r3d = ResNet3D50(num_classes=700 if r3d_layout == "r3d50" else 400)
    # Zero-gamma residual branches (Goyal et al. 2017) keep its activations at a sane scale without a calibration
    # pass, which costs seconds for a 3D ResNet-50 on a CPU.
    for block in r3d.modules():
        if hasattr(block, "bn3"):
            torch.nn.init.zeros_(block.bn3.weight)
    if r3d_layout == "r3d50":
        sd = r3d.state_dict()
        files["resnet3d50"] = folder / "r3d50_K_200ep.pth"
        torch.save({"epoch": 200, "arch": "resnet", "state_dict": sd}, files["resnet3d50"])
    else:
        sd = {f"module.{k}": v for k, v in r3d.state_dict().items()
              if not k.endswith("num_batches_tracked")}
        files["resnet3d50"] = folder / "resnet-50-kinetics.pth"
        torch.save({"epoch": 200, "arch": "resnet-50", "state_dict": sd}, files["resnet3d50"])

    files["i3d"] = folder / "i3d_pretrained_400.pt"
    i3d = calibrate_batch_norm(InceptionI3D(400), torch.rand(2, 3, 8, 32, 32) * 2 - 1)
    torch.save(i3d.state_dict(), files["i3d"])
    return files
