"""Optional: the pack inside a real ComfyUI (set COMFYUI_PATH to a ComfyUI checkout).

Starts that ComfyUI on 127.0.0.1 with --cpu and the pack linked into a temporary custom_nodes
folder, checks every TCAN node is served by /object_info with no import error logged, checks the
core-node table the workflow test relies on, then stops it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, load_pack

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-TCAN").symlink_to(ROOT)
    port = _free_port()
    log = open(base / "comfyui.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--disable-auto-launch"],
        cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail("ComfyUI exited:\n" + log.read()[-4000:])
            try:
                with urllib.request.urlopen(url + "/object_info", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("ComfyUI did not answer within 240 s")
        log.seek(0)
        yield info, log.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_every_node_is_served(comfyui):
    info, output = comfyui
    missing = sorted(set(load_pack().NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"not served by ComfyUI: {missing}"
    ours = [line for line in output.splitlines()
            if "ComfyUI-TCAN" in line and ("IMPORT FAILED" in line or "Cannot import" in line or "could not load" in line)]
    assert not ours, "\n".join(ours) + "\n" + output[-4000:]


def test_core_node_table_matches_comfyui(comfyui):
    info, _ = comfyui
    table = json.loads((Path(ROOT) / "tests" / "data" / "comfy_core_nodes.json").read_text())
    for name, spec in table.items():
        if name.startswith("_"):
            continue
        assert name in info, name
        assert list(info[name]["output"]) == spec["outputs"], name
        declared = {**info[name]["input"].get("required", {}), **info[name]["input"].get("optional", {})}
        for inp, kind in spec["inputs"].items():
            assert declared[inp][0] == kind, (name, inp)
