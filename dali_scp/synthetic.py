"""Synthetic COCO-format instance-segmentation dataset: the embedded default of every CLI.

Why synthetic and why COCO-like: tests, CI and first-time users have no COCO and no network, yet
benchmarks on this data must mean something. So images are JPEGs of COCO's byte size (~100-180 KB at
640 px) with smooth natural-looking backgrounds, 0-30 instances of tiny to large size (COCO's share of
small / medium / large), polygons of 10-60 vertices, multi-part objects, crowd regions stored as RLE and
non-contiguous category ids.

Why shape families: a category is what an object looks like - disc, triangle, square, star, ring (two
half-annuli: the multi-part objects), bar, cross, crescent - at a random size and rotation, so a detector
can learn it and a short training run ends with an AP that means something. Colour says nothing about
the category.

Why flat saturated colours: every object gets a colour unique in its image (stored as the
non-standard annotation field ``"colour"``) and far from the low-saturation background, so a test can
recover the object's pixels from an *augmented* image and check the pipeline's masks against them:
independent ground truth for the geometry. Objects never overlap, so their visible pixels are exactly
their polygons.

    python -m dali_scp.synthetic --out DIR [--train N] [--val M] [--seed S] [--lvis]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dali_scp.files import atomic_write, cache_dir
from dali_scp.raster import polygon_area

log = logging.getLogger(__name__)

# Shape families, learnable from appearance alone (colour says nothing: it is drawn independently of the
# category). Ids non-contiguous on purpose, like COCO's 1..90 with gaps.
CATEGORIES = [
    (1, "disc"), (3, "triangle"), (7, "square"), (8, "star"), (13, "ring"), (18, "bar"), (22, "cross"),
    (27, "crescent"),
]
ASPECTS = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 360), (640, 640), (612, 612),
           (640, 512), (500, 640), (640, 424)]
# object radius ranges in px (the circle each shape is drawn in): tiny, small, medium, large. The
# probabilities give COCO's share of small / medium / large objects by area (41 / 34 / 24 %: small is
# < 32^2 px, large > 96^2) once placement has dropped the objects that did not fit.
SIZE_CLASSES = [((3, 8), 0.08), ((8, 24), 0.18), ((24, 72), 0.34), ((72, 200), 0.40)]
MAX_OBJECTS = 30
RING_MIN_RADIUS = 8.0  # smaller rings would have no visible hole or gap


def palette() -> np.ndarray:
    """Saturated colours on a 4-level grid, pairwise L-inf distance >= 85, each with a channel at 0 or
    255 (>= 60 from any background pixel), black excluded (it is the padding colour)."""
    levels = (0, 85, 170, 255)
    cols = [(r, g, b) for r in levels for g in levels for b in levels
            if {0, 255} & {r, g, b} and (r, g, b) != (0, 0, 0)]
    return np.array(cols, dtype=np.uint8)


PALETTE = palette()


def smooth_background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Low-saturation smooth texture plus fine grain (the grain gives COCO-like JPEG sizes)."""
    base = np.array(rng.uniform(85, 170, size=3))
    coarse = rng.normal(0, 1, size=(rng.integers(3, 7), rng.integers(3, 7)))
    img = np.asarray(Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255)
                                     .astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = sum(np.sin(xx * rng.uniform(0.005, 0.05) + yy * rng.uniform(0.005, 0.05) + rng.uniform(0, 6))
                for _ in range(3))
    lum = (img / 255.0 - 0.5) * 50 + waves * 6
    tint = rng.uniform(-12, 12, size=3)
    out = base[None, None, :] + tint[None, None, :] * (img[..., None] / 255.0) + lum[..., None]
    out += rng.normal(0, 9, size=(h, w, 3))
    return np.clip(out, 60, 195).astype(np.uint8)


