"""Tiny insightface ONNX models with the real input/output signatures, for tests and the demo.

insightface routes a model file by its signature (``insightface/model_zoo/model_zoo.py``), so the
tiny models keep those signatures exactly and compute something simple and known:

- the detector (SCRFD, like ``det_10g.onnx``: ``input.1 [1,3,?,?]`` -> 9 outputs, scores
  ``[2K,1]``, box distances ``[2K,4]`` and 5-point distances ``[2K,10]`` for strides 8, 16, 32)
  finds bright blobs on a dark background. Each stride ``s`` looks for faces of about ``F = 4s``
  pixels (32, 64, 128): with ``m`` the bright mask, ``I`` the mean of ``m`` over the ``F x F``
  window and ``S`` over the ``2F x 2F`` window centred on the anchor, the score is
  ``sigmoid(SCORE_GAIN * (2I - 4S - SCORE_OFFSET))``: 1 for a blob of side ``F`` centred on the
  anchor, about ``t^2`` (``t = side / F < 1``) or ``2 - t^2`` (``t > 1``) before the offset, so
  blobs of about 0.6 F to 1.3 F are found at each stride (20 to 165 pixels after insightface's
  resize to the detection size). The box is a square of side ``2F sqrt(S)`` (the blob's side when
  the blob is a square inside the window) centred on the centroid of the bright pixels in the
  window, so the anchors on a blob give nearly the same box and non-maximum suppression keeps
  one; the 5 points sit at the ArcFace template positions inside that box.
- the recognition model (ArcFace, like ``w600k_r50.onnx``: ``input.1 [N,3,112,112]`` ->
  ``[N,512]``) is a seeded random 16 x 16 patch convolution and projection, so different crops
  give different embeddings and the same crop gives the same one.
- the swap model (like ``inswapper_128.onnx``: ``target [1,3,128,128]``, ``source [1,512]`` ->
  ``output [1,3,128,128]`` in 0..1) tints the target crop with a colour that depends on the
  source embedding; its last initializer is the 512 x 512 ``emap`` matrix insightface reads.

:func:`draw_test_faces` draws bright textured squares with darker eye and mouth marks for them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_graph import OnnxGraph, finish

log = logging.getLogger(__name__)

DET_STRIDES = (8, 16, 32)
DET_ANCHORS = 2
FACE_PER_STRIDE = 4  # a stride-s level looks for faces of 4s pixels

# Bright mask on insightface's detector blob (pixel - 127.5) / 128: 0.5 at pixel value about 51.
MASK_GAIN = 40.0
MASK_BIAS = 24.0
SCORE_GAIN = 30.0
SCORE_OFFSET = 0.3

EMBEDDING_DIM = 512
RECOGNITION_SIZE = 112
SWAP_SIZE = 128

# insightface's ArcFace 5-point template (eyes, nose, mouth corners) in a 112 x 112 crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)

# Detector and recognition file names of the published packs; other names get buffalo_l's.
PACK_FILE_NAMES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}
SWAPPER_FILE = "inswapper_128.onnx"


class _Graph(OnnxGraph):
    """The face models' graph writer: adds pooling, coordinate maps and SCRFD's anchor-row layout."""

    def scale(self, x: str, factor: float) -> str:
        return self.op("Mul", x, self.const(np.float32(factor)))

    def box_pool(self, x: str, kernel: int, stride: int) -> str:
        """Mean over a ``kernel`` square centred on each anchor ``(i*stride, j*stride)``: ``[B,C,H/s,W/s]``.

        Separable (rows, then columns) and counting the zero padding, so a window reaching past
        the image edge sees dark pixels there.
        """
        begin, end = kernel // 2, kernel // 2 - stride
        rows = self.op("AveragePool", x, kernel_shape=[kernel, 1], strides=[stride, 1],
                       pads=[begin, 0, end, 0], count_include_pad=1)
        return self.op("AveragePool", rows, kernel_shape=[1, kernel], strides=[1, stride],
                       pads=[0, begin, 0, end], count_include_pad=1)

    def coordinates(self, like: str, axis: int, step: float, offset: float) -> str:
        """A map shaped like ``like`` holding ``index * step + offset`` along ``axis``."""
        ones = self.op("ConstantOfShape", self.op("Shape", like),
                       value=numpy_helper.from_array(np.ones(1, np.float32)))
        index = self.op("CumSum", ones, self.const(np.int64(axis)))
        return self.op("Add", self.scale(index, step), self.const(np.float32(offset - step)))

    def anchor_rows(self, x: str, channels: int) -> str:
        """``[1,C,h,w]`` -> ``[h*w*2, C]``: row-major over y then x, each anchor location twice."""
        rows = self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 3, 1]), self.const(np.array([-1, channels])))
        twice = self.op("Concat", *([rows] * DET_ANCHORS), axis=1)
        return self.op("Reshape", twice, self.const(np.array([-1, channels])))




def build_detector() -> onnx.ModelProto:
    """Tiny SCRFD: ``input.1 [1,3,H,W]`` (pixel-127.5)/128 RGB -> 9 outputs (see the module docstring)."""
    g = _Graph("det")
    x = "input.1"
    gray = g.op("ReduceMean", x, axes=[1], keepdims=1)
    mask = g.op("Sigmoid", g.op("Add", g.scale(gray, MASK_GAIN), g.const(np.float32(MASK_BIAS))))
    xs = g.coordinates(mask, axis=3, step=1.0, offset=0.5)  # pixel centres
    ys = g.coordinates(mask, axis=2, step=1.0, offset=0.5)
    moments = g.op("Concat", mask, g.op("Mul", mask, xs), g.op("Mul", mask, ys), axis=1)
    template = (ARCFACE_TEMPLATE / RECOGNITION_SIZE - 0.5).reshape(1, 10, 1, 1) * 2.0
    scores, boxes, points = [], [], []
    for s in DET_STRIDES:
        size = FACE_PER_STRIDE * s
        inner = g.box_pool(mask, size, s)
        outer = g.box_pool(moments, 2 * size, s)
        split = [g.name() for _ in range(3)]
        g.nodes.append(helper.make_node("Split", [outer, g.const(np.array([1, 1, 1]))], split, axis=1,
                                        name=g.name()))
        surround, sum_x, sum_y = split
        raw = g.op("Sub", g.scale(inner, 2.0), g.scale(surround, 4.0))
        score = g.op("Sigmoid", g.scale(g.op("Add", raw, g.const(np.float32(-SCORE_OFFSET))), SCORE_GAIN))
        safe = g.op("Add", surround, g.const(np.float32(1e-6)))
        dx = g.op("Sub", g.op("Div", sum_x, safe), g.coordinates(surround, axis=3, step=float(s), offset=0.0))
        dy = g.op("Sub", g.op("Div", sum_y, safe), g.coordinates(surround, axis=2, step=float(s), offset=0.0))
        half = g.scale(g.op("Sqrt", surround), float(size))  # half the side 2F sqrt(S)
        box = g.op("Concat", g.op("Sub", half, dx), g.op("Sub", half, dy), g.op("Add", half, dx),
                   g.op("Add", half, dy), axis=1)
        centre = g.op("Concat", *([dx, dy] * 5), axis=1)
        kps = g.op("Add", centre, g.op("Mul", half, g.const(template)))
        scores.append(g.anchor_rows(score, 1))
        boxes.append(g.anchor_rows(g.scale(box, 1.0 / s), 4))
        points.append(g.anchor_rows(g.scale(kps, 1.0 / s), 10))
    outputs = []
    for kind, values, width in (("score", scores, 1), ("bbox", boxes, 4), ("kps", points, 10)):
        for s, v in zip(DET_STRIDES, values):
            name = f"{kind}_{s}"
            g.op("Identity", v, out=name)
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"anchors_{s}", width]))
    graph = helper.make_graph(g.nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "height", "width"])],
                              outputs)
    return finish(graph)


def build_recognition(seed: int = 112) -> onnx.ModelProto:
    """Tiny ArcFace: ``input.1 [N,3,112,112]`` (pixel-127.5)/127.5 RGB -> ``[N,512]`` (seeded random weights)."""
    rng = np.random.RandomState(seed)
    conv_w = rng.normal(0.0, 0.1, (8, 3, 16, 16)).astype(np.float32)
    conv_b = rng.normal(0.0, 0.5, 8).astype(np.float32)
    features = 8 * (RECOGNITION_SIZE // 16) ** 2
    fc_w = rng.normal(0.0, 1.0 / np.sqrt(features), (features, EMBEDDING_DIM)).astype(np.float32)
    g = _Graph("rec")
    x = "input.1"
    h = g.op("Conv", x, g.const(conv_w), g.const(conv_b), kernel_shape=[16, 16], strides=[16, 16])
    h = g.op("Flatten", g.op("Relu", h), axis=1)
    g.op("Gemm", h, g.const(fc_w), g.const(np.zeros(EMBEDDING_DIM, np.float32)), out="embedding")
    graph = helper.make_graph(
        g.nodes, "tiny_arcface",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["None", 3, RECOGNITION_SIZE, RECOGNITION_SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", EMBEDDING_DIM])],
    )
    return finish(graph)


def build_swapper(seed: int = 128) -> onnx.ModelProto:
    """Tiny inswapper: ``target [1,3,128,128]`` 0..1 RGB, ``source [1,512]`` -> ``output [1,3,128,128]`` 0..1.

    ``output = sigmoid(4 (target - 0.5) + conv noise + tint(source))``; the last initializer is the
    seeded 512 x 512 ``emap`` insightface multiplies the source embedding with.
    """
    rng = np.random.RandomState(seed)
    conv_w = rng.normal(0.0, 0.05, (3, 3, 3, 3)).astype(np.float32)
    conv_w[np.arange(3), np.arange(3), 1, 1] += 4.0
    tint_w = rng.normal(0.0, 1.5, (EMBEDDING_DIM, 3)).astype(np.float32)
    emap = rng.normal(0.0, 1.0 / np.sqrt(EMBEDDING_DIM), (EMBEDDING_DIM, EMBEDDING_DIM)).astype(np.float32)
    initializers = [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(tint_w, "tint_w"),
                    numpy_helper.from_array(emap, "emap")]
    g = _Graph("swap")
    image = g.op("Conv", "target", "conv_w", g.const(np.full(3, -2.0, np.float32)), kernel_shape=[3, 3],
                 pads=[1, 1, 1, 1])
    # the emap enters the graph (a no-op product) so onnxruntime keeps it and does not warn
    source = g.op("MatMul", "source", g.op("Mul", "emap", g.const(np.float32(0.0))))
    source = g.op("Add", "source", source)
    tint = g.op("Reshape", g.op("Gemm", source, "tint_w"), g.const(np.array([1, 3, 1, 1])))
    g.op("Sigmoid", g.op("Add", image, tint), out="output")
    graph = helper.make_graph(
        g.nodes, "tiny_inswapper",
        [helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, SWAP_SIZE, SWAP_SIZE]),
         helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, EMBEDDING_DIM])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, SWAP_SIZE, SWAP_SIZE])],
        initializer=initializers,
    )
    return finish(graph)


def write_tiny_face_pack(root_models_dir: str | os.PathLike, name: str = "buffalo_l") -> Path:
    """Write a tiny pack to ``<root>/insightface/models/<name>/`` (detector + recognition, real file names)."""
    det_file, rec_file = PACK_FILE_NAMES.get(name, PACK_FILE_NAMES["buffalo_l"])
    folder = Path(root_models_dir) / "insightface" / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_detector(), str(folder / det_file))
    onnx.save(build_recognition(), str(folder / rec_file))
    log.debug("wrote the tiny face pack %s to %s", name, folder)
    return folder


def write_tiny_inswapper(root_models_dir: str | os.PathLike) -> Path:
    """Write the tiny swap model to ``<root>/insightface/inswapper_128.onnx``; returns its path."""
    folder = Path(root_models_dir) / "insightface"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SWAPPER_FILE
    onnx.save(build_swapper(), str(path))
    log.debug("wrote the tiny swap model to %s", path)
    return path


def draw_test_faces(width: int, height: int, faces: Sequence[tuple[float, float, float]],
                    seed: int = 0) -> np.ndarray:
    """Black ``[H,W,3]`` uint8 RGB image with one bright textured square per ``(cx, cy, size)``.

    Each face gets its own colour and texture (from ``seed`` and its position in ``faces``) and
    darker eye and mouth marks at the ArcFace template positions; the marks stay brighter than
    the detector's mask threshold, so the detector sees the whole square.
    """
    image = np.zeros((height, width, 3), np.float32)
    for i, (cx, cy, size) in enumerate(faces):
        rng = np.random.RandomState([seed, i])
        side = max(int(round(size)), 4)
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        base = rng.uniform(170.0, 235.0, 3)
        coarse = rng.uniform(-1.0, 1.0, (6, 6, 3))
        cells = np.minimum((np.arange(side) * 6) // side, 5)
        texture = coarse[cells[:, None], cells[None, :]]
        patch = base + 25.0 * texture
        uv = (np.arange(side) + 0.5) / side
        mark = 0.06 + 0.02 * rng.uniform()
        for px, py in ARCFACE_TEMPLATE[:2] / RECOGNITION_SIZE:  # eyes
            near = (np.abs(uv[:, None] - py) < mark) & (np.abs(uv[None, :] - px) < mark * 1.4)
            patch[near] = rng.uniform(85.0, 110.0, 3)
        (lx, ly), (rx, _) = ARCFACE_TEMPLATE[3:] / RECOGNITION_SIZE
        mouth = (np.abs(uv[:, None] - ly) < mark * 0.6) & (uv[None, :] > lx) & (uv[None, :] < rx)
        patch[mouth] = rng.uniform(85.0, 110.0, 3)
        ys = slice(max(y0, 0), min(y0 + side, height))
        xs = slice(max(x0, 0), min(x0 + side, width))
        image[ys, xs] = patch[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
