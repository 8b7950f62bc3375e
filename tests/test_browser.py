"""The pack in a real browser: the real ComfyUI (COMFYUI_PATH) with its real front end, in Debian's Chromium
driven by Playwright (no browser download), on the tiny model tree of tests/test_comfyui_integration.py.

Loads every shipped workflow from ComfyUI's template browser, runs the pose workflow, moves the scrubber's
slider, drags a keypoint in TCAN Pose Edit and runs again, and measures a 2,000-frame preview. Screenshots
go to $TCAN_SCREENSHOTS (default test-artifacts/screenshots; CI keeps them as artifacts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from conftest import ROOT

CHROMIUM = os.environ.get("TCAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the browser tests", allow_module_level=True)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium) or set TCAN_CHROMIUM",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt); "
                                                          "the browser itself is Debian's chromium")

from test_comfyui_integration import WORKFLOWS, _free_port, _write_inputs  # noqa: E402

SHOTS = Path(os.environ.get("TCAN_SCREENSHOTS") or ROOT / "test-artifacts" / "screenshots")
POSE_WORKFLOW = "pose_retarget"


def _node_id(workflow: str, node_type: str) -> int:
    """The id of the one ``node_type`` node of a shipped workflow (ids change when a graph is re-laid out)."""
    nodes = json.loads((ROOT / "workflows" / f"{workflow}.json").read_text())["nodes"]
    (found,) = [n["id"] for n in nodes if n["type"] == node_type]
    return found


EDIT_NODE = _node_id(POSE_WORKFLOW, "TCANPoseEdit")
RENDER_NODE = _node_id(POSE_WORKFLOW, "TCANPoseRender")
LONG_FRAMES = 2000
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """ComfyUI on 127.0.0.1 (--cpu) with the pack and the tiny DWPose pair: all the pose workflow runs on.
    (The animation workflows are only loaded here, not run: tests/test_comfyui_integration.py runs them.)"""
    from tcan_core.tiny.pose_onnx import write_dwpose_models

    base = tmp_path_factory.mktemp("comfy_browser")
    write_dwpose_models(base / "models" / "tcan" / "pose")
    _write_inputs(base / "input")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-TCAN").symlink_to(ROOT)
    port = _free_port()
    log = open(base / "comfyui.log", "w+")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch"],
                            cwd=os.environ["COMFYUI_PATH"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail("ComfyUI exited:\n" + log.read()[-4000:])
            try:
                urllib.request.urlopen(url + "/object_info/TCANPoseEdit", timeout=5).read()
                break
            except OSError:
                assert time.time() < deadline, "ComfyUI did not answer within 240 s"
                time.sleep(0.5)
        yield SimpleNamespace(url=url, base=base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(comfyui):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--enable-precise-memory-info"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # Offline like the rest of the suite: the front end's requests to other hosts are refused.
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(comfyui.url)
                   else route.abort())
        # Uncaught errors raised in this pack's web extension fail the tests; others are the host's own.
        errors = []
        page.on("pageerror", lambda exc: errors.append(f"{exc}\n{exc.stack}")
                if "ComfyUI-TCAN" in (exc.stack or "") else None)
        page.goto(comfyui.url)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.app", timeout=TIMEOUT_MS)
        page.errors = errors
        yield page
        browser.close()


def shot(page, name: str, **kwargs) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), **kwargs)
    return path


def open_template(page, name: str) -> None:
    """Workflow templates dialog -> Custom Nodes: ComfyUI-TCAN -> the workflow's card, as an artist does."""
    dialog = page.get_by_role("dialog")
    if not dialog.get_by_text("ComfyUI-TCAN", exact=True).is_visible():
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog.get_by_text("ComfyUI-TCAN", exact=True).click()
    dialog.get_by_text(name, exact=True).first.click()
    page.wait_for_function("(name) => window.app.extensionManager.workflow.activeWorkflow?.filename?.startsWith(name)"
                           " && !document.querySelector('[role=dialog]')", arg=name, timeout=TIMEOUT_MS)


def focus(page, node_id: int) -> None:
    page.evaluate("""(id) => { const c = window.app.canvas; c.ds.scale = 1; c.centerOnNode(window.app.graph.getNodeById(id));
                     c.setDirty(true, true); }""", node_id)
    page.wait_for_timeout(300)


def scrubber(page, node_id: int, what: str) -> object:
    return page.evaluate(f"(id) => {{ const s = window.app.graph.getNodeById(id).tcanScrubber; return {what}; }}", node_id)


