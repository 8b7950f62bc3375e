"""DWPose on onnxruntime: YOLOX person boxes, then RTMPose whole-body keypoints per box.

DWPose (Yang et al., ICCV 2023 workshops) distils RTMPose-L into the whole-body model
``dw-ll_ucoco_384.onnx``; its reference pipeline (the authors' ControlNet annotator, kept by
comfyui_controlnet_aux) runs the YOLOX-L detector ``yolox_l.onnx`` first. The conventions here
follow that pipeline:

- detector: the frame letterboxed into ``[1,3,640,640]`` (scaled by ``min(640/h, 640/w)``, put at
  the top left, the rest filled with 114), raw 0..255 values; the output ``[1,8400,85]`` is the
  raw YOLOX head (centre offsets and log sizes per anchor on grids of stride 8, 16 and 32,
  sigmoid objectness, 80 sigmoid class scores). A person's score is objectness x class 0; boxes
  scoring over 0.3 go through NMS at IoU 0.45. YOLOX was trained on OpenCV's BGR images, so the
  detector gets BGR (the annotator passes RGB; detection is barely affected either way).
- pose: each box padded by 1.25, widened to the model's 288:384 aspect, cropped by an affine
  warp to ``[1,3,384,288]``, normalised with the ImageNet RGB mean/std (mmpose's
  ``bgr_to_rgb=True``); the SimCC outputs ``simcc_x [1,133,576]`` and ``simcc_y [1,133,768]``
  (split ratio 2) are decoded by argmax, a point's score being the smaller of its two maxima.
- COCO-WholeBody's 133 points become OpenPose-18 body (neck = mean of the shoulders when both
  are seen), 70 face points (the 68 landmarks plus the body's right and left eye, as
  controlnet_aux pads them) and 21 + 21 hands (left, right). The 6 foot points are dropped:
  OpenPose-18 and the OpenPose ControlNet have none. Points scoring under 0.3 are missing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import cv2
import numpy as np

from tcan_core import onnx_session
from tcan_core.onnx_session import is_dynamic, shape_of
from tcan_core.pose.types import FramePeople

log = logging.getLogger(__name__)

CUDA, CPU = onnx_session.CUDA, onnx_session.CPU
cuda_device_id = onnx_session.cuda_device_id
PUBLISHED = "https://huggingface.co/yzd-v/DWPose"

DET_STRIDES = (8, 16, 32)
DET_CHANNELS = 85  # 4 box + 1 objectness + 80 COCO classes
DET_PAD_VALUE = 114
DET_SCORE_THRESHOLD = 0.3
DET_NMS_IOU = 0.45

N_WHOLEBODY = 133
SIMCC_SPLIT = 2.0
BOX_PADDING = 1.25
POSE_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
POSE_STD = np.array([58.395, 57.12, 57.375], np.float32)
KEYPOINT_THRESHOLD = 0.3

# OpenPose-18 point -> COCO-WholeBody point; -1 marks the neck, which COCO does not have.
COCO_TO_OPENPOSE = np.array([0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3])
COCO_L_SHOULDER, COCO_R_SHOULDER = 5, 6
FACE_SLICE = slice(23, 91)
LEFT_HAND_SLICE = slice(91, 112)
RIGHT_HAND_SLICE = slice(112, 133)
OPENPOSE_R_EYE, OPENPOSE_L_EYE = 14, 15


def _describe(session) -> str:
    ins = ", ".join(f"{a.name} {shape_of(a)}" for a in session.get_inputs())
    outs = ", ".join(f"{a.name} {shape_of(a)}" for a in session.get_outputs())
    return f"{ins} -> {outs}"


def open_session(path: str, device: str = "cpu"):
    """An onnxruntime session for a DWPose file on ``device`` and the provider it really runs on (see
    :func:`tcan_core.onnx_session.open_session`)."""
    return onnx_session.open_session(path, device, PUBLISHED)


@dataclass(frozen=True)
class DetectorSpec:
    input_name: str
    size: tuple[int, int]


@dataclass(frozen=True)
class PoseSpec:
    input_name: str
    size: tuple[int, int]
    x_name: str
    y_name: str
    batched: bool


def yolox_anchors(height: int, width: int, strides=DET_STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX anchor grid for a ``height`` x ``width`` input: cells ``[N,2]`` (x, y) and strides ``[N]``."""
    cells, sizes = [], []
    for s in strides:
        ys, xs = np.mgrid[0 : height // s, 0 : width // s]
        cells.append(np.stack([xs.reshape(-1), ys.reshape(-1)], 1))
        sizes.append(np.full(xs.size, s))
    return np.concatenate(cells).astype(np.float32), np.concatenate(sizes).astype(np.float32)


def check_detector(session, path: str) -> DetectorSpec:
    """Check that ``session`` is a YOLOX detector with the raw 85-channel head; raise ValueError if not."""
    ins, outs = session.get_inputs(), session.get_outputs()
    ok = len(ins) == 1 and len(outs) >= 1
    if ok:
        shape, out = shape_of(ins[0]), shape_of(outs[0])
        ok = (len(shape) == 4 and shape[1] == 3 and (is_dynamic(shape[0]) or shape[0] == 1)
              and not is_dynamic(shape[2]) and not is_dynamic(shape[3])
              and shape[2] % 32 == 0 and shape[3] % 32 == 0
              and len(out) == 3 and out[2] == DET_CHANNELS)
        if ok and not is_dynamic(out[1]):
            ok = out[1] == len(yolox_anchors(shape[2], shape[3])[1])
    if not ok:
        raise ValueError(
            f"{os.path.basename(path)} is not the YOLOX person detector DWPose expects: expected "
            f"images [1, 3, 640, 640] -> output [1, 8400, 85] (raw YOLOX head, 80 COCO classes), got "
            f"{_describe(session)}. Use yolox_l.onnx from {PUBLISHED} ({path})."
        )
    return DetectorSpec(ins[0].name, (int(shape[2]), int(shape[3])))


def check_pose_model(session, path: str) -> PoseSpec:
    """Check that ``session`` is a 133-point SimCC whole-body model; raise ValueError if not."""
    ins, outs = session.get_inputs(), session.get_outputs()
    ok = len(ins) == 1 and len(outs) == 2
    if ok:
        shape = shape_of(ins[0])
        ok = len(shape) == 4 and shape[1] == 3 and not is_dynamic(shape[2]) and not is_dynamic(shape[3])
        ok = ok and (is_dynamic(shape[0]) or shape[0] == 1)
    if ok:
        names = [o.name for o in outs]
        x_out, y_out = outs
        if "simcc_x" in names and "simcc_y" in names:
            x_out, y_out = outs[names.index("simcc_x")], outs[names.index("simcc_y")]
        height, width = int(shape[2]), int(shape[3])
        xs, ys = shape_of(x_out), shape_of(y_out)
        ok = (len(xs) == 3 and len(ys) == 3 and xs[1] == N_WHOLEBODY and ys[1] == N_WHOLEBODY
              and xs[2] == round(width * SIMCC_SPLIT) and ys[2] == round(height * SIMCC_SPLIT))
    if not ok:
        raise ValueError(
            f"{os.path.basename(path)} is not the DWPose whole-body model: expected input "
            f"[1, 3, 384, 288] -> simcc_x [1, 133, 576], simcc_y [1, 133, 768] (133 COCO-WholeBody "
            f"points, SimCC split 2), got {_describe(session)}. Use dw-ll_ucoco_384.onnx from "
            f"{PUBLISHED} ({path})."
        )
    return PoseSpec(ins[0].name, (height, width), x_out.name, y_out.name, is_dynamic(shape[0]))


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """uint8 ``[H,W,3]`` -> YOLOX input float32 ``[1,3,h,w]`` (scaled to fit, top-left, pad 114) and the scale."""
    h, w = size
    ratio = min(h / image.shape[0], w / image.shape[1])
    new_w, new_h = max(int(image.shape[1] * ratio), 1), max(int(image.shape[0] * ratio), 1)
    canvas = np.full((h, w, 3), DET_PAD_VALUE, np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32), ratio


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: boxes ``[N,4]`` xyxy, scores ``[N]`` -> kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


def decode_yolox(raw: np.ndarray, size: tuple[int, int], ratio: float,
                 score_threshold: float = DET_SCORE_THRESHOLD,
                 iou_threshold: float = DET_NMS_IOU) -> tuple[np.ndarray, np.ndarray]:
    """Raw YOLOX head ``[1,N,85]`` -> person boxes ``[M,4]`` xyxy in the original image and scores ``[M]``.

    YOLOX (Ge et al. 2021): centre = (offset + cell) * stride, size = exp(log size) * stride;
    score = objectness * class-0 probability; boxes are divided by the letterbox scale.
    """
    pred = np.asarray(raw, np.float32).reshape(-1, raw.shape[-1])
    cells, strides = yolox_anchors(*size)
    if pred.shape[0] != cells.shape[0]:
        raise ValueError(f"detector output has {pred.shape[0]} anchors, expected {cells.shape[0]} for a "
                         f"{size[1]} x {size[0]} input; use yolox_l.onnx from {PUBLISHED}")
    scores = pred[:, 4] * pred[:, 5]
    keep = scores > score_threshold
    pred, scores, cells, strides = pred[keep], scores[keep], cells[keep], strides[keep, None]
    centre = (pred[:, :2] + cells) * strides
    half = np.exp(np.clip(pred[:, 2:4], -20.0, 20.0)) * strides / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1) / ratio
    kept = nms(boxes, scores, iou_threshold)
    return boxes[kept], scores[kept]


