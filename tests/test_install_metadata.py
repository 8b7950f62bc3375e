"""Registry and package metadata: what `comfy node validate` and `comfy node pack` accept and produce,
the registry's naming rules, the version in one place, and requirements.txt equal to the wheel's
dependencies. Offline: comfy-cli runs with telemetry off, in a network namespace of its own where
``unshare`` allows one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]


def _comfy_cli() -> list[str]:
    """The `comfy` command of the installed comfy-cli (skips the test when it is missing)."""
    pytest.importorskip("comfy_cli", reason="comfy-cli is not installed: pip install -r requirements-dev.txt")
    exe = shutil.which("comfy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("comfy-cli is installed but its `comfy` command is not on PATH")
    return [exe, "--skip-prompt", "--no-enable-telemetry"]


def _offline_prefix() -> list[str]:
    """``unshare -n`` (no network at all) where this machine allows it; telemetry is off either way."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def run_comfy(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """Run ``comfy <args>`` in ``cwd`` with a throwaway HOME (comfy-cli writes its config there)."""
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), POSTHOG_API_KEY="",
               NO_COLOR="1", COLUMNS="200")
    return subprocess.run(_offline_prefix() + _comfy_cli() + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def source_tree(dest: Path) -> Path:
    """Copy the files git would commit (tracked and untracked, less the ignored) into ``dest``."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the registry packs git-tracked files")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def packed_archive(dest: Path, home: Path) -> Path:
    """What `comfy node pack` (the packing step of `comfy node publish`) makes of this checkout."""
    tree = source_tree(dest)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tree, check=True)
    subprocess.run(git + ["add", "-A"], cwd=tree, check=True)
    subprocess.run(git + ["commit", "-qm", "pack"], cwd=tree, check=True)
    out = run_comfy(["node", "pack"], tree, home)
    assert out.returncode == 0, out.stdout + out.stderr
    return tree / "node.zip"


def test_comfy_node_validate_accepts_the_pack(tmp_path):
    out = run_comfy(["node", "validate"], ROOT, tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    # comfy-cli prints warnings for a malformed licence, classifier or ComfyUI version and still
    # exits 0, so the output is read too.
    assert "Warning" not in text and "Error" not in text, text
    assert "Security warnings" not in text, text


def test_comfy_node_validate_reports_a_broken_pyproject(tmp_path):
    """The check above can fail: the same validator on a copy with a malformed licence and no version."""
    broken = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    broken = broken.replace('license = "GPL-3.0-or-later"', "license = 3").replace('version = "', 'old_version = "', 1)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "pyproject.toml").write_text(broken, encoding="utf-8")
    out = run_comfy(["node", "validate"], tmp_path / "pkg", tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "License should be in one of these two formats" in out.stdout + out.stderr


def test_registry_naming_rules():
    """The registry's rules for a node id (docs.comfy.org/registry/specifications) and a semantic version."""
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert name == name.lower(), "ComfyUI-Manager lower-cases the id; keep it lower-case so both agree"
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]
    assert "version" not in PROJECT.get("dynamic", []), "ComfyUI-Manager reads a static project.version"
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"]), COMFY["PublisherId"]
    assert COMFY["DisplayName"] == "ComfyUI-TCAN"
    urls = PROJECT["urls"]
    for key in ("Repository", "Documentation", "Bug Tracker", "Issues"):
        assert urls[key].startswith("https://github.com/"), (key, urls[key])
    assert urls["Issues"] == urls["Bug Tracker"] == urls["Repository"] + "/issues"


def test_icon_is_a_url_to_the_packs_own_icon():
    """The registry shows Icon from a URL; it must point at the icon this repository ships."""
    icon = COMFY["Icon"]
    repo = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix), icon
    local = ROOT / icon.removeprefix(prefix)
    assert local.is_file() and local.suffix in (".svg", ".png", ".jpg", ".gif"), local
    assert local.read_text(encoding="utf-8").lstrip().startswith("<svg")


