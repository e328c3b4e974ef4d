"""Small COCO datasets with the quirks of real exports, generated with PIL: EXIF orientation tags with
annotations in the stored or in the oriented frame, objects stored as RLE (compressed and uncompressed
counts), annotation id 0, image formats and modes.

Ground truth stays independent of the code under test: objects are painted from pycocotools' own
masks in flat colours (found again by colour after augmentation, as in ``geometry_truth``), and the
oriented frame is whatever ``PIL.ImageOps.exif_transpose`` shows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

T = Image.Transpose
# the inverse of what exif_transpose does for each tag: upright image -> stored pixels
TO_STORED = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
             7: T.TRANSVERSE, 8: T.ROTATE_270}
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255)]
BACKGROUND = (128, 128, 128)


def write_coco(root: Path, split: str, images, annotations, categories=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    doc = dict(images=images, annotations=annotations,
               categories=categories or [dict(id=3, name="thing"), dict(id=9, name="other")])
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return doc


def encode_rle(mask: np.ndarray, compressed: bool) -> dict:
    """COCO RLE of a mask: pycocotools' compressed string, or the uncompressed list of run lengths."""
    if compressed:
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return dict(size=[int(v) for v in r["size"]], counts=r["counts"].decode("ascii"))
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return dict(size=list(mask.shape), counts=[int(v) for v in runs])


def tight_xywh(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _objects(w: int, h: int, k: int):
    """Three objects in a w x h frame, placed asymmetrically (a wrong rotation or mirror moves them off
    their pixels): an L-shaped polygon top left, a triangle bottom right, an ellipse stored as RLE."""
    ell_y, ell_x = np.mgrid[0:h, 0:w] + 0.5
    cx, cy, rx, ry = 0.72 * w, 0.3 * h, 0.14 * w, 0.16 * h
    ellipse = (((ell_x - cx) / rx) ** 2 + ((ell_y - cy) / ry) ** 2 <= 1).astype(np.uint8)
    L = [0.06 * w, 0.08 * h, 0.42 * w, 0.08 * h, 0.42 * w, 0.22 * h, 0.2 * w, 0.22 * h, 0.2 * w, 0.62 * h,
         0.06 * w, 0.62 * h]
    tri = [0.55 * w, 0.92 * h, 0.95 * w, 0.92 * h, 0.9 * w, 0.55 * h]
    # integer vertices: the painted pixels are exactly the polygon's, so resampling is the only blur
    r2 = lambda p: [float(round(v)) for v in p]  # noqa: E731
    return [("poly", [r2(L)]), ("poly", [r2(tri)]), ("rle", encode_rle(ellipse, compressed=k % 2 == 0))]


def _mask(seg, w, h):
    if isinstance(seg, dict):
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else \
            dict(seg, counts=seg["counts"].encode())
        return mask_utils.decode(rle)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))


def save_with_orientation(img: Image.Image, path: Path, tag: int, **kw):
    exif = Image.Exif()
    exif[0x0112] = tag
    img.save(path, exif=exif.tobytes(), **kw)


MIXED_CASES = [(t, "stored", False) for t in range(1, 9)] + [(t, "oriented", False) for t in (5, 6, 7, 8)] \
    + [(6, "stored", True)]
# an export whose tool showed the annotator the rotated image: unambiguous tag-6 images annotated rotated,
# and images whose size fits both frames (square tag 6, tag 3) annotated rotated as well
ROTATED_CASES = [(6, "oriented", False), (6, "oriented", False), (6, "oriented", True), (3, "oriented", False)]


def oriented_dataset(root: Path, split: str = "train2017", fmt: str = "JPEG", cases=MIXED_CASES):
    """One image per (tag, frame, square) case; by default every tag 1-8 annotated on the stored pixels,
    tags 5-8 (the only ones a JSON size can tell apart) also annotated on the oriented image, and a
    square tag-6 image annotated on the stored pixels (both readings fit; the dataset's unambiguous
    images are split evenly, so COCO's convention holds). Sizes differ per image, so a size identifies
    it. Returns the COCO dict; each image entry has ``tag`` and ``frame``, each annotation its
    ``colour``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for k, (tag, frame, square) in enumerate(cases):
        aw, ah = (160, 160) if square else (200 + 8 * k, 136 + 4 * k)  # the annotation frame's size
        canvas = np.empty((ah, aw, 3), np.uint8)
        canvas[:] = BACKGROUND
        canvas = np.clip(canvas + rng.normal(0, 3, canvas.shape), 0, 255).astype(np.uint8)
        for j, (kind, seg) in enumerate(_objects(aw, ah, k)):
            m = _mask(seg, aw, ah).astype(bool)
            canvas[m] = COLOURS[j]
            anns.append(dict(id=len(anns) + 1, image_id=k + 1, category_id=3 if j != 1 else 9, iscrowd=0,
                             segmentation=seg, bbox=tight_xywh(m), area=float(m.sum()), colour=list(COLOURS[j])))
        upright = Image.fromarray(canvas)
        stored = upright if frame == "stored" or tag == 1 else upright.transpose(TO_STORED[tag])
        name = f"{k + 1:03d}_tag{tag}_{frame}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        save_with_orientation(stored, root / split / name, tag, format=fmt,
                              **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
        if frame == "oriented":  # self-check: the file shows the annotated image once oriented
            shown = ImageOps.exif_transpose(Image.open(root / split / name))
            assert shown.size == (aw, ah)
        images.append(dict(id=k + 1, file_name=name, width=aw, height=ah, tag=tag, frame=frame))
    return write_coco(root, split, images, anns)


def mask_in_stored_frame(mask: np.ndarray, tag: int, frame: str) -> np.ndarray:
    """A mask of the annotation's frame as it lies on the stored pixels (PIL's transposes)."""
    if frame == "stored" or tag == 1:
        return mask
    return np.asarray(Image.fromarray(mask).transpose(TO_STORED[tag]))


def perfect_inference(doc: dict, gt):
    """A stand-in for ``trainer.evaluate.inference`` that returns the ground truth of an
    ``oriented_dataset`` as a model looking at the stored pixels would see it: masks moved onto the
    stored pixels with PIL, at the original size DALI reports (which identifies the image). ``gt``:
    a COCO of the dataset's annotation file."""
    import torch
    from dali_scp import orientation
    from geometry_truth import tight_box
    by_stored_size = {}  # (h, w) of the stored pixels -> image
    for im in doc["images"]:
        w, h = im["width"], im["height"]
        if im["frame"] == "oriented" and im["tag"] in orientation.TRANSPOSING:
            w, h = h, w
        by_stored_size[(h, w)] = im
    cat_ids = sorted(c["id"] for c in doc["categories"])

    def perfect(model, images, sizes):
        dets = []
        for h, w in sizes:
            im = by_stored_size[(h, w)]  # an unknown size: the original size is not the stored one
            anns = gt.imgToAnns[im["id"]]
            masks = np.stack([mask_in_stored_frame(gt.annToMask(a), im["tag"], im["frame"]) for a in anns])
            assert masks.shape[1:] == (h, w)
            dets.append(dict(boxes=torch.tensor(np.stack([tight_box(m) for m in masks]), dtype=torch.float32),
                             scores=torch.ones(len(anns)),
                             labels=torch.as_tensor([cat_ids.index(a["category_id"]) + 1 for a in anns]),
                             masks=torch.as_tensor(masks, dtype=torch.float32)[:, None]))
        return dets
    return perfect