def star_polygon(rng: np.random.Generator, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """A star-shaped (hence simple) polygon with smoothly varying radius: blob-like, COCO-ish."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False) * 0.7 + ang * 0.3
    ang = np.sort(ang)
    harm = sum(rng.uniform(-0.25, 0.25) * np.cos(k * ang + rng.uniform(0, 6)) for k in (2, 3, 5))
    rad = r * (1.0 + harm) * rng.uniform(0.85, 1.0, size=n)
    rad = np.maximum(rad, r * 0.35)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def _outline(corners: np.ndarray, n: int) -> np.ndarray:
    """A closed polygon through ``corners`` with ``max(n, len(corners))`` vertices: the corners plus points
    spread along the edges in proportion to their length (straight edges stay straight, corners stay
    sharp; COCO's polygons have many vertices too)."""
    k = len(corners)
    nxt = np.roll(corners, -1, 0)
    share = np.linalg.norm(nxt - corners, axis=1)
    share = share / share.sum() * max(n - k, 0)
    alloc = np.floor(share).astype(int)
    alloc[np.argsort(alloc - share)[: max(n - k, 0) - alloc.sum()]] += 1
    return np.concatenate([corners[i] + (np.arange(alloc[i] + 1)[:, None] / (alloc[i] + 1)) * (nxt[i] - corners[i])
                           for i in range(k)])


def _arc(radius: float, a0: float, a1: float, m: int, centre=(0.0, 0.0)) -> np.ndarray:
    a = np.linspace(a0, a1, m)
    return np.stack([centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a)], 1)


def shape_parts(rng: np.random.Generator, name: str, cx: float, cy: float, r: float, n: int) -> list:
    """The polygon part(s) of one object of shape family ``name`` inside the circle (cx, cy, r), randomly
    rotated; every part has 10..60 vertices (``n`` asks for that many, at least 36 for the round shapes;
    rings split them between their two halves). Rings are the multi-part objects: two half-annuli with a visible gap (>= 4 px) and a hole."""
    n = int(np.clip(n, 10, 60))
    if name in ("disc", "ring", "crescent"):
        n = max(n, 36)  # round shapes stay round
    if name == "disc":  # circle or mild ellipse
        parts = [_arc(1.0, 0, 2 * np.pi, n + 1)[:-1] * [1.0, 1.0 / rng.uniform(1.0, 1.3)]]
    elif name == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.15, 0.15, 3)
        parts = [_outline(np.stack([np.cos(a), np.sin(a)], 1), n)]
    elif name == "square":  # aspect 1..1.25
        t = np.arctan(rng.uniform(1.0, 1.25))
        a, b = np.cos(t), np.sin(t)
        parts = [_outline(np.array([[a, b], [-a, b], [-a, -b], [a, -b]]), n)]
    elif name == "star":  # five points
        k = np.arange(10)
        rad = np.where(k % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        a = np.pi / 2 + k * np.pi / 5
        parts = [_outline(np.stack([rad * np.cos(a), rad * np.sin(a)], 1), n)]
    elif name == "ring":  # two half-annuli with a gap >= 4 px
        hg = max(2.0, 0.06 * r) / r  # half the gap; the outer radius shrinks so the ring stays within r
        outer, inner = 1.0 - hg, (1.0 - hg) * rng.uniform(0.5, 0.65)
        m = n // 2
        mo = m // 2 + m % 2
        top = np.concatenate([_arc(outer, 0, np.pi, mo), _arc(inner, np.pi, 0, m - mo)]) + [0.0, hg]
        parts = [top, top * [1.0, -1.0]]
    elif name == "bar":  # elongated, aspect 3.5..6, at least 1.5 px wide
        length = 0.98
        width = max(length / rng.uniform(3.5, 6.0), 1.5 / r)
        parts = [_outline(np.array([[length, width], [-length, width], [-length, -width], [length, -width]]), n)]
    elif name == "cross":  # plus sign
        t = rng.uniform(0.25, 0.35)
        L = np.sqrt(1 - t * t)
        q = np.array([[L, t], [t, t], [t, L]])
        corners = np.concatenate([q @ np.array([[np.cos(k * np.pi / 2), np.sin(k * np.pi / 2)],
                                                [-np.sin(k * np.pi / 2), np.cos(k * np.pi / 2)]]) for k in range(4)])
        parts = [_outline(corners, n)]
    elif name == "crescent":  # a disc minus an offset disc
        r2, d = rng.uniform(0.75, 0.85), rng.uniform(0.45, 0.55)
        x = (d * d + 1 - r2 * r2) / (2 * d)
        y = np.sqrt(1 - x * x)
        t0, p0 = np.arctan2(y, x), np.arctan2(y, x - d)
        mo = (n * 3) // 5
        parts = [np.concatenate([_arc(1.0, t0, 2 * np.pi - t0, mo),
                                 _arc(r2, 2 * np.pi - p0, p0, n - mo + 2, centre=(d, 0.0))[1:-1]])]
    else:
        raise ValueError(f"unknown shape {name!r}")
    rot = rng.uniform(0, 2 * np.pi)
    R = np.array([[np.cos(rot), np.sin(rot)], [-np.sin(rot), np.cos(rot)]])
    return [(p @ R) * r + [cx, cy] for p in parts]


def _overlaps(box, boxes, margin=4.0) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in boxes)


def _poly_box(parts):
    allp = np.concatenate(parts)
    return [allp[:, 0].min(), allp[:, 1].min(), allp[:, 0].max(), allp[:, 1].max()]


