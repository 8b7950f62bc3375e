"""Pose stage: extraction, smoothing, retargeting (TCAN Algorithm 1), rendering and JSON I/O."""
