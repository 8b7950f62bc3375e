"""Optional: the pack inside a real ComfyUI (set COMFYUI_PATH to a ComfyUI checkout).

Starts that ComfyUI on 127.0.0.1 with --cpu, a base directory holding the tiny model tree and
two input files, and the pack linked into its custom_nodes folder. Checks every TCAN node is
served by /object_info with no import error logged, checks the core-node table the workflow test
relies on and that the template browser lists every workflow with its .jpg thumbnail, and submits
every example workflow through the HTTP API (converted from UI to API format with /object_info,
as the front end does: notes left out, bypassed nodes bridged, the 'control after generate' value
skipped, model widgets pointed at the tiny files):

- workflows without a checkpoint loader (pose_retarget, tpc_calibrate) run to success as they are;
- the animation workflows (tcan_animate, tcan_training_free) pass ComfyUI's prompt validation as
  they are, but cannot run as they are on the tiny models: ComfyUI's core CheckpointLoaderSimple
  builds its models from fixed architecture tables, not from the file. The tiny SD1.5 UNet (model
  channels 32, channel mult 1/1/2/2, cross-attention 64) matches no supported model ("Could not
  detect model type"); its CLIP (hidden 64, 2 layers) and VAE (32 channels, one resnet per level)
  would not load into the fixed SD1.5 CLIP-L (768) and VAE (128/256/512/512) either (size
  mismatches). The test checks that this, and only this, is what stops them;
- so they also run to success with that one node swapped for a test-only loader (written into
  the test's custom_nodes) that builds ComfyUI's own model, CLIP and VAE classes with the tiny
  widths: a real ModelPatcher around comfy's BaseModel (unet_config read from the file with
  comfy's own detect_unet_config), SD1 CLIP and AutoencoderKL. Everything else is the workflow as
  shipped: the MODEL into TCAN Model from MODEL, the real CLIPTextEncode and ComfyUI VAE objects,
  every TCAN node, CreateVideo and SaveVideo; the test checks the saved video's frames and size.

The MODEL path is checked against the file path on the training-free graph, with the frames saved
exactly by a test-only node: TCAN Model from MODEL gives the frames TCAN Load Model gives; a LoRA
applied by core LoraLoaderModelOnly changes them exactly as TCAN APPA LoRA does with the same file
and strength; the loader's MODEL is unchanged afterwards (no patches, weights equal to the file).
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
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from conftest import ROOT, load_pack

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")

CORE_TABLE = {k: v for k, v in json.loads((ROOT / "tests" / "data" / "comfy_core_nodes.json").read_text()).items()
              if not k.startswith("_")}
FRONTEND_ONLY = {name for name, spec in CORE_TABLE.items() if spec.get("frontend_only")}
MODE_NEVER, MODE_BYPASS = 2, 4
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

DRIVING_FRAMES = 8
# The animation workflows' sizes and steps, made small for the CPU (2:3 like the workflows' 512 x 768).
TINY_SIZE = (64, 96)
TINY_STEPS = 2
TINY_LOADER = "TCANTestTinyCheckpointLoader"
# The tiny face detector finds bright squares on black, not faces in the tiny 'person' frames: every Face
# Analysis reads this drawn face instead of its linked image.
FACE_IMAGE = "face.png"

# Model widgets whose workflow value (a published or trained file) the tiny tree replaces.
TINY_FILES = {
    ("CheckpointLoaderSimple", "ckpt_name"): "tiny_sd15.safetensors",
    ("TCANLoadModel", "ckpt_name"): "tiny_sd15.safetensors",
    ("TCANLoadModel", "appearance_unet"): "[AppearanceEncoder]_tiny.ckpt",
    ("TCANModelFromMODEL", "appearance_unet"): "[AppearanceEncoder]_tiny.ckpt",
    ("TCANMotionModule", "motion_module"): "tiny_mm_v2.ckpt",
    ("TCANMotionModule", "tcan_unet"): "[UNet]_stage2_tiny.ckpt",
    ("TCANAppaLora", "lora_name"): "tiny_appa_peft.safetensors",
    ("TCANTemporalControlNet", "controlnet_name"): "tiny_openpose.safetensors",
    ("TCANTemporalControlNet", "temporal_layers"): "[ControlNetT]_tiny.ckpt",
}

# Test-only ComfyUI nodes, written into the test's custom_nodes folder. CheckpointLoaderSimple for the
# tiny SD1.5 checkpoint: ComfyUI's own SD15 model config with the unet_config comfy's detect_unet_config
# reads from the file (only the fixed-table lookup that follows it fails on tiny widths), the BaseModel it
# builds in a real ModelPatcher, and ComfyUI's CLIP (SD1 tokenizer, SDClipModel) and VAE (AutoencoderKL)
# classes with the tiny models' widths, read from the configs the tiny models were built from. Two
# recorders: the frames exactly (torch.save) and whether a MODEL still equals the checkpoint file.
TINY_LOADER_SOURCE = '''
import functools
import json
import os
import sys

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.utils
import folder_paths

sys.path.insert(0, {root!r})


class TCANTestTinyCheckpointLoader:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}}}

    def load(self, ckpt_name):
        from tcan_core.tiny.sd15 import tiny_text_config, tiny_vae_config

        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
        with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
            text = json.load(f)
        tiny = tiny_text_config()
        text.update({{k: tiny[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "projection_dim")}})
        target = type("ClipTarget", (), {{}})()
        target.params = {{}}
        target.tokenizer = comfy.sd1_clip.SD1Tokenizer
        target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=functools.partial(
            comfy.sd1_clip.SDClipModel, textmodel_json_config=text, return_projected_pooled=False))
        clip = comfy.sd.CLIP(target)
        clip_sd = {{"clip_l." + k[len("cond_stage_model."):]: v for k, v in sd.items()
                   if k.startswith("cond_stage_model.")}}
        missing, unexpected = clip.load_sd(clip_sd, full_model=True)
        missing = [k for k in missing if not k.endswith(("logit_scale", "text_projection.weight"))]
        if missing or unexpected:
            raise RuntimeError(f"tiny CLIP: missing {{missing}}, unexpected {{unexpected}}")

        vae = tiny_vae_config()
        ch = vae["block_out_channels"][0]
        ddconfig = {{"double_z": True, "z_channels": vae["latent_channels"], "resolution": 256, "in_channels": 3,
                    "out_ch": 3, "ch": ch, "ch_mult": [c // ch for c in vae["block_out_channels"]],
                    "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}}
        vae_sd = comfy.utils.state_dict_prefix_replace(sd, {{"first_stage_model.": ""}}, filter_keys=True)
        vae = comfy.sd.VAE(sd=vae_sd, config={{"params": {{"embed_dim": vae["latent_channels"], "ddconfig": ddconfig}}}})
        return (tiny_model(sd), clip, vae)


def tiny_model(sd):
    """ComfyUI's MODEL for the tiny SD1.5 UNet: a ModelPatcher around comfy's own BaseModel."""
    unet_config = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    offload = comfy.model_management.unet_offload_device()
    model = config.get_model(sd, "model.diffusion_model.", device=offload)
    model.load_model_weights(sd, "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=offload)


def _record(name, value):
    folder = os.path.join(folder_paths.get_output_directory(), "tcan_test")
    os.makedirs(folder, exist_ok=True)
    if isinstance(value, torch.Tensor):
        torch.save(value.clone(), os.path.join(folder, name + ".pt"))
    else:
        with open(os.path.join(folder, name + ".json"), "w") as f:
            json.dump(value, f)


class TCANTestSaveFrames:
    CATEGORY = "testing"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"images": ("IMAGE",), "name": ("STRING", {{"default": "frames"}})}}}}

    def save(self, images, name):
        _record(name, images)
        return {{}}


class TCANTestModelUnchanged:
    CATEGORY = "testing"
    FUNCTION = "check"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"model": ("MODEL",), "after": ("IMAGE",), "name": ("STRING", {{"default": "model"}}),
                              "ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}}}

    def check(self, model, after, name, ckpt_name):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
        weights = model.model_state_dict("diffusion_model.")
        differ = [k for k, v in weights.items()
                  if not torch.equal(v.cpu(), sd["model." + k].to(v.dtype))]
        _record(name, {{"patches": len(model.patches), "differ": differ[:8], "checked": len(weights)}})
        return {{}}


NODE_CLASS_MAPPINGS = {{"TCANTestTinyCheckpointLoader": TCANTestTinyCheckpointLoader,
                       "TCANTestSaveFrames": TCANTestSaveFrames,
                       "TCANTestModelUnchanged": TCANTestModelUnchanged}}
'''


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
    loader = base / "custom_nodes" / "tcan_test_tiny_loader"
    loader.mkdir()
    (loader / "__init__.py").write_text(TINY_LOADER_SOURCE.format(root=str(ROOT)))
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
        yield SimpleNamespace(info=info, log=log.read(), url=url, base=base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_every_node_is_served(comfyui):
    missing = sorted(set(load_pack().NODE_CLASS_MAPPINGS) - set(comfyui.info))
    assert not missing, f"not served by ComfyUI: {missing}"
    assert TINY_LOADER in comfyui.info, "the test-only tiny loader did not load:\n" + comfyui.log[-4000:]
    ours = [line for line in comfyui.log.splitlines()
            if "ComfyUI-TCAN" in line and ("IMPORT FAILED" in line or "Cannot import" in line or "could not load" in line)]
    assert not ours, "\n".join(ours) + "\n" + comfyui.log[-4000:]


def test_core_node_table_matches_comfyui(comfyui):
    info = comfyui.info
    for name, spec in CORE_TABLE.items():
        if spec.get("frontend_only"):
            continue  # the front end's virtual nodes (notes) are never served
        assert name in info, name
        assert list(info[name]["output"]) == spec["outputs"], name
        declared = {**info[name]["input"].get("required", {}), **info[name]["input"].get("optional", {})}
        for inp, kind in spec["inputs"].items():
            assert declared[inp][0] == kind, (name, inp)


def test_template_browser_lists_every_workflow_with_its_thumbnail(comfyui):
    """The front end lists GET /workflow_templates and shows /api/workflow_templates/<pack>/<name>.jpg."""
    with urllib.request.urlopen(comfyui.url + "/workflow_templates", timeout=10) as r:
        listed = json.loads(r.read()).get("ComfyUI-TCAN", [])
    assert sorted(listed) == sorted(p.stem for p in WORKFLOWS)
    for name in listed:
        for suffix, kind in ((".json", "application/json"), (".jpg", "image/jpeg")):
            with urllib.request.urlopen(f"{comfyui.url}/api/workflow_templates/ComfyUI-TCAN/{name}{suffix}",
                                        timeout=10) as r:
                assert r.headers.get_content_type() == kind, (name, suffix, r.headers.get_content_type())
                assert r.read() == (ROOT / "workflows" / f"{name}{suffix}").read_bytes()


def _person_frame(x0: int, height: int = 256, width: int = 192) -> np.ndarray:
    """A bright 'person' rectangle on a dark background: what the tiny DWPose models detect."""
    frame = np.full((height, width, 3), 20, np.uint8)
    frame[40:220, x0:x0 + 60] = 230
    return frame


def _write_inputs(folder: Path) -> None:
    from tcan_core.tiny.face_onnx import draw_test_faces

    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "reference.png"), _person_frame(60))
    cv2.imwrite(str(folder / "pose.png"), _person_frame(60))
    cv2.imwrite(str(folder / FACE_IMAGE), draw_test_faces(320, 320, [(160, 150, 48)])[..., ::-1])
    writer = cv2.VideoWriter(str(folder / "driving.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (192, 256))
    for f in range(DRIVING_FRAMES):
        writer.write(_person_frame(30 + 8 * f))
    writer.release()


def _has_control_widget(name: str, entry) -> bool:
    """The front end's rule (useIntWidget): an INT named seed/noise_seed, or any widget whose options
    set control_after_generate, gets a 'control after generate' widget whose value the UI also saves."""
    options = entry[1] if len(entry) > 1 else {}
    if entry[0] == "INT":
        return bool(options.get("control_after_generate", name in ("seed", "noise_seed")))
    return bool(options.get("control_after_generate"))


def _source(workflow: dict, link_id: int) -> tuple[int, int]:
    """(node, output slot) feeding ``link_id``, through bypassed nodes as the front end bridges them:
    a bypassed node passes on the input of the output's type (same slot first)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    link = next(link for link in workflow["links"] if link[0] == link_id)
    src, slot = link[1], link[2]
    while nodes[src].get("mode") == MODE_BYPASS:
        node = nodes[src]
        kind = node["outputs"][slot]["type"]
        candidates = [i for i in node["inputs"] if i["type"] == kind and i.get("link") is not None]
        same = node["inputs"][slot] if slot < len(node["inputs"]) else None
        chosen = same if same in candidates else (candidates[0] if candidates else None)
        assert chosen is not None, f"bypassed node {src} has no {kind} input to pass on"
        link = next(link for link in workflow["links"] if link[0] == chosen["link"])
        src, slot = link[1], link[2]
    return src, slot


