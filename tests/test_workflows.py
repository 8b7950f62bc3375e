"""Every example workflow uses only node types the pack or ComfyUI core defines, with links whose
types match both ends, widget values that fit the nodes' widgets, every required input of an
active node connected, and a thumbnail for ComfyUI's template browser."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from conftest import ROOT, load_pack

PACK = load_pack()
CORE = {k: v for k, v in json.loads((ROOT / "tests" / "data" / "comfy_core_nodes.json").read_text()).items()
        if not k.startswith("_")}
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# The front end's value-control widget ("control after generate") and the node modes it saves.
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
THUMBNAIL_MAX_BYTES = 60_000


def has_control_widget(name: str, kind, options: dict) -> bool:
    """Whether ComfyUI's front end adds a 'control after generate' widget (one more saved value).

    As the front end does (useIntWidget / useComboWidget): an INT widget gets one when its options
    say ``control_after_generate``, or, when they do not say, when it is named seed or noise_seed;
    a combo only when the option is set.
    """
    if kind == "INT":
        return bool(options.get("control_after_generate", name in ("seed", "noise_seed")))
    return isinstance(kind, list) and bool(options.get("control_after_generate"))


def pack_signature(cls) -> tuple[dict, list, list]:
    """(link inputs {name: type}, output types, widget specs [(name, kind, options)])."""
    spec = cls.INPUT_TYPES()
    links, widgets = {}, []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(kind, list) or kind in WIDGETS:
                widgets.append((name, kind, options))
            else:
                links[name] = kind
    return links, list(cls.RETURN_TYPES), widgets


def required_links(cls) -> set[str]:
    return {name for name, entry in cls.INPUT_TYPES().get("required", {}).items()
            if not (isinstance(entry[0], list) or entry[0] in WIDGETS)}


def input_type(node_type: str, name: str) -> str | None:
    """The type a node's input ``name`` takes when linked (a widget turned into an input included)."""
    if node_type in CORE:
        return CORE[node_type]["inputs"].get(name)
    links, _outs, widgets = pack_signature(PACK.NODE_CLASS_MAPPINGS[node_type])
    if name in links:
        return links[name]
    kind = next((k for n, k, _o in widgets if n == name), None)
    return "COMBO" if isinstance(kind, list) else kind


@pytest.fixture(scope="module")
def file_choices(tmp_path_factory) -> dict[tuple[str, str], tuple[str, ...]]:
    """{(node type, widget): model-file extensions} for the dropdowns that list model files.

    Outside ComfyUI those dropdowns hold only their fixed entries (no models folder), so a
    workflow's file name cannot be looked up; a probe file in every model folder shows which
    dropdowns list files, and a file name with one of the folder's extensions is accepted there.
    """
    host = importlib.import_module(f"{PACK.__name__}.nodes.host")
    folders = importlib.import_module("tcan_core.model_folders").FOLDERS
    root = tmp_path_factory.mktemp("probe_models")
    for name, (subdirs, exts) in folders.items():
        for sub in subdirs:
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"probe_{name}{exts[0]}").write_bytes(b"")
    host.set_models_root(root)
    try:
        found = {}
        for kind, cls in PACK.NODE_CLASS_MAPPINGS.items():
            for name, k, _o in pack_signature(cls)[2]:
                # A dropdown may prefix the file with its folder ("tcan/<file>") when it lists several.
                probes = [str(c).rsplit("/", 1)[-1] for c in (k if isinstance(k, list) else [])
                          if str(c).rsplit("/", 1)[-1].startswith("probe_")]
                if probes:
                    found[(kind, name)] = tuple(e for f, (_s, exts) in folders.items()
                                                if any(p.startswith(f"probe_{f}.") for p in probes) for e in exts)
    finally:
        host.set_models_root(os.environ.get("TCAN_MODELS_DIR"))
    return found


def types_match(a: str, b: str) -> bool:
    return a == b or "*" in (a, b)


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no example graph"


def test_seed_rule_counts_the_front_ends_widget():
    assert has_control_widget("seed", "INT", {})
    assert has_control_widget("noise_seed", "INT", {"min": 0})
    assert not has_control_widget("seed", "INT", {"control_after_generate": False})
    assert not has_control_widget("steps", "INT", {})
    assert has_control_widget("steps", "INT", {"control_after_generate": True})
    assert not has_control_widget("seed", "FLOAT", {})
    assert not has_control_widget("seed", ["a", "b"], {})


