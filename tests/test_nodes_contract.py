"""Every node the pack registers follows ComfyUI's classic node contract."""

from __future__ import annotations

import importlib
import inspect

import pytest

from conftest import load_pack

PACK = load_pack()
NODE_IDS = sorted(PACK.NODE_CLASS_MAPPINGS)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def test_pack_registers_nodes():
    assert NODE_IDS, "the pack registers no nodes"
    assert PACK.WEB_DIRECTORY == "./web"
    assert set(PACK.NODE_DISPLAY_NAME_MAPPINGS) == set(PACK.NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """A models root with a tiny file in every folder, so model dropdowns have entries."""
    from tcan_core.tiny.tree import write_demo_tree

    host = importlib.import_module(f"{PACK.__name__}.nodes.host")
    root = write_demo_tree(tmp_path_factory.mktemp("demo_models")).root
    host.set_models_root(root)
    yield root
    host.set_models_root(None)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_contract(node_id, demo_models):
    cls = PACK.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("TCAN"), node_id
    assert PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("TCAN ")
    assert isinstance(cls.CATEGORY, str) and cls.CATEGORY.startswith("TCAN/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40

    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    inputs = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, entry)
            kind = entry[0]
            options = entry[1] if len(entry) == 2 else {}
            assert isinstance(kind, (str, list)), (name, kind)
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, str) and kind in WIDGET_TYPES and kind != "BOOLEAN":
                assert "default" in options or kind == "STRING", f"{node_id}.{name} widget has no default"
            if isinstance(kind, list):
                assert kind, f"{node_id}.{name} dropdown is empty"
                if "default" in options:
                    assert options["default"] in kind
            inputs[name] = section

    outputs = cls.RETURN_TYPES
    assert isinstance(outputs, tuple)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(outputs)
    if not outputs:
        assert getattr(cls, "OUTPUT_NODE", False), f"{node_id} returns nothing and is no output node"

    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    names = [p for p in params if p != "self"]
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, section in inputs.items():
        assert name in params or accepts_kwargs, f"{node_id}.{cls.FUNCTION} does not take input {name!r}"
        if section == "optional" and name in params:
            assert params[name].default is not inspect.Parameter.empty, f"optional {name!r} needs a default"
    hidden = set(spec.get("hidden", {}))
    for name in names:
        p = params[name]
        if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        assert name in inputs or name in hidden or p.default is not inspect.Parameter.empty, \
            f"{node_id}.{cls.FUNCTION} parameter {name!r} is not an input"