def ui_to_api(workflow: dict, info: dict) -> dict:
    """A UI-format workflow -> the API prompt format, naming widget values from /object_info."""
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode") in (MODE_NEVER, MODE_BYPASS):
            continue
        spec = info[node["type"]]["input"]
        inputs, values = {}, list(node.get("widgets_values") or [])
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                linked = next((i for i in node.get("inputs", []) if i["name"] == name and i.get("link")), None)
                kind = entry[0]
                is_widget = isinstance(kind, list) or kind in WIDGET_KINDS
                if is_widget and values:
                    inputs[name] = values.pop(0)
                    if _has_control_widget(name, entry):
                        values.pop(0)
                if linked is not None:
                    src, slot = _source(workflow, linked["link"])
                    inputs[name] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _choices(info: dict, class_type: str, name: str) -> list | None:
    spec = info[class_type]["input"]
    entry = {**spec.get("required", {}), **spec.get("optional", {})}.get(name)
    if entry is None:
        return None
    if isinstance(entry[0], list):
        return entry[0]
    return entry[1].get("options") if entry[0] == "COMBO" and len(entry) > 1 else None


def tiny_prompt(path: Path, info: dict) -> dict:
    """The workflow as an API prompt on the tiny models: every model file the tiny tree lacks is replaced
    by its tiny counterpart (a value with no counterpart fails here, so a bad fixed choice is not hidden),
    and the animation's size and steps are made small."""
    prompt = ui_to_api(json.loads(path.read_text()), info)
    for node in prompt.values():
        kind = node["class_type"]
        for name, value in list(node["inputs"].items()):
            choices = _choices(info, kind, name)
            if choices is not None and value not in choices:
                assert (kind, name) in TINY_FILES, f"{path.name}: {kind}.{name} = {value!r} is not one of {choices}"
                node["inputs"][name] = TINY_FILES[(kind, name)]
        if kind in ("ImageScale", "TCANSampler", "TCANCharacterImage"):
            node["inputs"]["width"], node["inputs"]["height"] = TINY_SIZE
        if kind in ("TCANSampler", "TCANCharacterImage"):
            node["inputs"]["steps"] = TINY_STEPS
    analyses = [node for node in prompt.values() if node["class_type"] == "TCANFaceAnalysis"]
    if analyses:
        prompt["face_image"] = {"class_type": "LoadImage", "inputs": {"image": FACE_IMAGE}}
        for node in analyses:
            node["inputs"]["image"] = ["face_image", 0]
    return prompt


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        pytest.fail(f"ComfyUI refused the prompt: {exc.read().decode()[:4000]}")


