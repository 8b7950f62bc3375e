"""``python -m tcan_core``: help, doctor on the tiny tree, and the README / CI commands in step."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT
from tcan_core.cli import main
from tcan_core.doctor import format_report, run_doctor
from tcan_core.model_folders import ModelFolders
from tcan_core.tiny.sd15 import sdxl_like_state_dict


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "tcan_core", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for command in ("doctor", "animate", "tiny-models", "demo"):
        assert command in out.stdout


def test_doctor_finds_the_tiny_sd15_models(tiny_tree):
    reports = {r.slot.key: r for r in run_doctor(ModelFolders(tiny_tree.root))}
    for key in ("sd15", "controlnet", "motion"):
        assert reports[key].found, key
    motion = {f.name: f.what for f in reports["motion"].files}
    assert "version=v1" in motion["tiny_mm_v1.ckpt"] and "version=v3" in motion["tiny_mm_v3.safetensors"]
    assert all("SD1.5" in f.what for f in reports["sd15"].files)


def test_doctor_explains_what_is_missing(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "checkpoints").mkdir()
    save_file(sdxl_like_state_dict(), str(tmp_path / "checkpoints" / "xl.safetensors"))
    (tmp_path / "checkpoints" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    text = format_report(run_doctor(ModelFolders(tmp_path)))
    assert "[MISSING] SD1.5 base checkpoint" in text
    assert "- xl.safetensors: refused by the loader: the file is an SDXL checkpoint" in text
    assert re.search(r"- broken\.safetensors: unreadable: .*truncated or corrupt", text)
    assert f"searched: {tmp_path / 'controlnet'}" in text
    assert "control_v11p_sd15_openpose.pth" in text and "huggingface.co/lllyasviel/ControlNet-v1-1" in text
    assert "mm_sd_v15_v2.ckpt" in text and "huggingface.co/guoyww/animatediff" in text


def test_doctor_command_exit_code(tmp_path, capsys):
    assert main(["doctor", "--models", str(tmp_path)]) == 1
    assert "Missing required models" in capsys.readouterr().out


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```\s*<!-- /{marker} -->", text, re.S)
    assert block, f"README.md has no {marker} block"
    return block.group(1).strip()


def test_readme_commands_and_ci_in_step():
    test_cmd = _readme_block("test-command")
    main_cmd = _readme_block("main-command")
    assert "pytest" in test_cmd and "tcan_core demo" in main_cmd and "tcan_core animate" in main_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and "README.md" in ci
    extracted = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md "
                       "| grep -v '^<!--' | grep -v '^```'"], capture_output=True, text=True, cwd=ROOT)
    assert extracted.stdout.strip() == test_cmd


def test_demo_runs_the_graph_and_animate_runs_on_its_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    for name in ("doctor.txt", "reference.png", "reference_pose.json", "driving_pose.json", "pose_retargeted.png",
                 "tpc_preview.png", "temperature_map.png", "animation.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "All required models found." in (tmp_path / "doctor.txt").read_text()
    assert main(["doctor", "--models", str(tmp_path / "models")]) == 0

    out = tmp_path / "animate.mp4"
    args = ["animate", "--reference", str(tmp_path / "reference.png"), "--reference-pose",
            str(tmp_path / "reference_pose.json"), "--driving", str(tmp_path / "driving_pose.json"), "--models",
            str(tmp_path / "models"), "--out", str(out), "--steps", "2", "--max-frames", "5"]
    capsys.readouterr()
    assert main(args + ["--width", "72", "--height", "96"]) == 0
    printed = capsys.readouterr().out
    # An mp4 is always written (H.264 through PyAV); there is no silent fallback to PNG frames.
    assert "wrote 5 frames (72x96): H.264 video" in printed and out.stat().st_size > 0

    assert main(args + ["--width", "70", "--height", "96"]) == 2
    assert "width must be a multiple of 8" in capsys.readouterr().err
    bad = tmp_path / "driving.txt"
    bad.write_text("not a video")
    assert main(["animate", "--reference", str(tmp_path / "reference.png"), "--driving", str(bad), "--models",
                 str(tmp_path / "models"), "--out", str(out)]) == 2
    assert "neither a video" in capsys.readouterr().err


def test_doctor_reads_the_face_kit_by_content(tmp_path):
    from tcan_core.tiny.sd15 import build_tiny_sd15
    from tcan_core.tiny.tree import write_face_models

    write_face_models(tmp_path, build_tiny_sd15()[0])
    (tmp_path / "tcan" / "pose").mkdir(parents=True)
    (tmp_path / "tcan" / "pose" / "yolox_l.onnx").write_bytes(b"\x08\x08")
    reports = {r.slot.key: r for r in run_doctor(ModelFolders(tmp_path))}
    assert reports["face_swap"].found and reports["insightface"].found
    adapters = {f.name: f for f in reports["id_adapter"].files}
    # The tiny adapters have a 64-wide cross-attention: recognised, but not usable with SD1.5 (768).
    assert adapters["animator.ckpt"].what.startswith("ID-Animator face adapter (cross-attention width 64)")
    assert adapters["ip-adapter-faceid_sd15.bin"].what.startswith("IP-Adapter FaceID face adapter")
    assert not any(f.usable for f in adapters.values())
    assert not any(f.name.endswith(".onnx") for f in reports["tcan"].files)
