"""Installs the way users install, in fresh virtual environments that already have torch.

Each environment is a ``--system-site-packages`` venv, so it sees this machine's torch (the
"ComfyUI's Python with its CUDA torch" of a user) without downloading it again. The commands are
the README's install commands, run offline (``--no-index``: every requirement must already be
there, so nothing can be downloaded, replaced or upgraded) and with ``--report`` to list what pip
installed. Then: torch is the same build, from the same place, and the pack registers every node
when loaded the way ComfyUI loads a custom node (or by ComfyUI itself when COMFYUI_PATH is set).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from test_install_metadata import packed_archive, source_tree

pytestmark = pytest.mark.slow

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

TORCH_PROBE = """
import json, torch
print(json.dumps({"version": torch.__version__, "cuda": torch.version.cuda, "git": torch.version.git_version,
                  "file": torch.__file__}))
"""

# Loads the pack like ComfyUI's nodes.load_custom_node (a module spec from the folder's __init__.py,
# named after its path) and lists what it registered; then imports every nodes/nodes_*.py file on
# its own, so a topic module that failed to load (and was skipped with a log line) shows up.
LOAD_PACK = """
import glob, importlib, importlib.util, json, logging, os, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.levelname} {record.name}: {record.getMessage()}")
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.WARNING)
pack_dir = sys.argv[1]
name = pack_dir.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
expected = {}
for path in sorted(glob.glob(os.path.join(pack_dir, "nodes", "nodes_*.py"))):
    topic = importlib.import_module(f"{name}.nodes.{os.path.basename(path)[:-3]}")
    expected.update(getattr(topic, "NODE_CLASS_MAPPINGS", {}))
import tcan_core
print(json.dumps({"nodes": sorted(module.NODE_CLASS_MAPPINGS), "expected": sorted(expected),
                  "display": sorted(module.NODE_DISPLAY_NAME_MAPPINGS), "web": module.WEB_DIRECTORY,
                  "tcan_core": tcan_core.__file__, "version": tcan_core.__version__, "log": records}))
"""

# The same through the real ComfyUI at COMFYUI_PATH: its own loader, on the CPU.
LOAD_IN_COMFYUI = """
import asyncio, json, os, sys
comfyui, pack_dir = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfyui)
import comfy.options
comfy.options.enable_args_parsing()
import nodes
ok = asyncio.run(nodes.load_custom_node(pack_dir))
mine = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
              if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(os.path.basename(pack_dir)))