def submit(url: str, prompt: dict) -> str:
    """POST /prompt; fails the test unless ComfyUI's validation accepts every node."""
    answer = _post(url + "/prompt", {"prompt": prompt, "client_id": "tcan-tests"})
    assert not answer.get("node_errors"), json.dumps(answer["node_errors"], indent=1)[:4000]
    return answer["prompt_id"]


def wait(url: str, prompt_id: str, timeout: float = 300) -> dict:
    """The history entry of a finished prompt."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=10) as r:
            history = json.loads(r.read())
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def assert_success(entry: dict) -> None:
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status.get("messages"), indent=1)[:4000]
    assert entry["outputs"], "the workflow produced no outputs"


def _workflow_types(path: Path) -> set[str]:
    return {n["type"] for n in json.loads(path.read_text())["nodes"]}


WITH_CHECKPOINT = [p for p in WORKFLOWS if "CheckpointLoaderSimple" in _workflow_types(p)]
WITHOUT_CHECKPOINT = [p for p in WORKFLOWS if p not in WITH_CHECKPOINT]


@pytest.mark.parametrize("path", WITHOUT_CHECKPOINT, ids=[p.stem for p in WITHOUT_CHECKPOINT])
def test_workflow_runs_in_comfyui(comfyui, path):
    assert_success(wait(comfyui.url, submit(comfyui.url, tiny_prompt(path, comfyui.info))))


@pytest.mark.parametrize("path", WITH_CHECKPOINT, ids=[p.stem for p in WITH_CHECKPOINT])
def test_animation_workflow_is_valid_and_stops_only_at_the_core_checkpoint_loader(comfyui, path):
    """As shipped (tiny files in the model widgets): ComfyUI's validation accepts every node; the run
    then stops in CheckpointLoaderSimple, which cannot build the tiny SD1.5 (see the module docstring)."""
    prompt = tiny_prompt(path, comfyui.info)
    entry = wait(comfyui.url, submit(comfyui.url, prompt))
    if entry["status"]["status_str"] == "success":
        return  # a ComfyUI that builds the tiny checkpoint runs the workflow as shipped
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "CheckpointLoaderSimple", json.dumps(errors, indent=1)[:4000]
    assert "Could not detect model type" in errors[0]["exception_message"], errors[0]["exception_message"]


@pytest.mark.parametrize("path", WITH_CHECKPOINT, ids=[p.stem for p in WITH_CHECKPOINT])
def test_animation_workflow_runs_in_comfyui_with_a_tiny_checkpoint_loader(comfyui, path):
    prompt = tiny_prompt(path, comfyui.info)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = TINY_LOADER
    entry = wait(comfyui.url, submit(comfyui.url, prompt), timeout=480)
    assert_success(entry)

    kinds = {nid: node["class_type"] for nid, node in prompt.items()}
    outputs = entry["outputs"]
    ran = {kinds[nid] for nid in outputs}
    assert {"TCANSampler", "TCANPTM", "TCANTPCCalibrate", "SaveVideo", "PreviewImage"} <= ran, sorted(ran)
    face_nodes = {k for k in kinds.values() if k.startswith("TCANFace") or k == "TCANCharacterImage"}
    assert face_nodes <= ran, sorted(face_nodes - ran)
    saved = next(out["images"][0] for nid, out in outputs.items() if kinds[nid] == "SaveVideo")
    video = comfyui.base / "output" / saved["subfolder"] / saved["filename"]
    assert video.is_file(), video
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == DRIVING_FRAMES, f"{video.name}: {len(frames)} frames"
    assert frames[0].shape[:2] == TINY_SIZE[::-1], f"{video.name}: {frames[0].shape[1]}x{frames[0].shape[0]}"


TRAINING_FREE = ROOT / "workflows" / "tcan_training_free.json"
CORE_LORA = "tiny_appa_kohya.safetensors"
LORA_STRENGTH = 0.8


def _only(prompt: dict, class_type: str) -> str:
    ids = [nid for nid, node in prompt.items() if node["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def _run_frames(comfyui, prompt: dict, name: str):
    """Run ``prompt`` with the sampler's frames recorded exactly; -> frames [F,H,W,3]."""
    import torch

    prompt = json.loads(json.dumps(prompt))
    prompt["save_frames"] = {"class_type": "TCANTestSaveFrames",
                             "inputs": {"images": [_only(prompt, "TCANSampler"), 0], "name": name}}
    assert_success(wait(comfyui.url, submit(comfyui.url, prompt), timeout=480))
    return torch.load(comfyui.base / "output" / "tcan_test" / f"{name}.pt", weights_only=True)


