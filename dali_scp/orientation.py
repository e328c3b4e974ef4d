"""EXIF orientation: which frame an image's annotations are in, and the exact maps between frames.

Why this design. DALI applies the EXIF Orientation tag by default, PIL and pycocotools never do, and
annotation tools differ. The annotation file decides per image (``annotation_frame``): JSON width/height
equal to the stored size only means stored pixels (COCO's convention); equal only to the oriented size
means the annotator saw the rotated image. Where both readings fit (tags 2-4 always, tags 5-8 on square
images) the size cannot tell, so the dataset does (``dataset_frame``): one export comes from one tool,
which either applied the tag for the annotator or did not, so such an image follows the frame most of
the dataset's unambiguous tagged images were annotated in, and stored pixels when there are none.

Every pipeline decodes *stored* pixels (``adjust_orientation=False``), and the dataset check writes the
annotations of oriented-frame images re-expressed in stored pixels (polygons, box, width/height). So
image and targets agree exactly, the GPU stages need no per-sample rotation, and the training sample
is the annotator's view under one rigid rotation/flip of image and masks together. Evaluation maps
predictions back into the annotation's frame (``to_oriented_*``) before scoring against the original
file. The alternative, rotating pixels per sample inside DALI, costs an extra full-image pass (or a
second decoder) on every image for the benefit of a few.

Frames: stored W x H; tags 5-8 swap the sides. Coordinates are continuous (pixel edges at integers),
so the maps send pixel edges to pixel edges and a rectangle on pixel edges stays one.
"""
from __future__ import annotations

import numpy as np

EXIF_ORIENTATION = 0x0112
TRANSPOSING = (5, 6, 7, 8)
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def read_tag(image) -> int:
    """The EXIF Orientation of an opened PIL image (read before ``load()``: PIL's TIFF plugin applies
    the tag on load and forgets it). Missing or invalid values count as 1, as DALI treats them."""
    try:
        v = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is not the pixels' problem
        return 1
    return v if isinstance(v, int) and 1 <= v <= 8 else 1


def oriented_size(w: int, h: int, tag: int) -> tuple[int, int]:
    return (h, w) if tag in TRANSPOSING else (w, h)


def fits_both(json_w, json_h, stored_w: int, stored_h: int, tag: int) -> bool:
    """The JSON size is the stored and the oriented image's at once (tags 2-4; 5-8 when square), so
    the size says nothing about the frame the annotator saw."""
    return tag != 1 and (json_w, json_h) == (stored_w, stored_h) == oriented_size(stored_w, stored_h, tag)


def annotation_frame(json_w, json_h, stored_w: int, stored_h: int, tag: int,
                     when_both: str = "stored") -> str | None:
    """'stored' (the JSON size fits only the stored pixels), 'oriented' (only the oriented image),
    ``when_both`` where it fits both (``fits_both``; the dataset's frame, ``dataset_frame``), or None
    (fits neither: a size mismatch)."""
    if fits_both(json_w, json_h, stored_w, stored_h, tag):
        return when_both
    size = (json_w, json_h)
    if size == (stored_w, stored_h):
        return "stored"
    if size == oriented_size(stored_w, stored_h, tag):
        return "oriented"
    return None


def dataset_frame(n_stored: int, n_oriented: int) -> str:
    """The frame for a dataset's ambiguous images, from its unambiguous tagged ones (``n_stored``
    annotated on the stored pixels, ``n_oriented`` on the oriented image): 'oriented' only when most
    were; a tie or no evidence keeps COCO's convention."""
    return "oriented" if n_oriented > n_stored else "stored"


def to_oriented_points(xy: np.ndarray, tag: int, w: int, h: int) -> np.ndarray:
    """[..., 2] points in the stored frame (W=w, H=h) -> the EXIF-oriented frame (as
    ``PIL.ImageOps.exif_transpose`` shows the image)."""
    xy = np.asarray(xy, np.float64)
    x, y = xy[..., 0], xy[..., 1]
    out = {1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y),
           5: (y, x), 6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x)}[tag]
    return np.stack(out, -1)


def to_stored_points(xy: np.ndarray, tag: int, w: int, h: int) -> np.ndarray:
    """Inverse of ``to_oriented_points`` (w, h: the *stored* size)."""
    return to_oriented_points(xy, _INVERSE[tag], *oriented_size(w, h, tag))


def _box_through(fn, boxes, tag, w, h):
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    p = fn(np.stack([b[:, :2], b[:, 2:]], 1), tag, w, h)
    return np.concatenate([p.min(1), p.max(1)], 1)


def to_oriented_boxes(boxes_xyxy, tag: int, w: int, h: int) -> np.ndarray:
    return _box_through(to_oriented_points, boxes_xyxy, tag, w, h)


def to_stored_boxes(boxes_xyxy, tag: int, w: int, h: int) -> np.ndarray:
    return _box_through(to_stored_points, boxes_xyxy, tag, w, h)


def to_oriented_array(a: np.ndarray, tag: int) -> np.ndarray:
    """Stored-frame array [..., H, W] -> oriented frame (the same map as the points)."""
    t = np.swapaxes
    return {1: lambda: a, 2: lambda: a[..., ::-1], 3: lambda: a[..., ::-1, ::-1], 4: lambda: a[..., ::-1, :],
            5: lambda: t(a, -1, -2), 6: lambda: t(a, -1, -2)[..., ::-1], 7: lambda: t(a, -1, -2)[..., ::-1, ::-1],
            8: lambda: t(a, -1, -2)[..., ::-1, :]}[tag]()


def to_stored_array(a: np.ndarray, tag: int) -> np.ndarray:
    return to_oriented_array(a, _INVERSE[tag])
