"""The ``TCAN_FACE`` type: one identity, from one face, several reference faces, or a weighted mix.

A :class:`FaceIdentity` holds what every face node needs: the aligned crops (for the CLIP image
encoder of ID-Animator), their weights, the 512-d identity embedding (for IP-Adapter FaceID, the
face pass and the similarity metric) and where the main face was found (box and 5 landmarks, for
previews and reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

EMBEDDING_DIM = 512
CROP_SIZE = 224


def normalized(embedding: torch.Tensor) -> torch.Tensor:
    """[..., D] -> the same direction with L2 norm 1 (float32); an all-zero vector is an error."""
    norm = torch.linalg.vector_norm(embedding.float(), dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("an identity embedding is all zeros; the face could not be read (analyse the image again)")
    return embedding.float() / norm


@dataclass(frozen=True, eq=False)
class FaceIdentity:
    """A face identity (``TCAN_FACE``).

    ``crops`` [N,S,S,3] float32 0..1: each reference face aligned to the ArcFace 5-point template
    (S = 224, ID-Animator's crop); ``weights`` [N]: how much each face counts, summing to 1;
    ``embedding`` [512]: the unit-norm identity, the weighted mean of the faces' unit embeddings,
    renormalised; ``kps`` [5,2] and ``bbox`` [4] (x1, y1, x2, y2): the main face in its source
    image's pixels; ``image_size``: (width, height) of that image; ``det_score``: its detector score;
    ``source``: a short description for reports.
    """

    crops: torch.Tensor
    weights: torch.Tensor
    embedding: torch.Tensor
    kps: torch.Tensor
    bbox: torch.Tensor
    image_size: tuple[int, int]
    det_score: float = 1.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.crops.ndim != 4 or self.crops.shape[-1] != 3 or self.crops.shape[0] < 1:
            raise ValueError(f"face crops must be [N,S,S,3], got {list(self.crops.shape)}")
        if self.weights.shape != (self.crops.shape[0],):
            raise ValueError(f"face weights must be [{self.crops.shape[0]}] (one per crop), got "
                             f"{list(self.weights.shape)}")
        if self.embedding.ndim != 1:
            raise ValueError(f"the identity embedding must be a vector [D], got {list(self.embedding.shape)}")
        if self.kps.shape != (5, 2) or self.bbox.shape != (4,):
            raise ValueError(f"a face needs 5 landmarks [5,2] and a box [4], got {list(self.kps.shape)} and "
                             f"{list(self.bbox.shape)}")

    @property
    def num_faces(self) -> int:
        return int(self.crops.shape[0])

    @property
    def box_size(self) -> float:
        """The main face's box side in source pixels (the smaller of width and height)."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return min(x2 - x1, y2 - y1)

    def describe(self) -> str:
        x1, y1, x2, y2 = (round(float(v)) for v in self.bbox)
        faces = f"{self.num_faces} faces" if self.num_faces > 1 else "1 face"
        return f"{self.source or 'face'}: {faces}, main box ({x1},{y1})-({x2},{y2}), score {self.det_score:.2f}"


def combine_faces(faces: Sequence[FaceIdentity], weights: Sequence[float], source: str = "") -> FaceIdentity:
    """Several identities -> one: crops kept with ``weights`` times their own weights (renormalised to sum 1),
    embedding = normalised weighted sum of the unit embeddings (identity mixing / interpolation).

    Faces with weight 0 are dropped, so weights (1, 0) give exactly the first face. The box,
    landmarks and image size are those of the face with the largest weight.
    """
    if len(faces) == 0:
        raise ValueError("no faces to combine; connect at least one TCAN_FACE")
    if len(weights) != len(faces):
        raise ValueError(f"{len(faces)} faces but {len(weights)} weights; give one weight per face")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"face weights must be finite numbers >= 0, got {values}")
    if sum(values) <= 0:
        raise ValueError(f"face weights {values} sum to 0; give at least one face a weight above 0")
    dims = {int(f.embedding.shape[0]) for f in faces}
    if len(dims) > 1:
        raise ValueError(f"the faces' identity embeddings have different sizes {sorted(dims)}; analyse all faces "
                         "with the same insightface model pack")
    kept = [(f, w) for f, w in zip(faces, values) if w > 0]
    if len(kept) == 1:
        return kept[0][0]
    crops = torch.cat([f.crops for f, _ in kept])
    crop_weights = torch.cat([f.weights.float() * w for f, w in kept])
    crop_weights = crop_weights / crop_weights.sum()
    embedding = sum(normalized(f.embedding) * w for f, w in kept)
    main = max(kept, key=lambda fw: fw[1])[0]
    return FaceIdentity(crops=crops, weights=crop_weights, embedding=normalized(embedding), kps=main.kps,
                        bbox=main.bbox, image_size=main.image_size, det_score=main.det_score,
                        source=source or " + ".join(f"{w:g} x {f.source or 'face'}" for f, w in kept))