def test_model_path_matches_the_file_path_and_core_lora_matches_appa_lora(comfyui):
    import torch

    base = tiny_prompt(TRAINING_FREE, comfyui.info)
    loader = _only(base, "CheckpointLoaderSimple")
    base[loader]["class_type"] = TINY_LOADER
    from_model = _only(base, "TCANModelFromMODEL")
    assert base[from_model]["inputs"]["model"] == [loader, 0], "the workflow's TCAN model must come from the MODEL"
    motion = _only(base, "TCANMotionModule")
    sampler = _only(base, "TCANSampler")

    via_model = _run_frames(comfyui, base, "model_path")

    file_path = json.loads(json.dumps(base))
    file_path[from_model] = {"class_type": "TCANLoadModel", "inputs": {
        "ckpt_name": "tiny_sd15.safetensors", "appearance_unet": base[from_model]["inputs"]["appearance_unet"]}}
    via_file = _run_frames(comfyui, file_path, "file_path")
    assert via_model.shape == via_file.shape and torch.equal(via_model, via_file), \
        f"MODEL path differs from the file path by {(via_model - via_file).abs().max():.3g}"

    core_lora = json.loads(json.dumps(base))
    core_lora["core_lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": [loader, 0], "lora_name": CORE_LORA, "strength_model": LORA_STRENGTH}}
    core_lora[from_model]["inputs"]["model"] = ["core_lora", 0]
    core_lora["unchanged"] = {"class_type": "TCANTestModelUnchanged", "inputs": {
        "model": [loader, 0], "after": [sampler, 0], "name": "loader_model", "ckpt_name": "tiny_sd15.safetensors"}}
    via_core_lora = _run_frames(comfyui, core_lora, "core_lora")

    appa_lora = json.loads(json.dumps(base))
    appa_lora["appa_lora"] = {"class_type": "TCANAppaLora", "inputs": {
        "tcan_model": [from_model, 0], "lora_name": CORE_LORA, "strength": LORA_STRENGTH}}
    appa_lora[motion]["inputs"]["tcan_model"] = ["appa_lora", 0]
    via_appa_lora = _run_frames(comfyui, appa_lora, "appa_lora")

    assert not torch.equal(via_core_lora, via_model), "core LoraLoaderModelOnly did not reach the TCAN model"
    assert torch.equal(via_core_lora, via_appa_lora), \
        f"core LoRA and APPA LoRA frames differ by {(via_core_lora - via_appa_lora).abs().max():.3g}"
    state = json.loads((comfyui.base / "output" / "tcan_test" / "loader_model.json").read_text())
    assert state["patches"] == 0 and not state["differ"] and state["checked"] > 0, state


