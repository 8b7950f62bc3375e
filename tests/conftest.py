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


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """The tiny SD1.5 model set written in the real formats into a ComfyUI-style models root."""
    from tcan_core.tiny.sd15 import write_tiny_model_tree

    return write_tiny_model_tree(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model work on one torch thread, restored after: tiny tensors gain nothing from
    threads, and on a busy 2-core runner two threads wait on each other (up to 10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