def test_licence_is_the_gpl3_text():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE")
    assert "Version 3, 29 June 2007" in text and "END OF TERMS AND CONDITIONS" in text
    assert PROJECT["license"] == "GPL-3.0-or-later" and PROJECT["license-files"] == ["LICENSE"]


def test_version_lives_in_pyproject_only():
    import tcan_core

    assert tcan_core.__version__ == PROJECT["version"]
    # No other file of the library states a version of its own.
    for path in (ROOT / "tcan_core").rglob("*.py"):
        assert not re.search(r"^__version__\s*=\s*['\"]", path.read_text(encoding="utf-8"), re.M), path


def test_changelog_leads_with_the_current_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", changelog, re.M)
    assert versions and versions[0] == PROJECT["version"], versions


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def test_requirements_txt_matches_the_wheel_and_never_names_torch():
    """ComfyUI-Manager installs requirements.txt, pip the [project] dependencies: one list for both."""
    assert _requirement_lines(ROOT / "requirements.txt") == PROJECT["dependencies"]
    everything = PROJECT["dependencies"] + [d for deps in PROJECT["optional-dependencies"].values() for d in deps]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in everything}
    assert not names & {"torch", "torchvision", "torchaudio"}, names
    # One onnxruntime build per extra set: installing two makes them overwrite each other (README).
    assert "onnxruntime-gpu" not in names


def test_wheel_holds_the_library_only():
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert find == ["tcan_core", "tcan_core.*"]
    assert PROJECT["scripts"] == {"tcan": "tcan_core.cli:main"}


def test_published_archive_has_what_comfyui_loads(tmp_path):
    """`comfy node pack`: the pack's entry, nodes, library, front end, workflows and licence; no build litter."""
    archive = packed_archive(tmp_path / "tree", tmp_path)
    names = set(zipfile.ZipFile(archive).namelist())
    for required in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md",
                     "CHANGELOG.md", "nodes/__init__.py", "tcan_core/__init__.py", "tcan_core/cli.py",
                     "tcan_core/models/configs/sd15_unet.json", "web/tcan.js", COMFY["Icon"].rsplit("/main/", 1)[1]):
        assert required in names, required
    for folder in COMFY["includes"]:
        shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}
        assert shipped and shipped <= names, sorted(shipped - names)
    workflows = [n for n in names if n.startswith("workflows/") and n.endswith(".json")]
    assert len(workflows) >= 1
    assert not [n for n in names if n.startswith(("build/", "dist/")) or ".egg-info/" in n or "__pycache__" in n]


def test_comfyui_reads_the_pyproject():
    """ComfyUI's own parser (comfy_config) reads this pyproject.toml for every custom node it loads."""
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run")
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from comfy_config import config_parser as c;"
            "cfg = c.extract_node_configuration(sys.argv[2]);"
            "print(cfg.project.name, cfg.project.version, cfg.tool_comfy.publisher_id, cfg.project.urls.repository)")
    out = subprocess.run([sys.executable, "-c", code, comfyui, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [PROJECT["name"], PROJECT["version"], COMFY["PublisherId"],
                                  PROJECT["urls"]["Repository"]]


def test_pack_names_another_tcan_core_that_was_imported_first(tmp_path):
    """A tcan_core imported before the pack (another copy, say a pip install of an older version) is named in a warning."""
    other = tmp_path / "elsewhere" / "tcan_core"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("__version__ = '0.0.1'\n", encoding="utf-8")
    code = "\n".join([
        "import logging, sys",
        "logging.basicConfig(level=logging.WARNING)",
        f"sys.path.insert(0, {str(other.parent)!r})",
        "import tcan_core",
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})",
        "from conftest import load_pack",
        "try:",
        "    load_pack()",
        "except Exception as exc:",  # the stand-in has none of the library the nodes import
        "    print('load failed:', type(exc).__name__)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert f"tcan_core was already imported from {other}" in out.stderr, out.stderr
    assert "pip uninstall comfyui-tcan" in out.stderr