CACHE_SCRIPT = '''
import importlib, sys, torch
sys.path[:0] = [{comfy!r}, {root!r}, {tests!r}]
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
import comfy.model_management as mm
from conftest import load_pack
host = importlib.import_module(load_pack().__name__ + ".nodes.host")
from tcan_core.face import analysis, clip_vision
from tcan_core.pose import extract
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=2, image_size=32, patch_size=8))
clip_vision._CACHE[("encoder.safetensors", 0, torch.float32)] = encoder
extract._cache[("dwpose", ({model!r},), (0,), "cpu")] = object()
analysis._ANALYZERS[("pack", ("cpu",), (("det.onnx", 0, 1000),))] = object()
names = host.register_pack_caches()
assert sorted(names) == ["CLIP image encoder", "face analysis sessions", "pose detector"], names
assert host.register_pack_caches() == [], "registered twice"
assert len(mm.current_loaded_models) == 3, mm.current_loaded_models
mm.unload_all_models()
assert not clip_vision._CACHE and not extract._cache and not analysis._ANALYZERS, "a cache survived Unload models"
assert not mm.current_loaded_models
print("released")
'''


def test_pack_caches_are_released_by_comfyuis_unload_models(tmp_path):
    """The CLIP image encoder, face and pose caches, registered with ComfyUI's model management, are dropped
    when ComfyUI unloads its models (what its Unload models button and free_memory do)."""
    model = tmp_path / "pose.onnx"
    model.write_bytes(b"0" * 4096)
    script = CACHE_SCRIPT.format(comfy=str(Path(COMFYUI).resolve()), root=str(ROOT), tests=str(ROOT / "tests"),
                                 model=str(model))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0 and "released" in done.stdout, done.stderr[-4000:]
