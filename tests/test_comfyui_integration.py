"""Optional: the pack inside a real ComfyUI (set COMFYUI_PATH to a ComfyUI checkout).

Starts that ComfyUI on 127.0.0.1 with --cpu, a base directory holding the tiny model tree and
two input files, and the pack linked into its custom_nodes folder. Checks every TCAN node is
served by /object_info with no import error logged, checks the core-node table the workflow test
relies on, submits every example workflow that runs without the sampler through the HTTP API
(converted from UI to API format with /object_info) and waits for it to succeed, then stops it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
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
    from tcan_core.tiny.tree import write_demo_tree

    base = tmp_path_factory.mktemp("comfy")
    write_demo_tree(base / "models")
    _write_inputs(base / "input")
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
        yield info, log.read(), url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_every_node_is_served(comfyui):
    info, output, _ = comfyui
    missing = sorted(set(load_pack().NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"not served by ComfyUI: {missing}"
    ours = [line for line in output.splitlines()
            if "ComfyUI-TCAN" in line and ("IMPORT FAILED" in line or "Cannot import" in line or "could not load" in line)]
    assert not ours, "\n".join(ours) + "\n" + output[-4000:]


def test_core_node_table_matches_comfyui(comfyui):
    info, _, _ = comfyui
    table = json.loads((Path(ROOT) / "tests" / "data" / "comfy_core_nodes.json").read_text())
    for name, spec in table.items():
        if name.startswith("_"):
            continue
        assert name in info, name
        assert list(info[name]["output"]) == spec["outputs"], name
        declared = {**info[name]["input"].get("required", {}), **info[name]["input"].get("optional", {})}
        for inp, kind in spec["inputs"].items():
            assert declared[inp][0] == kind, (name, inp)


def _person_frame(x0: int, height: int = 256, width: int = 192) -> np.ndarray:
    """A bright 'person' rectangle on a dark background: what the tiny DWPose models detect."""
    frame = np.full((height, width, 3), 20, np.uint8)
    frame[40:220, x0:x0 + 60] = 230
    return frame


def _write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "reference.png"), _person_frame(60))
    writer = cv2.VideoWriter(str(folder / "driving.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (192, 256))
    for f in range(8):
        writer.write(_person_frame(30 + 8 * f))
    writer.release()


def ui_to_api(workflow: dict, info: dict) -> dict:
    """A UI-format workflow -> the API prompt format, naming widget values from /object_info."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]["input"]
        inputs, values = {}, list(node.get("widgets_values") or [])
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                linked = next((i for i in node.get("inputs", []) if i["name"] == name and i.get("link")), None)
                kind = entry[0]
                is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if is_widget and values:
                    value = values.pop(0)
                    if len(entry) > 1 and entry[1].get("control_after_generate"):
                        values.pop(0)
                    inputs[name] = value
                if linked is not None:
                    link = links[linked["link"]]
                    inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        pytest.fail(f"ComfyUI refused the prompt: {exc.read().decode()[:4000]}")


RUNNABLE = [p for p in sorted((ROOT / "workflows").glob("*.json"))
            if all(n["type"] in load_pack().NODE_CLASS_MAPPINGS or not n["type"].startswith("TCAN")
                   for n in json.loads(p.read_text())["nodes"])]


@pytest.mark.parametrize("path", RUNNABLE, ids=[p.stem for p in RUNNABLE])
def test_workflow_runs_in_comfyui(comfyui, path):
    info, _, url = comfyui
    prompt = ui_to_api(json.loads(path.read_text()), info)
    prompt_id = _post(url + "/prompt", {"prompt": prompt, "client_id": "tcan-tests"})["prompt_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=10) as r:
            history = json.loads(r.read())
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            status = history[prompt_id]["status"]
            assert status["status_str"] == "success", json.dumps(status.get("messages"), indent=1)[:4000]
            assert history[prompt_id]["outputs"], "the workflow produced no outputs"
            return
        time.sleep(0.5)
    pytest.fail(f"{path.name} did not finish within 300 s")
