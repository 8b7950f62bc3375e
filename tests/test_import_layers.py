"""The library's imports run one way: no cycle between its files, none between its packages, and the
layer rules of the README's "how to extend" section hold. Read from the source with ``ast`` (every
import counts, also those inside functions), so a cycle hidden behind a lazy import is found too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tcan_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The tcan_core module that ``name`` (a module or an attribute of one) refers to, or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """tcan_core modules imported anywhere in ``path`` (imports under ``if TYPE_CHECKING`` left out)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            # ``from pkg import name``: the submodule when ``name`` is one, else the package itself.
            # Python runs ``pkg/__init__`` first, which counts for importers outside ``pkg``; inside it
            # the package is already being imported, so ``from . import sibling`` is no edge to it.
            subs = [f"{root}.{alias.name}" for alias in node.names if f"{root}.{alias.name}" in modules]
            inside = module == root or module.startswith(root + ".")
            names = subs + ([] if subs and inside else [root])
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _package_of(module: str) -> str:
    """tcan_core.<top>: the top-level package (or module) a module belongs to."""
    return ".".join(module.split(".")[:2])


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        # The package root (tcan_core/__init__.py) only re-exports the version.
        source = _package_of(module)
        packages.setdefault(source, set()).update(
            _package_of(t) for t in targets if _package_of(t) != source and t != "tcan_core")
    return packages


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    cycle = _cycle(_package_graph(_graph()))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


# Lower layers never import upper ones: (package, packages it must not import).
LAYERS = [
    ("tcan_core.bases", {"tcan_core.attention", "tcan_core.animation", "tcan_core.face", "tcan_core.pose",
                         "tcan_core.models", "tcan_core.tpc"}),
    ("tcan_core.attention", {"tcan_core.animation", "tcan_core.face", "tcan_core.pose", "tcan_core.tpc"}),
    ("tcan_core.models", {"tcan_core.animation", "tcan_core.face", "tcan_core.pose", "tcan_core.tpc"}),
    ("tcan_core.animation", {"tcan_core.face"}),
]


@pytest.mark.parametrize("package, forbidden", LAYERS, ids=[p for p, _ in LAYERS])
def test_lower_layers_do_not_import_upper_ones(package, forbidden):
    graph = _graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if _package_of(m) == package
                   for t in targets if _package_of(t) in forbidden)
    assert not wrong, f"{package} imports a package above it: " + "; ".join(wrong)


# Training sits on top, next to the pipeline: only the command line reaches it.
TRAINING_USERS = {"tcan_core.training", "tcan_core.cli"}


def test_only_the_command_line_imports_training():
    graph = _graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if _package_of(m) not in TRAINING_USERS
                   for t in targets if _package_of(t) == "tcan_core.training")
    assert not wrong, "tcan_core.training is the top layer; below it: " + "; ".join(wrong)


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
