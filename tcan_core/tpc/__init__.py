"""Test-time Procrustes Calibration (TPC): the reference aligned to every driving pose.

:func:`calibrate` builds a :class:`Calibration` (the ``TCAN_CALIBRATION`` the sampler reads);
:func:`fit_similarity` is the weighted Procrustes fit; :func:`person_mask_from_pose` draws a
coarse person mask when no segmentation mask is given. ``tcan_core.tpc.preview.preview_frames``
draws each driving skeleton over its calibrated reference (it needs the pose renderer, so it is
imported from its own module).
"""

from .calibration import DEFAULT_SCALE_RANGE, KEYPOINT_SET_HELP, KEYPOINT_SETS, Calibration, calibrate
from .person_mask import person_mask_from_pose, person_masks_from_poses, seen_points
from .procrustes import SimilarityFit, apply_affine, fit_similarity

__all__ = [
    "DEFAULT_SCALE_RANGE", "KEYPOINT_SETS", "KEYPOINT_SET_HELP", "Calibration", "SimilarityFit",
    "apply_affine", "calibrate", "fit_similarity", "person_mask_from_pose", "person_masks_from_poses",
    "seen_points",
]