def run(page, comfyui, node_id: int) -> str:
    """Queue the graph from the page (Run) and wait until ``node_id`` shows a new preview; the prompt's history."""
    before = scrubber(page, node_id, "s.root.dataset.shown || ''")
    refused = page.evaluate("""async () => { await window.app.queuePrompt(0, 1);
        const errors = window.app.lastNodeErrors; return errors && Object.keys(errors).length ? JSON.stringify(errors) : null; }""")
    assert refused is None, refused
    page.wait_for_function(f"""(before) => {{
        const s = window.app.graph.getNodeById({node_id}).tcanScrubber;
        return s.root.dataset.shown && s.root.dataset.shown !== before; }}""", arg=before, timeout=TIMEOUT_MS)
    deadline = time.time() + TIMEOUT_MS / 1000
    while _get(comfyui, "/queue")["queue_running"] or _get(comfyui, "/queue")["queue_pending"]:
        assert time.time() < deadline, "the prompt did not finish"
        time.sleep(0.2)
    (entry,) = _get(comfyui, "/history?max_items=1").values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


def _get(comfyui, path: str) -> dict:
    with urllib.request.urlopen(comfyui.url + path, timeout=10) as r:
        return json.loads(r.read())


def view(comfyui, image: dict) -> bytes:
    with urllib.request.urlopen(comfyui.url + "/view?" + urllib.parse.urlencode(image), timeout=10) as r:
        return r.read()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_shipped_workflow_loads_from_the_template_browser(page, path):
    open_template(page, path.stem)
    shipped = json.loads(path.read_text())
    loaded = page.evaluate("""() => window.app.graph.nodes.map(n => ({id: n.id, type: n.type,
        known: !!LiteGraph.registered_node_types[n.type]}))""")
    assert sorted((n["id"], n["type"]) for n in loaded) == sorted((n["id"], n["type"]) for n in shipped["nodes"])
    unknown = [n["type"] for n in loaded if not n["known"]]
    assert not unknown, f"{path.name}: node types the front end does not know: {unknown}"
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(300)
    shot(page, f"template_{path.stem}")
    assert not page.errors, page.errors


def test_pose_workflow_scrub_drag_and_rerun(page, comfyui):
    open_template(page, POSE_WORKFLOW)
    first = run(page, comfyui, EDIT_NODE)
    focus(page, EDIT_NODE)
    root = f'.tcan-scrubber[data-node-id="{EDIT_NODE}"]'
    assert page.locator(f"{root} .tcan-frame").inner_text() == "frame 0 / 7"
    frame0 = page.locator(f"{root} .tcan-view").screenshot()
    shown0 = scrubber(page, EDIT_NODE, "s.root.dataset.shown")
    shot(page, "pose_workflow_ran")

    # The slider: frame 5 is loaded and drawn, and it looks different from frame 0 (the person walks).
    page.locator(f"{root} .tcan-slider").fill("5")
    page.wait_for_function(f"() => document.querySelector('{root}').dataset.shown.endsWith('_00005.jpg')",
                           timeout=TIMEOUT_MS)
    assert page.locator(f"{root} .tcan-frame").inner_text() == "frame 5 / 7"
    assert scrubber(page, EDIT_NODE, "s.root.dataset.shown") != shown0
    assert page.locator(f"{root} .tcan-view").screenshot() != frame0
    # Play, then pause: the shown frame moves on.
    page.locator(f"{root} .tcan-play").click()
    page.wait_for_function(f"() => document.querySelector('{root}').dataset.frame !== '5'", timeout=TIMEOUT_MS)
    page.locator(f"{root} .tcan-play").click()
    page.locator(f"{root} .tcan-slider").fill("5")
    page.wait_for_function(f"() => document.querySelector('{root}').dataset.shown.endsWith('_00005.jpg')")
    shot(page, "scrubber_frame5")

    # Drag the right wrist (point 4) of frame 5 by 30 x 20 screen pixels.
    x0, y0 = scrubber(page, EDIT_NODE, "s.pose.frames[5][0][4]")[:2]
    cx, cy = page.evaluate(f"""() => {{
        const s = window.app.graph.getNodeById({EDIT_NODE}).tcanScrubber;
        const [x, y] = s.toCanvas({x0}, {y0}); const r = s.canvas.getBoundingClientRect();
        return [r.left + x * r.width / s.canvas.width, r.top + y * r.height / s.canvas.height]; }}""")
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 15, cy + 10, steps=4)
    page.mouse.move(cx + 30, cy + 20, steps=4)
    page.mouse.up()
    edits = json.loads(page.evaluate(f"() => window.app.graph.getNodeById({EDIT_NODE}).widgets.find(w => w.name === 'edits').value"))
    assert len(edits) == 1 and {k: edits[0][k] for k in ("op", "frame", "person", "point")} == \
        {"op": "move", "frame": 5, "person": 0, "point": 4}, edits
    assert edits[0]["x"] > x0 + 5 and edits[0]["y"] > y0 + 3, (edits, x0, y0)
    saved = page.evaluate(f"() => window.app.graph.serialize().nodes.find(n => n.id === {EDIT_NODE}).widgets_values")
    assert json.loads(saved[0]) == edits, saved  # the edit is part of the saved workflow
    edits_value = f"() => window.app.graph.getNodeById({EDIT_NODE}).widgets.find(w => w.name === 'edits').value"
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Undo')")
    page.wait_for_function(f"() => ({edits_value})() === '[]'", timeout=10_000)  # undone with the graph
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Redo')")
    page.wait_for_function(f"() => ({edits_value})() !== '[]'", timeout=10_000)
    assert json.loads(page.evaluate(edits_value)) == edits
    shot(page, "scrubber_dragged")

    second = run(page, comfyui, EDIT_NODE)
    moved = second["outputs"][str(EDIT_NODE)]["tcan_pose"][0]["frames"][5][0][4]
    assert moved[:2] == pytest.approx([edits[0]["x"], edits[0]["y"]], abs=0.01)
    before = first["outputs"][str(EDIT_NODE)]["tcan_pose"][0]["frames"]
    after = second["outputs"][str(EDIT_NODE)]["tcan_pose"][0]["frames"]
    assert [f for f in range(8) if before[f] != after[f]] == [5]
    # The rendered pose of frame 5 changed; frame 0 did not.
    images = [run_["outputs"][str(RENDER_NODE)]["images"] for run_ in (first, second)]
    assert view(comfyui, images[0][5]) != view(comfyui, images[1][5])
    assert view(comfyui, images[0][0]) == view(comfyui, images[1][0])
    focus(page, EDIT_NODE)
    page.locator(f"{root} .tcan-slider").fill("5")
    page.wait_for_function(f"() => document.querySelector('{root}').dataset.shown.endsWith('_00005.jpg')")
    page.wait_for_timeout(200)
    shot(page, "scrubber_rerun")
    # Pose Edit and Pose Render side by side (the README's picture).
    box = page.evaluate(f"""() => {{ const c = window.app.canvas, r = c.canvas.getBoundingClientRect();
        const [a, b] = [{EDIT_NODE}, {RENDER_NODE}].map(id => window.app.graph.getNodeById(id).getBounding());
        const s = c.ds.scale, [ox, oy] = c.ds.offset;
        const x0 = (Math.min(a[0], b[0]) + ox) * s + r.left, y0 = (Math.min(a[1], b[1]) + oy) * s + r.top;
        const x1 = (Math.max(a[0] + a[2], b[0] + b[2]) + ox) * s + r.left, y1 = (Math.max(a[1] + a[3], b[1] + b[3]) + oy) * s + r.top;
        return [x0 - 8, y0 - 8, x1 - x0 + 16, y1 - y0 + 16]; }}""")
    shot(page, "scrubber_pose_edit", clip=dict(zip(("x", "y", "width", "height"), box)))
    assert not page.errors, page.errors


