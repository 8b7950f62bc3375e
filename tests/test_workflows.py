"""Every example workflow uses only node types the pack or ComfyUI core defines, with links whose
types match both ends, and widget values that fit the nodes' widgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, load_pack

PACK = load_pack()
CORE = {k: v for k, v in json.loads((ROOT / "tests" / "data" / "comfy_core_nodes.json").read_text()).items()
        if not k.startswith("_")}
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


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


def types_match(a: str, b: str) -> bool:
    return a == b or "*" in (a, b)


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no example graph"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow(path: Path):
    wf = json.loads(path.read_text())
    assert {"nodes", "links", "version"} <= set(wf), "not a ComfyUI UI-format workflow"
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf.get("last_node_id", max(nodes)) >= max(nodes)
    for node in wf["nodes"]:
        kind = node["type"]
        assert kind in PACK.NODE_CLASS_MAPPINGS or kind in CORE, \
            f"node {node['id']} has type {kind!r}, which neither the pack nor the core table defines"
        values = node.get("widgets_values", [])
        if kind in CORE:
            lo, hi = CORE[kind]["widgets"]
            assert lo <= len(values) <= hi, f"{kind} node {node['id']}: {len(values)} widget values"
            continue
        _links, _outs, widgets = pack_signature(PACK.NODE_CLASS_MAPPINGS[kind])
        extra = sum(1 for _n, k, o in widgets if k == "INT" and o.get("control_after_generate"))
        assert len(values) == len(widgets) + extra, \
            f"{kind} node {node['id']}: {len(values)} widget values for widgets {[w[0] for w in widgets]}"
        it = iter(values)
        for name, k, options in widgets:
            value = next(it)
            if isinstance(k, list):
                assert value in k or not k, f"{kind}.{name}: {value!r} is not one of {k}"
            elif k == "BOOLEAN":
                assert isinstance(value, bool), f"{kind}.{name}: {value!r} is not a boolean"
            elif k in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{kind}.{name}: {value!r}"
                assert options.get("min", value) <= value <= options.get("max", value), f"{kind}.{name}: {value} out of range"
                if options.get("control_after_generate"):
                    next(it)

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
        if d["type"] in CORE:
            real_in = CORE[d["type"]]["inputs"].get(inp["name"])
        else:
            real_in = pack_signature(PACK.NODE_CLASS_MAPPINGS[d["type"]])[0].get(inp["name"])
        assert real_in is not None, f"{d['type']} has no link input {inp['name']!r}"
        assert types_match(real_out, ltype) and types_match(real_in, ltype), \
            f"link {link_id}: {s['type']} gives {real_out}, {d['type']}.{inp['name']} takes {real_in}, link says {ltype}"
