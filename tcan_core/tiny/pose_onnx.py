"""Tiny DWPose ONNX models with the real input/output signatures, for tests and the demo.

The real DWPose pair is a YOLOX-L person detector (``yolox_l.onnx``: ``images [1,3,640,640]`` ->
``output [1,8400,85]``, the raw YOLOX head) and an RTMPose-L whole-body model
(``dw-ll_ucoco_384.onnx``: ``input [1,3,384,288]`` -> ``simcc_x [1,133,576]``,
``simcc_y [1,133,768]``). The tiny models keep those names and shapes but compute something
simple and known, so a test can check where the decoded boxes and keypoints must land:

- the detector finds the bounding box of the bright pixels (channel mean above
  :data:`DET_BRIGHT_LEVEL` on 0..255 input) and writes it as a raw YOLOX prediction at two
  anchors: the stride-32 cell that holds the box centre (objectness 0.9) and the stride-16 cell
  that holds it (objectness 0.8), both with class-0 ("person") score 0.95. Decoding must recover
  the box and NMS must merge the two. With no bright pixel every objectness is 0.
- the pose model finds the bright pixels' bounding box inside its crop (normalised value above 0)
  and places COCO-WholeBody point ``k`` at ``box origin + TEMPLATE_UV[k] * box size``, written as
  a Gaussian bump (sigma 1 crop pixel) on the SimCC bins; the peak height is
  ``TEMPLATE_GAIN[k]``, so points with a gain under the 0.3 threshold decode as missing. Mapped
  back through the crop, the points must land at the same fractions of the bright rectangle in
  the image.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_graph import OnnxGraph, constant_node, finish

log = logging.getLogger(__name__)

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"

DET_SIZE = (640, 640)
DET_STRIDES = (8, 16, 32)
DET_CLASSES = 80
DET_BRIGHT_LEVEL = 160.0
DET_OBJECTNESS = {32: 0.9, 16: 0.8}
DET_PERSON_SCORE = 0.95

POSE_SIZE = (384, 288)
POSE_KEYPOINTS = 133
SIMCC_SPLIT = 2.0
POSE_SIGMA = 1.0
LOW_GAIN = 0.1


def _template() -> tuple[np.ndarray, np.ndarray]:
    """A standing person, facing the camera, in fractions of its box: ``[133,2]`` (u, v) and gains."""
    body = [
        (0.50, 0.08), (0.54, 0.06), (0.46, 0.06), (0.58, 0.08), (0.42, 0.08),
        (0.68, 0.22), (0.32, 0.22), (0.80, 0.38), (0.20, 0.38), (0.86, 0.52), (0.14, 0.52),
        (0.60, 0.55), (0.40, 0.55), (0.62, 0.75), (0.38, 0.75), (0.63, 0.93), (0.37, 0.93),
    ]
    feet = [(0.66, 0.98), (0.64, 0.99), (0.62, 0.97), (0.34, 0.98), (0.36, 0.99), (0.38, 0.97)]
    angle = np.linspace(0.0, 2.0 * np.pi, 68, endpoint=False)
    radius = np.where(np.arange(68) < 17, 1.0, 0.55)
    face = np.stack([0.50 + 0.07 * radius * np.cos(angle), 0.09 + 0.05 * radius * np.sin(angle)], 1)
    fan = np.linspace(-0.6, 0.6, 5)
    finger_r = np.array([0.02, 0.035, 0.05, 0.065])

    def hand(wx: float, wy: float, side: float) -> np.ndarray:
        pts = [(wx, wy)]
        for a in fan:
            for r in finger_r:
                pts.append((wx + side * r * np.sin(a + 0.9), wy + r * np.cos(a + 0.9)))
        return np.array(pts)

    uv = np.concatenate([np.array(body), np.array(feet), face, hand(0.86, 0.54, 1.0), hand(0.14, 0.54, -1.0)])
    gain = np.ones(POSE_KEYPOINTS)
    gain[4] = LOW_GAIN  # the right ear: decodes as missing (OpenPose point 16)
    return uv.astype(np.float32), gain.astype(np.float32)


TEMPLATE_UV, TEMPLATE_GAIN = _template()


class _Graph(OnnxGraph):
    """The pose models' graph writer: adds the bright-box reduction."""

    def bright_box(self, mask: str, rows_axis: int, cols_axis: int) -> tuple[str, str, str, str, str]:
        """Per-batch ``[B,1]`` floats x0, y0, x1, y1 (exclusive ends) and any-bright of a 0/1 mask."""
        col = self.op("ReduceMax", mask, axes=[rows_axis], keepdims=0)
        row = self.op("ReduceMax", mask, axes=[cols_axis], keepdims=0)
        one = self.const(np.float32(1.0))
        ends = []
        for profile in (col, row):
            first = self.op("ArgMax", profile, axis=-1, keepdims=0, select_last_index=0)
            last = self.op("ArgMax", profile, axis=-1, keepdims=0, select_last_index=1)
            first = self.op("Cast", first, to=TensorProto.FLOAT)
            last = self.op("Add", self.op("Cast", last, to=TensorProto.FLOAT), one)
            ends.append((first, last))
        anything = self.op("ReduceMax", mask, axes=[rows_axis, cols_axis], keepdims=0)
        shape = self.const(np.array([-1, 1], np.int64))
        (x0, x1), (y0, y1) = ends
        x0, y0, x1, y1, anything = (self.op("Reshape", v, shape) for v in (x0, y0, x1, y1, anything))
        return x0, y0, x1, y1, anything


