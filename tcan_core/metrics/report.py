"""Writing an evaluation: a Markdown table, a CSV table, a JSON with every number, and the per-frame plot."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from .evaluate import HIGHER_IS_BETTER, PER_FRAME, SET_METRICS, EvaluationResult

log = logging.getLogger(__name__)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    if v != 0 and abs(v) < 1e-2:
        return f"{v:.3e}"
    return f"{v:.4f}"


def _columns(result: EvaluationResult) -> list[str]:
    order = [*PER_FRAME, "face distance", *SET_METRICS]
    return [m for m in order if m in result.summary]


def to_markdown(result: EvaluationResult) -> str:
    """The summary row, one row per video (per-frame metrics) and the metrics left out, as Markdown."""
    cols = _columns(result)
    arrow = {m: (" (higher better)" if m in HIGHER_IS_BETTER else " (lower better)") for m in cols}
    lines = ["| video | " + " | ".join(m + arrow[m] for m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| **all** | " + " | ".join(_fmt(result.summary[m]) for m in cols) + " |")
    for name, row in result.per_video.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(m)) if m in row else "" for m in cols) + " |")
    if result.skipped:
        lines += ["", "Left out:"] + [f"- {m}: {why}" for m, why in result.skipped.items()]
    s = result.settings
    if s:
        lines += ["", f"Resize: {s.get('resize')}; clips: {s.get('clip_length')} frames every {s.get('clip_stride')} "
                      f"frame(s), pooled per {s.get('clip_pool')}. PSNR (DisCo uint8) and L1 (DisCo) reproduce DisCo's "
                      "metric code for comparison with published tables; PSNR and L1 are the correct values."]
    return "\n".join(lines) + "\n"


def to_csv(result: EvaluationResult) -> str:
    """One row per video and one 'all' row; set metrics only on the 'all' row."""
    cols = _columns(result)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["video", *cols])
    writer.writerow(["all", *[_csv_value(result.summary[m]) for m in cols]])
    for name, row in result.per_video.items():
        writer.writerow([name, *[_csv_value(row.get(m)) for m in cols]])
    return buf.getvalue()


def _csv_value(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def to_json(result: EvaluationResult) -> str:
    """Every number (per frame, per video, summary), what was left out and the settings, as JSON (inf as "inf")."""
    payload = {"summary": result.summary, "per_video": result.per_video, "per_frame": result.per_frame,
               "skipped": result.skipped, "settings": result.settings}
    return json.dumps(_json_safe(payload), indent=1)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(result: EvaluationResult, out_dir: str | os.PathLike, stem: str = "evaluation") -> dict[str, Path]:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` in ``out_dir``, each written to a temporary name first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    _write_atomic(paths["markdown"], to_markdown(result))
    _write_atomic(paths["csv"], to_csv(result))
    _write_atomic(paths["json"], to_json(result))
    return paths


PLOT_COLORS = ((40, 90, 220), (220, 100, 30), (30, 150, 60), (160, 40, 160), (200, 40, 40), (20, 140, 150),
               (120, 120, 20))


def plot_curves(per_frame: dict[str, list[float | None]], width: int = 768, panel_height: int = 120) -> torch.Tensor:
    """IMAGE ``[1,H,W,3]``: one panel per metric with its per-frame curve, its range and its mean."""
    import cv2

    names = [m for m in per_frame if per_frame[m]]
    if not names:
        names = ["(no per-frame metric)"]
    h = panel_height * len(names)
    canvas = np.full((h, width, 3), 255, np.uint8)
    font, aa = cv2.FONT_HERSHEY_SIMPLEX, cv2.LINE_AA
    left, right, top, bottom = 70, 16, 22, 14
    for k, name in enumerate(names):
        y0 = k * panel_height
        values = per_frame.get(name, [])
        finite = [v for v in values if v is not None and math.isfinite(v)]
        cv2.rectangle(canvas, (left, y0 + top), (width - right, y0 + panel_height - bottom), (200, 200, 200), 1)
        if not finite:
            cv2.putText(canvas, f"{name}: no values", (left, y0 + 16), font, 0.45, (20, 20, 20), 1, aa)
            continue
        lo, hi = min(finite), max(finite)
        span = hi - lo if hi > lo else 1.0
        n = len(values)

        def xy(i: int, v: float) -> tuple[int, int]:
            x = left + (width - left - right) * ((i + 0.5) / n)
            y = y0 + top + (panel_height - top - bottom) * (1.0 - (v - lo) / span)
            return int(round(x)), int(round(y))

        color = PLOT_COLORS[k % len(PLOT_COLORS)]
        for i in range(n - 1):
            a, b = values[i], values[i + 1]
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                cv2.line(canvas, xy(i, a), xy(i + 1, b), color, 2, aa)
        for i, v in enumerate(values):
            if v is not None and math.isfinite(v):
                cv2.circle(canvas, xy(i, v), 2, color, -1, aa)
        mean = float(np.mean(finite))
        cv2.putText(canvas, f"{name}: mean {_fmt(mean)} (min {_fmt(lo)}, max {_fmt(hi)}) over {len(finite)} of {n} "
                            "frames", (left, y0 + 16), font, 0.45, (20, 20, 20), 1, aa)
        cv2.putText(canvas, _fmt(hi), (4, y0 + top + 8), font, 0.35, (80, 80, 80), 1, aa)
        cv2.putText(canvas, _fmt(lo), (4, y0 + panel_height - bottom), font, 0.35, (80, 80, 80), 1, aa)
    return torch.from_numpy(canvas).float().div(255.0).unsqueeze(0)