def test_timeline_marks_and_an_empty_output(page, comfyui):
    """Marks from a node's ui.tcan_marks (Pose Retarget's checks use the same key) are ticks that jump to their frame;
    an output of 0 frames says so instead of failing."""
    open_template(page, POSE_WORKFLOW)
    node = 7  # TCAN Pose Retarget: whatever it sends, the scrubber shows tcan_marks the same way
    folder = comfyui.base / "temp" / "tcan_preview"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(10):
        cv2.imwrite(str(folder / f"marks_{i:05d}.jpg"), np.full((64, 48, 3), 25 * i, np.uint8))
        images.append({"filename": f"marks_{i:05d}.jpg", "subfolder": "tcan_preview", "type": "temp"})
    page.evaluate("""([id, images]) => window.app.graph.getNodeById(id).tcanScrubber.setOutput(
        {images, tcan_marks: [{frame: 2, reasons: ["r-elbow bone 40% longer"]}, {frame: 9, reasons: ["no person"]}]})""",
                  [node, images])
    root = page.locator(f'.tcan-scrubber[data-node-id="{node}"]')
    marks = root.locator(".tcan-mark")
    assert marks.count() == 2
    assert marks.nth(0).get_attribute("title") == "frame 2: r-elbow bone 40% longer"
    focus(page, node)
    marks.nth(0).click()
    assert root.get_attribute("data-frame") == "2"
    assert "r-elbow bone 40% longer" in root.locator(".tcan-frame").inner_text()
    page.evaluate("(id) => window.app.graph.getNodeById(id).tcanScrubber.setOutput({images: []})", node)
    assert root.locator(".tcan-frame").inner_text() == "no frames: this node's output has 0 frames"
    assert root.locator(".tcan-mark").count() == 0