def _anchor_tables(height: int, width: int, strides=DET_STRIDES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """YOLOX anchor order: per stride, row-major over the grid: ``[N]`` grid x, grid y, stride."""
    gx, gy, st = [], [], []
    for s in strides:
        ys, xs = np.mgrid[0 : height // s, 0 : width // s]
        gx.append(xs.reshape(-1))
        gy.append(ys.reshape(-1))
        st.append(np.full(xs.size, s))
    return (np.concatenate(gx).astype(np.float32), np.concatenate(gy).astype(np.float32),
            np.concatenate(st).astype(np.float32))


def build_detector(size: tuple[int, int] = DET_SIZE, classes: int = DET_CLASSES,
                   input_name: str = "images", output_name: str = "output") -> onnx.ModelProto:
    """Tiny YOLOX head: ``[1,3,H,W]`` 0..255 -> raw ``[1,N,4+1+classes]`` marking the bright box."""
    height, width = size
    gx, gy, stride = _anchor_tables(height, width)
    n = gx.size
    g = _Graph("det")
    gray = g.op("ReduceMean", input_name, axes=[1], keepdims=0)
    mask = g.op("Cast", g.op("Greater", gray, g.const(np.float32(DET_BRIGHT_LEVEL))), to=TensorProto.FLOAT)
    x0, y0, x1, y1, anything = g.bright_box(mask, rows_axis=1, cols_axis=2)
    half = g.const(np.float32(0.5))
    cx = g.op("Mul", g.op("Add", x0, x1), half)
    cy = g.op("Mul", g.op("Add", y0, y1), half)
    bw = g.op("Sub", x1, x0)
    bh = g.op("Sub", y1, y0)
    gx_c, gy_c, st_c = g.const(gx[None]), g.const(gy[None]), g.const(stride[None])
    cx_s = g.op("Div", cx, st_c)
    cy_s = g.op("Div", cy, st_c)
    fields = [
        g.op("Sub", cx_s, gx_c), g.op("Sub", cy_s, gy_c),
        g.op("Log", g.op("Div", bw, st_c)), g.op("Log", g.op("Div", bh, st_c)),
    ]
    in_cell = g.op("And", g.op("Equal", g.op("Floor", cx_s), gx_c), g.op("Equal", g.op("Floor", cy_s), gy_c))
    level_obj = np.zeros(n, np.float32)
    for s, obj in DET_OBJECTNESS.items():
        level_obj[stride == s] = obj
    objectness = g.op("Mul", g.op("Mul", g.op("Cast", in_cell, to=TensorProto.FLOAT), g.const(level_obj[None])),
                      anything)
    fields.append(objectness)
    cls = np.zeros((1, 1, classes), np.float32)
    cls[..., 0] = DET_PERSON_SCORE
    cls = g.op("Expand", g.const(cls), g.const(np.array([1, n, classes], np.int64)))
    columns = [g.op("Unsqueeze", f, g.const(np.array([2], np.int64))) for f in fields]
    g.op("Concat", *columns, cls, axis=2, out=output_name)
    graph = helper.make_graph(
        g.nodes, "tiny_yolox",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, n, 5 + classes])],
    )
    return finish(graph)


