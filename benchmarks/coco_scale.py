"""What the input side costs at COCO 2017's scale: the dataset check (cold, time and peak memory), the
warm start of training to its first iteration (1 process and 2 under torchrun: one check per job),
evaluation of 5,000 images x 100 detections, and the order statistics of the training stream.

The dataset is written cheaply: COCO-2017's image count (118,287 train, 5,000 val), its objects per
image, object sizes, polygon vertex counts, ~1% crowd regions stored as RLE and its 80 category ids,
but every image file is a hard link to one of a few JPEGs made with PIL at COCO's common sizes. So the
JSON is COCO-sized (~480 MB) and the files are real JPEGs, while the disk holds a few hundred KB of
pixels. ``--scale 0.1`` writes a tenth for a quick run.

    python benchmarks/coco_scale.py [--scale 0.1] [--root /tmp/coco_scale] [--json out.json] [--md out.md]
    python benchmarks/coco_scale.py --only write --scale 1     # just the dataset

Each measurement runs in its own process (``ru_maxrss`` of that process is its peak memory) with a
fresh private cache where it says "cold". Times are wall-clock on whatever else the machine runs: the
report records the load average before each step so contention can be read off.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

# COCO 2017 (instances_train2017.json / instances_val2017.json)
COCO_TRAIN_IMAGES, COCO_VAL_IMAGES = 118_287, 5_000
COCO_CAT_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
                33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
                60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]
# (width, height, share of the images): COCO's most common sizes, the rest folded into the nearest
COCO_SIZES = [(640, 480, 0.42), (640, 427, 0.20), (480, 640, 0.14), (427, 640, 0.08), (640, 426, 0.06),
              (500, 375, 0.05), (612, 612, 0.05)]
MEAN_OBJECTS = 7.36        # 870,913 annotations / 118,287 images (crowd included)
EMPTY_SHARE = 0.0086       # 1,021 train images have no annotation
CROWD_SHARE = 0.01         # iscrowd=1, stored as uncompressed RLE
MULTI_PART_SHARE = 0.1     # objects split into 2-3 polygons (occlusion)
# object size: sqrt(area) lognormal fitted to COCO's 41% small (< 32²) / 34% medium / 24% large (> 96²)
SIZE_MU, SIZE_SIGMA = 3.745, 1.215


def _jpeg(path: Path, w: int, h: int, seed: int) -> None:
    """A photo-like JPEG (smooth shading plus fine texture; ~100-200 KB at 640x480 quality 90)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    low = rng.normal(0, 1, (h // 32 + 2, w // 32 + 2, 3))
    img = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 200 + 20).astype(np.uint8)).resize(
        (w, h), Image.BICUBIC), np.float32)
    img += rng.normal(0, 14, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def _objects_per_image(rng, n: int) -> np.ndarray:
    """1 + negative binomial (COCO's long tail: many images with few objects, some with dozens, max
    93), ~0.9% empty."""
    k = 1 + rng.negative_binomial(1.3, 1.3 / (1.3 + MEAN_OBJECTS - 1 + EMPTY_SHARE), n)
    k = np.minimum(k, 93)
    k[rng.random(n) < EMPTY_SHARE] = 0
    return k


def _polygon(rng, cx, cy, r, n, w, h) -> list:
    """A star-shaped polygon of n vertices around (cx, cy), clipped to the image, 2 decimals as COCO."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.55, 1.0, n)
    xy = np.stack([np.clip(cx + rad * np.cos(ang), 0, w), np.clip(cy + rad * np.sin(ang), 0, h)], 1)
    return np.round(xy, 2).reshape(-1).tolist()


def _shoelace(p) -> float:
    x, y = np.asarray(p[0::2]), np.asarray(p[1::2])
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _crowd_rle(rng, w, h) -> tuple[dict, list, float]:
    """An uncompressed column-major RLE of a large rectangle (COCO's crowd regions are large)."""
    bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    counts = [x0 * h + y0]
    for _ in range(bw - 1):
        counts += [bh, h - bh]
    counts += [bh, (w - x0 - bw) * h + (h - y0 - bh)]
    return dict(size=[h, w], counts=counts), [float(x0), float(y0), float(bw), float(bh)], float(bw * bh)


def _annotations(rng, image_id: int, w: int, h: int, k: int, next_id: int, cat_p: np.ndarray) -> list:
    out = []
    sizes = np.exp(rng.normal(SIZE_MU, SIZE_SIGMA, k))
    cats = rng.choice(len(COCO_CAT_IDS), k, p=cat_p)
    for j in range(k):
        a = dict(id=next_id + j, image_id=image_id, category_id=COCO_CAT_IDS[cats[j]], iscrowd=0)
        if rng.random() < CROWD_SHARE:
            seg, box, area = _crowd_rle(rng, w, h)
            out.append(dict(a, iscrowd=1, segmentation=seg, bbox=box, area=area))
            continue
        r = float(np.clip(sizes[j] / 1.45, 1.5, min(w, h) / 2))
        n = int(np.clip(rng.lognormal(np.log(11 + r / 5), 0.45), 3, 300))  # bigger objects, more vertices
        parts = 1 if rng.random() >= MULTI_PART_SHARE else int(rng.integers(2, 4))
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        seg = [_polygon(rng, cx + (p and rng.uniform(-r, r)), cy + (p and rng.uniform(-r, r)), r / (1 + p),
                        max(n // (1 + p), 3), w, h) for p in range(parts)]
        xs = [v for p in seg for v in p[0::2]]
        ys = [v for p in seg for v in p[1::2]]
        x0, y0 = min(xs), min(ys)
        out.append(dict(a, segmentation=seg, bbox=[x0, y0, round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
                        area=round(sum(_shoelace(p) for p in seg), 2)))
    return out


def _write_json(path: Path, images: list, annotations: list, categories: list) -> None:
    """In chunks: the C encoder's speed without a 500 MB string in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write('{"info": {"description": "COCO-2017-sized benchmark data (benchmarks/coco_scale.py)"}, ')
        f.write('"categories": ' + json.dumps(categories) + ', "images": ' + json.dumps(images) + ', "annotations": [')
        for i in range(0, len(annotations), 20000):
            f.write((", " if i else "") + json.dumps(annotations[i:i + 20000])[1:-1])
        f.write("]}")


def write_dataset(root: Path, scale: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """COCO's layout under ``root``; returns what was written (counts, JSON sizes, seconds)."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    pix = root / "pixels"
    pix.mkdir(parents=True, exist_ok=True)
    files = []
    for k, (w, h, _) in enumerate(COCO_SIZES):
        f = pix / f"{w}x{h}.jpg"
        if not f.is_file():
            _jpeg(f, w, h, seed + k)
        files.append(f)
    share = np.array([s for *_, s in COCO_SIZES])
    cat_p = 1.0 / np.arange(1, 81) ** 0.9
    cat_p[0] = 0.0
    cat_p = cat_p / cat_p.sum() * 0.7
    cat_p[0] = 0.3  # person: ~30% of COCO's objects
    categories = [dict(id=c, name=f"cat{c}", supercategory="thing") for c in COCO_CAT_IDS]
    out = {}
    for split, n_full in (("train2017", COCO_TRAIN_IMAGES), ("val2017", COCO_VAL_IMAGES)):
        n = max(int(round(n_full * scale)), 1)
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        sizes = rng.choice(len(COCO_SIZES), n, p=share / share.sum())
        counts = _objects_per_image(rng, n)
        images, anns = [], []
        first_id = 1 if split == "train2017" else 10_000_000
        for i in tqdm(range(n), desc=f"writing {split}", unit="img", disable=not progress, leave=False):
            iid = first_id + i
            w, h, _ = COCO_SIZES[sizes[i]]
            name = f"{iid:012d}.jpg"
            target = d / name
            if not target.exists():
                os.link(files[sizes[i]], target)
            images.append(dict(id=iid, file_name=name, width=w, height=h, license=1,
                               coco_url=f"http://images.cocodataset.org/{split}/{name}", date_captured=""))
            anns += _annotations(rng, iid, w, h, int(counts[i]), first_id * 10 + len(anns), cat_p)
        ann_file = root / "annotations" / f"instances_{split}.json"
        _write_json(ann_file, images, anns, categories)
        out[split] = dict(images=n, annotations=len(anns), crowd=sum(a["iscrowd"] for a in anns),
                          json_mb=round(ann_file.stat().st_size / 1e6, 1))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