def test_a_2000_frame_preview_stays_responsive(page, comfyui):
    """Pose Load of 2,000 frames: the page loads a handful of frames, not 2,000; memory and time to first frame are
    measured and written next to the screenshots."""
    frames = [{"canvas_width": 192, "canvas_height": 256, "people": [] if f % 500 == 7 else [{"pose_keypoints_2d": sum(
        ([40 + 60 * (k % 2) + (f % 50), 20 + 12 * k, 1.0] for k in range(18)), [])}]} for f in range(LONG_FRAMES)]
    (comfyui.base / "input" / "long_pose.json").write_text(json.dumps(frames))
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_function("() => window.app.graph.nodes.length === 0")
    # Pose Load -> Pose Save (an output node, so ComfyUI runs the graph).
    node = page.evaluate("""() => { const n = LiteGraph.createNode('TCANPoseLoad'); window.app.graph.add(n);
        n.widgets.find(w => w.name === 'file').value = 'long_pose.json'; n.pos = [100, 100];
        const save = LiteGraph.createNode('TCANPoseSave'); window.app.graph.add(save); save.pos = [500, 100];
        n.connect(0, save, 0); return n.id; }""")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    cdp.send("HeapProfiler.collectGarbage")
    heap_before = _heap(cdp)
    views = []
    page.on("request", lambda req: views.append(req.url) if "/view?" in req.url and "pose_load_" in req.url else None)
    start = time.time()
    run(page, comfyui, node)
    run_s = time.time() - start
    first_frame_ms = scrubber(page, node, "s.firstFrameMs")
    focus(page, node)
    cdp.send("HeapProfiler.collectGarbage")
    heap_after = _heap(cdp)
    assert scrubber(page, node, "s.frames.length") == LONG_FRAMES
    assert scrubber(page, node, "s.marks.length") == 4  # frames 7, 507, 1007, 1507 have no person
    loaded_first = len(views)
    root = f'.tcan-scrubber[data-node-id="{node}"]'
    page.locator(f"{root} .tcan-slider").fill(str(LONG_FRAMES - 1))
    page.wait_for_function(f"() => document.querySelector('{root}').dataset.shown.endsWith('_01999.jpg')")
    shot(page, "scrubber_2000_frames")
    metrics = {"frames": LONG_FRAMES, "run_and_first_frame_s": round(run_s, 2),
               "output_to_first_frame_ms": round(first_frame_ms, 1),
               "js_heap_before_mb": round(heap_before / 2**20, 1), "js_heap_after_mb": round(heap_after / 2**20, 1),
               "preview_images_requested_for_first_frame": loaded_first, "after_jump_to_last": len(views)}
    (SHOTS / "scrubber_2000_frames.json").write_text(json.dumps(metrics, indent=1))
    print("2,000-frame preview:", metrics)
    assert loaded_first <= 2 and len(views) <= 3, views[:10]
    assert heap_after - heap_before < 50 * 2**20, metrics
    assert not page.errors, page.errors


def _heap(cdp) -> float:
    return next(m["value"] for m in cdp.send("Performance.getMetrics")["metrics"] if m["name"] == "JSHeapUsedSize")


LAYOUT_JS = """() => {
    const th = LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = window.app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
        box: [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th], titlePos: [n.pos[0] + 1, n.pos[1] - th / 2]}));
    const groups = window.app.graph._groups.map(g => {
        const b = g._bounding ?? g.boundingRect ?? [...g.pos, ...g.size];
        return {title: g.title, box: [b[0], b[1], b[2], b[3]]};
    });
    return {nodes, groups};
}"""


def _inside(point, box) -> bool:
    return box[0] <= point[0] <= box[0] + box[2] and box[1] <= point[1] <= box[1] + box[3]


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def layout_problems(layout: dict) -> tuple[list[str], list[str]]:
    """Pairs of nodes whose rendered boxes (title bar included) overlap, and nodes sticking out of their group."""
    nodes = layout["nodes"]
    name = lambda n: f"#{n['id']} {n['type']}"  # noqa: E731
    overlaps = [f"{name(a)} / {name(b)}" for i, a in enumerate(nodes) for b in nodes[i + 1:]
                if _overlap(a["box"], b["box"])]
    outside = []
    for n in nodes:
        group = next((g for g in layout["groups"] if _inside(n["titlePos"], g["box"])), None)
        x, y, w, h = n["box"]
        if group and not (_inside((x, y), group["box"]) and _inside((x + w, y + h), group["box"])):
            outside.append(f"{name(n)} sticks out of group '{group['title']}'")
    return overlaps, outside


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_nodes_do_not_overlap_and_stay_in_their_groups(page, path):
    """The rendered layout (node sizes after the front end and the scrubber grew them), not the JSON's own numbers."""
    open_template(page, path.stem)
    overlaps, outside = layout_problems(page.evaluate(LAYOUT_JS))
    assert not overlaps and not outside, (f"{path.name}: {len(overlaps)} overlapping node pairs: {overlaps}; "
                                          f"{len(outside)} nodes outside their group: {outside}")
