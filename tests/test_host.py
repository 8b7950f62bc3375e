"""The host bridge: ComfyUI's services when present (faked here), plain fallbacks when not."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from conftest import ROOT
from tcan_core.model_folders import FOLDERS, ModelFolders, resolve_in_folders


def _fake_comfyui(monkeypatch, tmp_path, calls):
    models = tmp_path / "ComfyUI" / "models"
    user_ckpt = tmp_path / "shared_models" / "animatediff"
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.folder_names_and_paths = {
        "checkpoints": ([str(models / "checkpoints")], {".safetensors", ".ckpt"}),
        # as extra_model_paths.yaml leaves it: a user path, and no extensions yet
        "animatediff_models": ([str(user_ckpt)], set()),
    }
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_input_directory = lambda: str(tmp_path / "ComfyUI" / "input")
    fp.get_output_directory = lambda: str(tmp_path / "ComfyUI" / "output")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.unet_dtype = lambda device=None: torch.float16
    mm.free_memory = lambda n, d: calls.append(("free", n))
    mm.get_free_memory = lambda d: 123
    mm.soft_empty_cache = lambda: calls.append(("empty",))

    def interrupted():
        calls.append(("interrupt",))
        raise InterruptedError("cancelled")

    mm.throw_exception_if_processing_interrupted = interrupted
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            calls.append(("bar", total))

        def update_absolute(self, value, total=None, preview=None):
            calls.append(("update", value, total, preview is not None))

    utils.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    for name, mod in {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils, "folder_paths": fp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("host_in_comfy", ROOT / "nodes" / "host.py")
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    return host, fp, models, user_ckpt


def test_bridge_uses_comfyui_services(monkeypatch, tmp_path):
    calls = []
    host, fp, models, user_ckpt = _fake_comfyui(monkeypatch, tmp_path, calls)
    assert host.IN_COMFYUI
    host.register_model_folders()
    for name, (_subdirs, exts) in FOLDERS.items():
        paths, registered = fp.folder_names_and_paths[name]
        assert set(exts) <= registered, name
        assert paths, name
    paths, _ = fp.folder_names_and_paths["animatediff_models"]
    assert paths[0] == str(user_ckpt), "a folder from extra_model_paths.yaml must be kept"
    assert str(models / "animatediff_models") in paths
    assert str(models / "tcan" / "pose") in fp.folder_names_and_paths["tcan_pose"][0]

    assert host.input_directory() == str(tmp_path / "ComfyUI" / "input")
    assert host.output_directory() == str(tmp_path / "ComfyUI" / "output")
    assert host.unet_dtype() == torch.float16
    assert host.free_bytes() == 123
    host.free_memory(10)
    bar = host.Progress(3)
    bar.update(1)
    bar.update(1, preview=torch.rand(8, 8, 3))
    assert ("bar", 3) in calls and ("update", 1, 3, False) in calls and ("update", 2, 3, True) in calls
    with pytest.raises(InterruptedError):
        host.check_interrupt()

    target = user_ckpt / "mm.ckpt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert host.model_path("animatediff_models", "mm.ckpt") == str(target.resolve())
    assert host.list_models("animatediff_models") == ["mm.ckpt"]
    with pytest.raises(ValueError, match="relative to the 'animatediff_models' model folder"):
        host.model_path("animatediff_models", "../../etc/passwd")


def test_fallbacks_without_comfyui(pack, tmp_path):
    host = sys.modules["comfyui_tcan.nodes.host"]
    assert not host.IN_COMFYUI
    assert host.torch_device().type in ("cpu", "cuda", "mps")
    assert host.unet_dtype(torch.device("cpu")) == torch.float32
    host.set_models_root(tmp_path)
    try:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "a.safetensors").write_bytes(b"x")
        (tmp_path / "checkpoints" / "notes.txt").write_text("x")
        assert host.list_models("checkpoints") == ["a.safetensors"]
        with host.Progress(2) as bar:
            bar.update(2)
        host.check_interrupt()
        with pytest.raises(FileNotFoundError) as err:
            host.model_path("checkpoints", "missing.safetensors")
        message = str(err.value)
        assert str(tmp_path / "checkpoints") in message and "missing.safetensors" in message
        assert "v1-5-pruned-emaonly.safetensors" in message and "stable-diffusion-v1-5" in message
    finally:
        host.set_models_root(None)


def test_resolution_never_leaves_the_folder(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    for name in ("../secret.safetensors", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            resolve_in_folders("checkpoints", name, [str(tmp_path / "inside")])
    # A link the folder's owner placed inside the folder is followed, as ComfyUI's loaders do.
    link = tmp_path / "inside" / "link.safetensors"
    link.symlink_to(tmp_path / "secret.safetensors")
    assert resolve_in_folders("checkpoints", "link.safetensors", [str(tmp_path / "inside")]) == str(link)
    for name in ("../inside/link.safetensors", str(link)):
        with pytest.raises(ValueError):
            resolve_in_folders("checkpoints", name, [str(tmp_path / "inside")])


def test_model_folders_lists_diffusers_folders(tiny_tree):
    folders = ModelFolders(tiny_tree.root)
    names = folders.list("checkpoints")
    assert "tiny_sd15_diffusers" in names and "tiny_sd15.safetensors" in names
    assert not any(n.startswith("tiny_sd15_diffusers/") for n in names)
