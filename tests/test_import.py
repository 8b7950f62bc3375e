"""The pack imports without ComfyUI, without each optional dependency, cheaply and offline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

OPTIONAL = ("onnxruntime", "insightface", "controlnet_aux")


def _run(code: str) -> dict:
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, json, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        {{setup}}
        from conftest import load_pack
        pack = load_pack()
        heavy = [m for m in ("diffusers", "transformers", "onnxruntime", "insightface", "controlnet_aux",
                             "accelerate", "comfy") if m in sys.modules]
        print(json.dumps({{"nodes": sorted(pack.NODE_CLASS_MAPPINGS), "heavy": heavy}}))
    """).replace("{setup}", textwrap.indent(code, " " * 0).strip() or "pass")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


BLOCK = """
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {name!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="module")
def plain_import():
    return _run("")


def test_import_without_comfyui_is_cheap(plain_import):
    assert plain_import["nodes"]
    assert plain_import["heavy"] == [], f"importing the pack pulled in {plain_import['heavy']}"


@pytest.mark.parametrize("missing", OPTIONAL)
def test_import_without_optional_dependency(plain_import, missing):
    result = _run(BLOCK.format(name=missing))
    assert result["nodes"] == plain_import["nodes"]


def test_require_names_the_package_to_install(pack):
    common = sys.modules["comfyui_tcan.nodes.common"]
    with pytest.raises(RuntimeError, match=r"TCAN Test Node needs .*pip install no_such_module_xyz"):
        common.require("no_such_module_xyz", "TCAN Test Node")


def test_network_is_blocked():
    import socket

    with pytest.raises(RuntimeError, match="network access attempted"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
