"""Writing tiny ONNX models by hand: a graph built node by node, and the finished model checked.

Shared by the tiny DWPose pair (:mod:`.pose_onnx`) and the tiny insightface models (:mod:`.face_onnx`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 17


def constant_node(name: str, value) -> onnx.NodeProto:
    """A Constant node named ``name`` holding ``value`` (float64 stored as float32)."""
    arr = np.asarray(value)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(arr, name))


class OnnxGraph:
    """Nodes appended one by one, with generated tensor and node names ``<prefix>_<n>`` (never ``Sub*`` or
    ``Mul*``, which insightface's ArcFace loader reads as an MXNet model's built-in normalisation)."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.count = 0

    def name(self) -> str:
        self.count += 1
        return f"{self.prefix}_{self.count}"

    def const(self, value) -> str:
        out = self.name()
        self.nodes.append(constant_node(out, value))
        return out

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self.name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{self.prefix}_n{len(self.nodes)}",
                                           **attrs))
        return out


def finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    """The model of ``graph`` at opset 17 / IR 8 (what onnxruntime 1.18+ reads), checked."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tcan_tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
