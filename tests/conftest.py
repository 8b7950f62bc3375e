"""Shared fixtures. The suite runs on the CPU, offline: a socket guard refuses any connection
that is not to the loopback interface, so a test that tries to download fails loudly."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127.")
                                  or self.family == getattr(socket, "AF_UNIX", None)):
        return _real_connect(self, address)
    raise RuntimeError(f"network access attempted during tests: {address!r}")


socket.socket.connect = _guarded_connect

# Property tests draw the same examples on every run (CI must not pass or fail by luck); pass
# --hypothesis-profile=explore to draw new ones.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("repeatable", derandomize=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile("repeatable")


def load_pack(name: str = "comfyui_tcan"):
    """Import the pack the way ComfyUI does: a module spec from the folder's __init__.py."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _temp_previews(tmp_path_factory):
    """Preview frames the nodes write (nodes/previews.py) go to a test folder, not the system temp."""
    os.environ["TCAN_TEMP_DIR"] = str(tmp_path_factory.mktemp("comfy_temp"))


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """The tiny SD1.5 model set written in the real formats into a ComfyUI-style models root."""
    from tcan_core.tiny.sd15 import write_tiny_model_tree

    return write_tiny_model_tree(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tiny_parts():
    """Tiny SD1.5 UNet, VAE and text encoder, OpenPose ControlNet, v2 motion adapter and the empty-prompt context."""
    from tcan_core.animation.text import encode_empty_prompt
    from tcan_core.tiny.sd15 import build_tiny_controlnet, build_tiny_motion_adapter, build_tiny_sd15

    unet, vae, text = build_tiny_sd15()
    return dict(unet=unet, vae=vae, text=text, controlnet=build_tiny_controlnet(),
                adapter=build_tiny_motion_adapter("v2"), context=encode_empty_prompt(text))


@pytest.fixture(scope="module")
def tiny_model(tiny_parts):
    """A TCAN model of the tiny parts, with no patches."""
    from tcan_core.animation.model import TCANModel

    return TCANModel(tiny_parts["unet"], tiny_parts["vae"], tiny_parts["text"], "tiny")


@pytest.fixture(scope="module")
def demo_models(pack, tmp_path_factory):
    """The complete tiny tree (every kit, ``write_demo_tree``) as the host's models root for the module."""
    from tcan_core.tiny.tree import write_demo_tree

    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    tree = write_demo_tree(tmp_path_factory.mktemp("demo_models"))
    host.set_models_root(tree.root)
    yield tree
    host.set_models_root(None)


def node(pack, name):
    """A fresh instance of the pack's node class ``name``."""
    return pack.NODE_CLASS_MAPPINGS[name]()


def result(out):
    """(result tuple, report text) of a node return value."""
    return out["result"], out["ui"]["text"][0]


def rel(tree, key, folder):
    """A tree file's name relative to its model folder, as a node's dropdown lists it."""
    return tree.files[key].relative_to(tree.root / folder).as_posix()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model work on one torch thread, restored after: tiny tensors gain nothing from
    threads, and on a busy 2-core runner two threads wait on each other (up to 10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
