"""The pack's layout and its layering rule: tcan_core never imports ComfyUI."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

FORBIDDEN = {"comfy", "folder_paths", "server", "nodes", "comfy_extras", "execution"}


def test_layout():
    for name in ("__init__.py", "nodes", "tcan_core", "workflows", "web", "tests", "requirements.txt",
                 "pyproject.toml", "README.md", ".ci/run", "bench"):
        assert (ROOT / name).exists(), name


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_tcan_core_never_imports_comfyui():
    bad = []
    for path in sorted((ROOT / "tcan_core").rglob("*.py")):
        for line, module in _imports(path):
            if module.split(".")[0] in FORBIDDEN:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "tcan_core must not import ComfyUI:\n" + "\n".join(bad)


def test_rule_checker_catches_a_violation(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom comfy.utils import ProgressBar\ndef f():\n    import folder_paths\n")
    assert [m for _, m in _imports(sample) if m.split(".")[0] in FORBIDDEN] == ["comfy.utils", "folder_paths"]


def test_torch_load_only_with_weights_only():
    for path in list((ROOT / "tcan_core").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno} torch.load without weights_only=True"


def test_no_eval_or_exec():
    for path in list((ROOT / "tcan_core").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("eval", "exec"):
                raise AssertionError(f"{path}:{node.lineno} calls {node.func.id}")