def make_image(rng: np.random.Generator, img_id: int, categories=CATEGORIES, cat_weights=None, crowd_prob: float = 0.15,
               aspects=ASPECTS, size_classes=SIZE_CLASSES, max_objects: int = MAX_OBJECTS, empty_prob: float = 0.05):
    """Returns (PIL image, list of annotation dicts without ids). ``categories`` ((id, shape) pairs) are
    drawn uniformly, or with probabilities ``cat_weights`` (the LVIS-like set's long tail); the other
    keywords shape the images (``DEMO`` gives the demo's)."""
    w, h = aspects[rng.integers(len(aspects))]
    img = Image.fromarray(smooth_background(rng, w, h))
    draw = ImageDraw.Draw(img)
    n_target = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    colours = rng.permutation(len(PALETTE))
    placed, anns = [], []
    probs = np.array([p for _, p in size_classes])
    radii = []
    for obj in range(n_target):
        (rlo, rhi) = size_classes[rng.choice(len(size_classes), p=probs / probs.sum())][0]
        radii.append(float(rng.uniform(rlo, max(rlo, min(rhi, min(w, h) * 0.3)))))
    for r in sorted(radii, reverse=True):  # large first: they are the hardest to place
        k = rng.integers(len(categories)) if cat_weights is None else rng.choice(len(categories), p=cat_weights)
        cat, shape = categories[k]
        if shape == "ring":
            r = max(r, RING_MIN_RADIUS)
        for _attempt in range(25):
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            parts = shape_parts(rng, shape, cx, cy, r, int(rng.integers(10, 61)))
            parts = [np.clip(p, 0, [w - 0.01, h - 0.01]) for p in parts]
            box = _poly_box(parts)
            if not _overlaps(box, placed):
                break
        else:
            continue
        placed.append(box)
        colour = PALETTE[colours[len(anns)]]
        shade = rng.uniform(-4, 4)
        fill = tuple(int(np.clip(c + shade, 0, 255)) for c in colour)
        for p in parts:
            draw.polygon([tuple(v) for v in p], fill=fill)
        segm = [np.round(p, 2).reshape(-1).tolist() for p in parts]
        area = float(sum(polygon_area(p) for p in parts))
        anns.append(dict(image_id=img_id, category_id=int(cat), segmentation=segm, area=area,
                         bbox=[round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                               round(box[3] - box[1], 2)], iscrowd=0, colour=[int(c) for c in colour]))
    if rng.random() < crowd_prob:  # a crowd region as RLE, like COCO's crowd annotations
        anns.extend(_crowd(rng, img, draw, placed, img_id))
    return img, anns


def _crowd(rng, img, draw, placed, img_id):
    from pycocotools import mask as mask_utils
    w, h = img.size
    cw, ch = rng.uniform(40, 120), rng.uniform(30, 80)
    for _ in range(25):
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        box = [x0, y0, x0 + cw, y0 + ch]
        if not _overlaps(box, placed):
            break
    else:
        return []
    placed.append(box)
    m = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(m)
    for _ in range(int(rng.integers(4, 9))):
        bx, by = rng.uniform(x0 + 6, x0 + cw - 6), rng.uniform(y0 + 6, y0 + ch - 6)
        rr = rng.uniform(5, 12)
        md.ellipse([bx - rr, by - rr, bx + rr, by + rr], fill=1)
    mask = np.asarray(m, np.uint8)
    draw.bitmap((0, 0), Image.fromarray(mask * 255), fill=(110, 110, 110))
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    bb = mask_utils.toBbox(rle).tolist()
    cat = CATEGORIES[0][0]
    return [dict(image_id=img_id, category_id=cat, segmentation=rle, area=float(mask.sum()), bbox=bb,
                 iscrowd=1)]