def build_pose(size: tuple[int, int] = POSE_SIZE, keypoints: int = POSE_KEYPOINTS, batch: int | str = 1,
               input_name: str = "input", output_names: tuple[str, str] = ("simcc_x", "simcc_y")) -> onnx.ModelProto:
    """Tiny RTMPose SimCC head: ``[B,3,H,W]`` normalised -> ``[B,K,2W]``, ``[B,K,2H]`` peaking at the template."""
    height, width = size
    uv = np.resize(TEMPLATE_UV, (keypoints, 2))
    gain = np.resize(TEMPLATE_GAIN, keypoints)
    g = _Graph("pose")
    gray = g.op("ReduceMean", input_name, axes=[1], keepdims=0)
    mask = g.op("Cast", g.op("Greater", gray, g.const(np.float32(0.0))), to=TensorProto.FLOAT)
    outputs = []
    x0, y0, x1, y1, anything = g.bright_box(mask, rows_axis=1, cols_axis=2)
    peak = g.op("Mul", g.const(gain[None, :, None]), g.op("Unsqueeze", anything, g.const(np.array([2], np.int64))))
    for (lo, hi), u, bins, name in (
        ((x0, x1), uv[:, 0], int(width * SIMCC_SPLIT), output_names[0]),
        ((y0, y1), uv[:, 1], int(height * SIMCC_SPLIT), output_names[1]),
    ):
        lo3 = g.op("Unsqueeze", lo, g.const(np.array([2], np.int64)))
        span3 = g.op("Unsqueeze", g.op("Sub", hi, lo), g.const(np.array([2], np.int64)))
        pos = g.op("Add", lo3, g.op("Mul", span3, g.const(u[None, :, None])))
        centers = g.const((np.arange(bins, dtype=np.float32) / SIMCC_SPLIT)[None, None, :])
        d = g.op("Sub", centers, pos)
        bump = g.op("Exp", g.op("Mul", g.op("Mul", d, d), g.const(np.float32(-0.5 / POSE_SIGMA**2))))
        g.op("Mul", bump, peak, out=name)
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, keypoints, bins]))
    graph = helper.make_graph(
        g.nodes, "tiny_rtmpose",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, height, width])],
        outputs,
    )
    return finish(graph)


def _build_nms_detector() -> onnx.ModelProto:
    """A detector with NMS exported inside: ``images [1,3,640,640]`` -> count, boxes, scores, classes."""
    outputs = {"num_dets": np.zeros((1, 1), np.float32), "det_boxes": np.zeros((1, 100, 4), np.float32),
               "det_scores": np.zeros((1, 100), np.float32), "det_classes": np.zeros((1, 100), np.float32)}
    nodes = [constant_node(name, value) for name, value in outputs.items()]
    graph = helper.make_graph(
        nodes, "tiny_nms_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *DET_SIZE])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)) for name, v in outputs.items()],
    )
    return finish(graph)




def write_dwpose_models(folder: str | os.PathLike, batch: int | str = 1) -> tuple[str, str]:
    """Write the tiny ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` into ``folder``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    det, pose = folder / DETECTOR_FILE, folder / POSE_FILE
    onnx.save(build_detector(), str(det))
    onnx.save(build_pose(batch=batch), str(pose))
    log.debug("wrote tiny DWPose models to %s", folder)
    return str(det), str(pose)


def write_wrong_models(folder: str | os.PathLike) -> dict[str, str]:
    """Models with the wrong signature for the error tests: name -> path.

    ``detector_6`` is a one-class detector (output ``[1,8400,6]``), ``detector_nms`` a detector
    exported with NMS inside (four outputs: count, boxes, scores, classes), ``pose_17`` a
    body-only RTMPose (17 points), ``pose_one_output`` a pose model without ``simcc_y``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = {
        "detector_6": build_detector(classes=1),
        "detector_nms": _build_nms_detector(),
        "pose_17": build_pose(keypoints=17),
    }
    one = build_pose()
    del one.graph.output[1]
    models["pose_one_output"] = one
    paths = {}
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        onnx.save(model, str(path))
        paths[name] = str(path)
    return paths
