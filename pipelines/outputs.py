"""What crosses the DALI boundary, by name: the pipelines' outputs in order, and the per-sample geometry.

Why one description: DALI returns a pipeline's outputs as a tuple and its PyTorch iterator names them
from a separate list, so the two must agree position by position; a swapped pair would fail silently.
The pipelines return ``ordered(OUTPUTS, images=..., ...)`` and the iterators name with the same tuple.
No DALI import here: the trainer, evaluation and the pictures read ``Geometry`` without building a
pipeline.
"""
from __future__ import annotations

from typing import NamedTuple

# The training pipelines (``pipelines.coco.instance_segmentation_pipeline``), per sample: image
# [S, S, 3] uint8, masks [Nmax, S, S/8] uint8 bit-packed, boxes [Nmax, 4] float32 xyxy, dataset category
# ids [Nmax] int32 (padding -1), pasted flags [Nmax] uint8, count [1], image id [1], geometry [6].
OUTPUTS = ("images", "masks", "boxes", "cat_ids", "pasted", "counts", "image_ids", "geometry")

# The evaluation pipeline: image [H, W, 3] padded to the batch, image id, geometry [4], original (h, w).
EVAL_OUTPUTS = ("images", "image_ids", "geometry", "orig_size")


def ordered(names: tuple, **outputs) -> tuple:
    """The pipeline's return tuple in the order ``names`` gives; every name exactly once."""
    if set(outputs) != set(names):
        raise ValueError(f"pipeline outputs {sorted(outputs)} differ from {list(names)}")
    return tuple(outputs[n] for n in names)


class Geometry(NamedTuple):
    """Where a sample's pixels sit on its canvas: the stored image was resized by ``scale`` (its long
    side's factor; the short side's is round(short * scale) / short, as mmdetection's), fills the top-left
    ``valid_h`` x ``valid_w`` (the rest is padding) and was mirrored if ``flipped``; training crops start
    at (``crop_y``, ``crop_x``) of the resized image (before the flip). The pipelines emit it as a float
    vector in this order (evaluation: the first four; it never crops or flips)."""
    scale: float
    valid_h: int
    valid_w: int
    flipped: bool
    crop_y: int = 0
    crop_x: int = 0

    @classmethod
    def from_row(cls, row) -> Geometry:
        """From the pipeline's 4- or 6-vector (a tensor, array or sequence)."""
        s, h, w, f, *crop = (float(v) for v in (row.tolist() if hasattr(row, "tolist") else row))
        return cls(s, int(h), int(w), bool(f), *(int(c) for c in crop))