def check_widgets(kind: str, node: dict, file_choices: dict) -> None:
    values = node.get("widgets_values", [])
    if kind in CORE:
        lo, hi = CORE[kind]["widgets"]
        assert lo <= len(values) <= hi, f"{kind} node {node['id']}: {len(values)} widget values"
        return
    _links, _outs, widgets = pack_signature(PACK.NODE_CLASS_MAPPINGS[kind])
    extra = sum(1 for n, k, o in widgets if has_control_widget(n, k, o))
    assert len(values) == len(widgets) + extra, \
        f"{kind} node {node['id']}: {len(values)} widget values for widgets {[w[0] for w in widgets]}"
    it = iter(values)
    for name, k, options in widgets:
        value = next(it)
        if isinstance(k, list):
            exts = file_choices.get((kind, name), ())
            is_file = bool(exts) and str(value).lower().endswith(tuple(exts))
            assert value in k or is_file, f"{kind}.{name}: {value!r} is not one of {k} nor a model file ({exts})"
        elif k == "BOOLEAN":
            assert isinstance(value, bool), f"{kind}.{name}: {value!r} is not a boolean"
        elif k in ("INT", "FLOAT"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{kind}.{name}: {value!r}"
            assert options.get("min", value) <= value <= options.get("max", value), f"{kind}.{name}: {value} out of range"
        elif k == "STRING":
            assert isinstance(value, str), f"{kind}.{name}: {value!r} is not a string"
        if has_control_widget(name, k, options):
            control = next(it)
            assert control in CONTROL_VALUES, f"{kind}.{name}: control value {control!r} is not one of {CONTROL_VALUES}"


def _cycle(wf: dict) -> list[int]:
    """Node ids on a cycle of links (empty when the graph is acyclic)."""
    after: dict[int, set[int]] = {n["id"]: set() for n in wf["nodes"]}
    for link in wf["links"]:
        after[link[1]].add(link[3])
    state: dict[int, int] = {}
    path: list[int] = []

    def visit(node: int) -> list[int]:
        state[node] = 1
        path.append(node)
        for nxt in after[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt):]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in after:
        if node not in state and (found := visit(node)):
            return found
    return []


def test_cycle_check_finds_a_loop():
    nodes = [{"id": i} for i in (1, 2, 3)]
    assert _cycle({"nodes": nodes, "links": [[1, 1, 0, 2, 0, "X"], [2, 2, 0, 3, 0, "X"]]}) == []
    assert sorted(_cycle({"nodes": nodes, "links": [[1, 1, 0, 2, 0, "X"], [2, 2, 0, 3, 0, "X"],
                                                    [3, 3, 0, 1, 0, "X"]]})) == [1, 2, 3]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow(path: Path, file_choices):
    wf = json.loads(path.read_text())
    assert {"nodes", "links", "version"} <= set(wf), "not a ComfyUI UI-format workflow"
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf.get("last_node_id", max(nodes)) >= max(nodes)
    assert wf.get("last_link_id", 0) >= max((link[0] for link in wf["links"]), default=0)
    for node in wf["nodes"]:
        kind = node["type"]
        assert kind in PACK.NODE_CLASS_MAPPINGS or kind in CORE, \
            f"node {node['id']} has type {kind!r}, which neither the pack nor the core table defines"
        assert node.get("mode", MODE_ALWAYS) in (MODE_ALWAYS, MODE_NEVER, MODE_BYPASS), f"node {node['id']}: mode"
        check_widgets(kind, node, file_choices)
        if CORE.get(kind, {}).get("frontend_only"):
            assert not node.get("inputs") and not node.get("outputs"), f"{kind} node {node['id']} has sockets"
        if kind in PACK.NODE_CLASS_MAPPINGS and node.get("mode", MODE_ALWAYS) == MODE_ALWAYS:
            linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
            missing = required_links(PACK.NODE_CLASS_MAPPINGS[kind]) - linked
            assert not missing, f"{kind} node {node['id']}: required inputs {sorted(missing)} are not connected"

    assert not _cycle(wf), f"the links form a cycle through nodes {_cycle(wf)}; ComfyUI cannot run it"
    for link in wf["links"]:
        link_id, src, src_slot, dst, dst_slot, ltype = link[:6]
        assert src in nodes and dst in nodes, f"link {link_id} joins missing nodes"
        s, d = nodes[src], nodes[dst]
        out = s["outputs"][src_slot]
        assert types_match(out["type"], ltype) and link_id in (out.get("links") or []), f"link {link_id} at its source"
        inp = d["inputs"][dst_slot]
        assert inp.get("link") == link_id and types_match(inp["type"], ltype), f"link {link_id} at its target"
        # against the real node definitions
        if s["type"] in CORE:
            real_out = CORE[s["type"]]["outputs"][src_slot]
        else:
            real_out = pack_signature(PACK.NODE_CLASS_MAPPINGS[s["type"]])[1][src_slot]
        real_in = input_type(d["type"], inp["name"])
        assert real_in is not None, f"{d['type']} has no input {inp['name']!r}"
        if "widget" in inp:
            assert inp["widget"].get("name") == inp["name"], f"link {link_id}: widget input {inp}"
        assert types_match(real_out, ltype) and types_match(real_in, ltype), \
            f"link {link_id}: {s['type']} gives {real_out}, {d['type']}.{inp['name']} takes {real_in}, link says {ltype}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_has_a_thumbnail(path: Path):
    """ComfyUI's template browser shows /api/workflow_templates/<pack>/<name>.jpg beside <name>.json."""
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} is missing: the template browser shows it next to {path.name}"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"
    assert len(data) < THUMBNAIL_MAX_BYTES, f"{thumb.name} is {len(data)} bytes; keep thumbnails under 60 KB"
