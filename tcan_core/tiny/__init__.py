"""Tiny-model kit: SD1.5-shaped models (and pose/face ONNX models) with tiny widths, written in
the real file formats, for tests and the demo (DESIGN.md section 7)."""