def draw_images(root: Path, split: str, n: int, seed: int, first_id: int, folder=None, quality: int = 94,
                **image_kw) -> tuple[list, list]:
    """Draw and save ``n`` images (``make_image``) into ``root / folder(image id)`` (default: ``split``);
    returns their (image entries, annotations) with ids, before any dataset-specific fields."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in tqdm(range(n), desc=f"synthetic {split}", unit="img", leave=False):
        img_id = first_id + i
        img, anns = make_image(rng, img_id, **image_kw)
        name = f"{img_id:012d}.jpg"
        img_dir = root / (folder(img_id) if folder else split)
        img_dir.mkdir(parents=True, exist_ok=True)
        img.save(img_dir / name, quality=quality)
        images.append(dict(id=img_id, file_name=name, width=img.size[0], height=img.size[1]))
        for a in anns:
            a["id"] = len(annotations) + 1 + first_id * 100
            annotations.append(a)
    return images, annotations


# The demo's images (``--demo``; the default of trainer.run, trainer.evaluate and trainer.showcase):
# what the README's first command can learn to a plateau on two CPU cores in minutes. Half-size images,
# one to five medium-to-large objects, four shape families, no crowd regions; everything else (the
# backgrounds, flat colours, polygons, non-contiguous ids) as in the COCO-like set, which the profiler,
# the visualiser and the benchmarks keep (its small objects and crowded images are what makes their
# figures mean something, and what a 600-iteration CPU run cannot learn).
DEMO_CATEGORIES = [c for c in CATEGORIES if c[1] in ("disc", "triangle", "square", "star")]
DEMO = dict(categories=DEMO_CATEGORIES, aspects=[(w // 2, h // 2) for w, h in ASPECTS], size_classes=[((22, 60), 1.0)],
            max_objects=5, empty_prob=0.0, crowd_prob=0.0)
DEMO_DEFAULT = (128, 48)  # train, val: a val split large enough that the AP of a seed is not one image's luck


def write_split(root: Path, split: str, n: int, seed: int, first_id: int, quality: int = 94,
                demo: bool = False) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = draw_images(root, split, n, seed, first_id, quality=quality, **(DEMO if demo else {}))
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(info=dict(description=f"dali-scp synthetic {'demo' if demo else 'COCO-like'} dataset", seed=seed),
               licenses=[], images=images, annotations=annotations,
               categories=[dict(id=c, name=nm, supercategory="synthetic")
                           for c, nm in (DEMO_CATEGORIES if demo else CATEGORIES)])
    atomic_write(ann_dir / f"instances_{split}.json", json.dumps(doc))


def generate(out: str | os.PathLike, train: int = 64, val: int = 16, seed: int = 0, demo: bool = False) -> Path:
    root = Path(out)
    write_split(root, "train2017", train, seed, first_id=1, demo=demo)
    write_split(root, "val2017", val, seed + 1, first_id=1_000_000, demo=demo)
    (root / "SYNTHETIC").write_text(json.dumps(dict(train=train, val=val, seed=seed, demo=demo)))
    return root


def default_root(train: int | None = None, val: int | None = None, seed: int = 0, lvis: bool = False,
                 demo: bool = False) -> Path:
    """The embedded default dataset (COCO-like; the demo's with ``demo``; LVIS-like with ``lvis``:
    ``dali_scp.synthetic_lvis``), generated once into a cache folder (no downloads, ever)."""
    from dali_scp import synthetic_lvis
    sizes = LVIS_DEFAULT if lvis else DEMO_DEFAULT if demo else (64, 16)
    train, val = train or sizes[0], val or sizes[1]
    kind = "_lvis" if lvis else "_demo" if demo else ""
    root = cache_dir() / f"synthetic{kind}_t{train}_v{val}_s{seed}"
    if not (root / "SYNTHETIC").exists():
        log.info("generating the synthetic %s dataset into %s (once)",
                 "LVIS-like" if lvis else "demo" if demo else "COCO-like", root)
        if lvis:
            synthetic_lvis.generate(root, train, val, seed)
        else:
            generate(root, train, val, seed, demo=demo)
    return root


# The LVIS-like default: enough training images for LVIS's frequent group (>= 100 images)
LVIS_DEFAULT = (120, 24)


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    p = cli.ArgumentParser(prog="python -m dali_scp.synthetic", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (COCO layout: train2017/, val2017/, annotations/)")
    p.add_argument("--train", type=cli.COUNT, default=None,
                   help=f"number of training images (default 64; with --lvis {LVIS_DEFAULT[0]})")
    p.add_argument("--val", type=cli.COUNT, default=None,
                   help=f"number of validation images (default 16; with --lvis {LVIS_DEFAULT[1]})")
    p.add_argument("--seed", type=cli.SEED, default=0, help="random seed (default 0)")
    p.add_argument("--demo", action="store_true",
                   help="the demo's images (trainer.run's default data): half size, 1-5 medium-to-large objects of "
                        "four shape families, no crowd regions")
    p.add_argument("--lvis", action="store_true",
                   help="LVIS v1's format instead: annotations/lvis_v1_{train,val}.json, images named by coco_url "
                        "(some val images in train2017/), long-tailed categories of all three frequency groups, "
                        "negative and not-exhaustive category lists (read it with --dataset lvis)")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    sizes = LVIS_DEFAULT if a.lvis else DEMO_DEFAULT if a.demo else (64, 16)
    a.train = a.train if a.train is not None else sizes[0]
    a.val = a.val if a.val is not None else sizes[1]
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    from dali_scp import synthetic_lvis
    if a.lvis and a.demo:
        p.error("--demo and --lvis are two different sets; choose one")
    root = synthetic_lvis.generate(out, a.train, a.val, a.seed) if a.lvis else generate(out, a.train, a.val, a.seed,
                                                                                          demo=a.demo)
    print(f"wrote {a.train} train + {a.val} val images to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