def box_center_scale(boxes: np.ndarray, aspect: float, padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[M,4]`` xyxy -> centres ``[M,2]`` and crop sizes ``[M,2]`` (padded, widened to ``aspect`` = w/h)."""
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    scales = (boxes[:, 2:] - boxes[:, :2]) * padding
    w, h = scales[:, 0], scales[:, 1]
    wide = w > h * aspect
    scales = np.stack([np.where(wide, w, h * aspect), np.where(wide, w / aspect, h)], axis=1)
    return centers.astype(np.float32), scales.astype(np.float32)


def crop_matrix(center: np.ndarray, scale: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """2x3 affine that maps the ``scale`` (w, h) crop around ``center`` onto a ``size`` (h, w) input."""
    h, w = size
    k = w / float(scale[0])
    return np.array([[k, 0.0, w / 2 - k * center[0]], [0.0, k, h / 2 - k * center[1]]], np.float32)


def crop_to_image(points: np.ndarray, centers: np.ndarray, scales: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop pixels ``[M,K,2]`` -> image pixels: the inverse of :func:`crop_matrix` per person."""
    h, w = size
    return points / np.array([w, h], np.float32) * scales[:, None] + centers[:, None] - scales[:, None] / 2


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = SIMCC_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """SimCC (Li et al., ECCV 2022) argmax decode: ``[M,K,Wx]``, ``[M,K,Wy]`` -> crop points ``[M,K,2]``, scores ``[M,K]``."""
    x_loc, y_loc = simcc_x.argmax(-1), simcc_y.argmax(-1)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    points = np.stack([x_loc, y_loc], -1).astype(np.float32) / split
    points[scores <= 0] = -1.0
    return points, scores.astype(np.float32)


def wholebody_to_openpose(points: np.ndarray, scores: np.ndarray,
                          threshold: float = KEYPOINT_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCO-WholeBody ``[M,133,2]`` + scores ``[M,133]`` -> body ``[M,18,3]``, face ``[M,70,3]``, hands ``[M,2,21,3]``.

    Confidence is the model score clipped to 1 where it reaches ``threshold`` and 0 (missing) elsewhere.
    """
    conf = np.where(scores >= threshold, np.minimum(scores, 1.0), 0.0).astype(np.float32)
    pts = np.concatenate([points.astype(np.float32), conf[..., None]], axis=-1)
    pts[conf <= 0] = 0.0
    body = pts[:, np.maximum(COCO_TO_OPENPOSE, 0)].copy()
    shoulders = pts[:, [COCO_L_SHOULDER, COCO_R_SHOULDER]]
    both = (shoulders[..., 2] > 0).all(-1)
    neck = np.zeros_like(body[:, 0])
    neck[both, :2] = shoulders[both, :, :2].mean(1)
    neck[both, 2] = shoulders[both, :, 2].min(-1)
    body[:, COCO_TO_OPENPOSE == -1] = neck[:, None]
    face = np.concatenate([pts[:, FACE_SLICE], body[:, [OPENPOSE_R_EYE, OPENPOSE_L_EYE]]], axis=1)
    hands = np.stack([pts[:, LEFT_HAND_SLICE], pts[:, RIGHT_HAND_SLICE]], axis=1)
    return body, face, hands


class DWPose:
    """The DWPose pair on onnxruntime: RGB uint8 ``[H,W,3]`` -> :class:`FramePeople` in its pixels."""

    def __init__(self, detector_path: str, pose_path: str, device: str = "cpu"):
        self.detector, det_provider = open_session(detector_path, device)
        self.det_spec = check_detector(self.detector, detector_path)
        self.pose, pose_provider = open_session(pose_path, device)
        self.pose_spec = check_pose_model(self.pose, pose_path)
        self.provider = (det_provider if det_provider == pose_provider
                         else f"detector {det_provider}, pose {pose_provider}")
        log.info("DWPose: %s + %s on %s", detector_path, pose_path, self.provider)

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 ``[H,W,3]`` -> person boxes ``[M,4]`` xyxy and scores ``[M]``."""
        tensor, ratio = letterbox(np.ascontiguousarray(image[..., ::-1]), self.det_spec.size)
        raw = self.detector.run(None, {self.det_spec.input_name: tensor})[0]
        return decode_yolox(raw, self.det_spec.size, ratio)

    def estimate(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 ``[H,W,3]`` and boxes ``[M,4]`` -> COCO-WholeBody points ``[M,133,2]`` (image pixels), scores ``[M,133]``."""
        spec = self.pose_spec
        h, w = spec.size
        centers, scales = box_center_scale(boxes, aspect=w / h)
        crops = np.stack([
            cv2.warpAffine(image, crop_matrix(c, s, spec.size), (w, h), flags=cv2.INTER_LINEAR)
            for c, s in zip(centers, scales)
        ]).astype(np.float32)
        batch = ((crops - POSE_MEAN) / POSE_STD).transpose(0, 3, 1, 2)
        chunks = [batch] if spec.batched else [batch[i : i + 1] for i in range(len(batch))]
        outs = [self.pose.run([spec.x_name, spec.y_name], {spec.input_name: np.ascontiguousarray(c)})
                for c in chunks]
        simcc_x = np.concatenate([o[0] for o in outs])
        simcc_y = np.concatenate([o[1] for o in outs])
        points, scores = simcc_decode(simcc_x, simcc_y)
        return crop_to_image(points, centers, scales, spec.size), scores

    def __call__(self, image: np.ndarray) -> FramePeople:
        boxes, _scores = self.detect(image)
        if len(boxes) == 0:
            return FramePeople.empty()
        points, scores = self.estimate(image, boxes)
        body, face, hands = wholebody_to_openpose(points, scores)
        return FramePeople(body=body, face=face, hands=hands, boxes=boxes.astype(np.float32))