print(json.dumps({"ok": ok, "nodes": mine, "web": sorted(nodes.EXTENSION_WEB_DIRS)}))
"""


class Env:
    """A fresh venv over this machine's site-packages (torch included) and the commands run in it."""

    def __init__(self, path: Path):
        venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
        self.path = path
        self.bin = path / ("Scripts" if os.name == "nt" else "bin")
        self.python = str(self.bin / "python")

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(VIRTUAL_ENV=str(self.path), PATH=str(self.bin) + os.pathsep + env.get("PATH", ""),
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        out = subprocess.run(list(args), cwd=cwd or self.path, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout}\n{out.stderr}"
        return out

    def pip_install(self, *args: str, cwd: Path | None = None) -> list[str]:
        """``python -m pip install ARGS`` offline; returns the names of the distributions pip installed."""
        report = self.path / "pip-report.json"
        self.run(self.python, "-m", "pip", "install", "--no-index", "--report", str(report), *args, cwd=cwd)
        return sorted(item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"])

    def probe(self, code: str, *args: str) -> dict:
        return json.loads(self.run(self.python, "-c", code, *args).stdout.strip().splitlines()[-1])

    def own_site_packages(self) -> list[str]:
        """Top-level names installed into this venv itself (not the system site-packages it sees)."""
        found = self.run(self.python, "-c", "import site, sys; print(site.getsitepackages([sys.prefix])[0])")
        folder = Path(found.stdout.strip())
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def check_pack_loads(env: Env, pack_dir: Path, in_comfyui: bool = False) -> dict:
    """The pack loads in ``env`` with every node of every nodes_*.py file registered, and its own tcan_core.

    With ``in_comfyui`` and COMFYUI_PATH set, ComfyUI's own loader must register the same nodes
    (once per test: importing ComfyUI costs tens of seconds).
    """
    loaded = env.probe(LOAD_PACK, str(pack_dir))
    assert loaded["nodes"], "the pack registered no node"
    assert loaded["nodes"] == loaded["expected"], (sorted(set(loaded["expected"]) - set(loaded["nodes"])),
                                                   loaded["log"])
    assert loaded["display"] == loaded["nodes"]
    assert loaded["web"] == "./web" and (pack_dir / "web" / "tcan.js").is_file()
    assert Path(loaded["tcan_core"]).resolve().parent == (pack_dir / "tcan_core").resolve(), loaded["tcan_core"]
    assert loaded["version"] == PROJECT["version"]
    assert not [line for line in loaded["log"] if "TCAN" in line or "tcan" in line], loaded["log"]
    comfyui = os.environ.get("COMFYUI_PATH")
    if in_comfyui and comfyui:
        served = env.probe(LOAD_IN_COMFYUI, comfyui, str(pack_dir))
        assert served["ok"] and served["nodes"] == loaded["nodes"], served
    return loaded


@pytest.fixture(scope="module")
def torch_before() -> dict:
    out = subprocess.run([sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path | None:
    """The registry archive (`comfy node pack`), or None where comfy-cli is not installed."""
    try:
        import comfy_cli  # noqa: F401
    except ImportError:
        return None
    tmp = tmp_path_factory.mktemp("pack")
    return packed_archive(tmp / "tree", tmp)


def test_comfyui_manager_install_keeps_torch_and_registers_every_node(tmp_path, torch_before, archive):
    """The pack in custom_nodes, then `pip install -r requirements.txt`; then the extras by name."""
    env = Env(tmp_path / "venv")
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    if archive is not None:
        # The registry's install: its archive unpacked into custom_nodes/<node id>. The archive
        # holds the git-tracked files, which is what a `git clone` gives too.
        pack_dir = custom_nodes / PROJECT["name"]
        zipfile.ZipFile(archive).extractall(pack_dir)
    else:
        pack_dir = source_tree(custom_nodes / "ComfyUI-TCAN")
    installed = env.pip_install("-r", "requirements.txt", cwd=pack_dir)
    assert installed == [], f"requirements.txt installed {installed} over ComfyUI's environment"
    assert env.probe(TORCH_PROBE) == torch_before
    check_pack_loads(env, pack_dir)

    # The optional extras as the README's table names them (the CPU build of onnxruntime here).
    assert env.pip_install("onnxruntime", "insightface", "controlnet_aux") == []
    assert env.probe(TORCH_PROBE) == torch_before
    runtimes = env.probe("import json; from importlib import metadata as m; print(json.dumps(sorted("
                         "d.metadata['Name'].lower() for d in m.distributions() "
                         "if d.metadata['Name'].lower().replace('_', '-').startswith('onnxruntime'))))")
    assert len(runtimes) == 1, f"more than one onnxruntime build is installed: {runtimes} (see README)"
    check_pack_loads(env, pack_dir, in_comfyui=True)
    assert not [n for n in env.own_site_packages() if n.lower().startswith("torch")]


def test_pip_install_gives_the_library_and_the_tcan_command(tmp_path, torch_before):
    """`pip install .` then `pip install .[pose,face]` from a clone: tcan_core, `tcan`, nothing else."""
    env = Env(tmp_path / "venv")
    src = source_tree(tmp_path / "ComfyUI-TCAN")
    # --no-build-isolation: the isolated build would fetch setuptools from PyPI; this test is offline.
    assert env.pip_install("--no-build-isolation", ".", cwd=src) == [PROJECT["name"]]
    assert env.probe(TORCH_PROBE) == torch_before
    tcan = shutil.which("tcan", path=str(env.bin))
    assert tcan and Path(tcan).parent == env.bin
    helped = env.run(tcan, "--help")
    assert "doctor" in helped.stdout and "animate" in helped.stdout
    assert helped.stdout == env.run(env.python, "-m", "tcan_core", "--help").stdout
    assert env.run(tcan, "--version").stdout.strip() == f"tcan_core {PROJECT['version']}"
    # The installed copy finds the SD1.5 configs it ships (package data of the wheel).
    configs = env.probe("import json; from tcan_core.models.sd15 import shipped_config; print(json.dumps("
                        "[shipped_config(n)['_class_name'] for n in ('sd15_unet', 'sd15_vae', 'sd15_controlnet')]))")
    assert configs == ["UNet2DConditionModel", "AutoencoderKL", "ControlNetModel"]

    files = env.probe("import json; from importlib import metadata as m; "
                      f"print(json.dumps([str(f) for f in m.files({PROJECT['name']!r})]))")
    top = {f.split("/")[0] for f in files}
    assert "tcan_core" in top and "nodes" not in top and "__init__.py" not in top, sorted(top)
    assert "tcan_core/models/configs/sd15_unet.json" in files
    assert any(f.endswith("licenses/LICENSE") for f in files)
    installed_at = env.probe("import json, tcan_core; print(json.dumps(tcan_core.__file__))")
    assert str(env.path) in installed_at, installed_at

    extras = env.pip_install("--no-build-isolation", ".[pose,face]", cwd=src)
    assert extras in ([], [PROJECT["name"]]), extras
    env.probe("import json, onnxruntime, insightface; print(json.dumps(onnxruntime.get_available_providers()))")
    assert env.probe(TORCH_PROBE) == torch_before
    assert not [n for n in env.own_site_packages() if n.lower().startswith("torch")]

    # The same folder as a ComfyUI custom node still uses its own tcan_core, not the installed copy.
    check_pack_loads(env, src)
