"""Reference numbers from LVIS's own evaluation code for small hand-built cases: what
``trainer.lvis_eval`` (faster-coco-eval's ``lvis_style``) must reproduce (tests/test_lvis.py).

Why a side script: the ``lvis`` package (0.5.3, the code behind LVIS's published numbers) does not run on
NumPy >= 1.24 (``np.float``) and pulls in OpenCV and matplotlib, so it stays out of the project. Run it
in a separate virtual environment; it writes the cases (ground truth, results) and LVIS's numbers for
them into one small JSON file that the test reads:

    python -m venv /work/venvs/lvis && /work/venvs/lvis/bin/pip install "numpy<2" lvis==0.5.3 pycocotools
    /work/venvs/lvis/bin/python scripts/lvis_reference.py --out tests/data/lvis_reference.json

Cases: ``federated`` (each rule once: a detection of a category neither annotated nor negative in the
image is ignored, a negative category's detection is a false positive, an unmatched detection of a
not-exhaustive category is ignored; the expected per-category APs are also written out by hand in the
test), ``top300`` (LVIS keeps the 300 best detections per image across categories, so a correct
detection ranked 301st is lost), and ``random`` (polygons of all sizes, all three frequency groups,
jittered and false detections; all 13 numbers of bbox and segm), and ``polygons`` (the same with polygon
segmentations in the results, scored as LVISResults reads them: rasterised at the image's size, the area of
the entry's box; with false thin slivers whose box and mask areas differ in size range).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

np.float = float  # lvis 0.5.3 uses the alias NumPy removed in 1.24; the only change to its behaviour

from lvis import LVIS, LVISEval, LVISResults  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402


def box_poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def gt_ann(aid, img, cat, x, y, w, h):
    return dict(id=aid, image_id=img, category_id=cat, bbox=[x, y, w, h], area=float(w * h),
                segmentation=box_poly(x, y, w, h))


def rle_of(poly, h, w):
    r = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
    r["counts"] = r["counts"].decode("ascii")
    return r


def det(img, cat, score, x, y, w, h, size=(100, 100)):
    return dict(image_id=img, category_id=cat, score=score, bbox=[x, y, w, h],
                segmentation=rle_of(box_poly(x, y, w, h), *size))


def image(i, w=100, h=100, neg=(), nel=()):
    return dict(id=i, width=w, height=h, neg_category_ids=list(neg), not_exhaustive_category_ids=list(nel),
                coco_url=f"http://images.cocodataset.org/val2017/{i:012d}.jpg")


def cats(freqs):
    return [dict(id=k + 1, name=f"cat{k + 1}", frequency=f) for k, f in enumerate(freqs)]


def federated_case():
    """Categories 1 (f), 2 (c), 3 (r), 4 (f). Image 1: cat 1 at A, cat 2 at B; cat 3 negative; cat 2 not
    exhaustive. Image 2: cat 1 at C, cat 3 at D; cat 2 negative."""
    A, B, C, D = (5, 5, 30, 30), (50, 50, 40, 40), (10, 60, 25, 25), (60, 10, 30, 20)
    gt = dict(images=[image(1, neg=[3], nel=[2]), image(2, neg=[2])], categories=cats("fcrf"),
              annotations=[gt_ann(1, 1, 1, *A), gt_ann(2, 1, 2, *B), gt_ann(3, 2, 1, *C), gt_ann(4, 2, 3, *D)])
    results = [
        det(1, 1, 0.9, *A),                 # cat 1: true positive
        det(1, 1, 0.8, 60, 5, 20, 20),      # cat 1: false positive (cat 1 is exhaustive in image 1)
        det(2, 1, 0.3, *C),                 # cat 1: true positive, ranked after the false one
        det(1, 2, 0.95, 5, 60, 20, 20),     # cat 2: unmatched in image 1, where cat 2 is not exhaustive: ignored
        det(1, 2, 0.7, *B),                 # cat 2: true positive
        det(2, 2, 0.8, 40, 40, 20, 20),     # cat 2: negative in image 2: false positive
        det(1, 3, 0.6, 40, 5, 10, 10),      # cat 3: negative in image 1: false positive
        det(2, 3, 0.5, *D),                 # cat 3: true positive
        det(1, 4, 0.99, 20, 20, 30, 30),    # cat 4: neither annotated nor negative in image 1: ignored
    ]
    return gt, results


def top300_case():
    """One image, cat 1 at A and cat 2 at B; 300 false cat-2 detections score above the one correct cat-1
    detection, which LVIS's per-image limit removes (cat 1 AP 0; without the limit it would be 1)."""
    A, B = (5, 5, 30, 30), (60, 60, 30, 30)
    gt = dict(images=[image(1)], categories=cats("fc"), annotations=[gt_ann(1, 1, 1, *A), gt_ann(2, 1, 2, *B)])
    results = [det(1, 2, round(0.99 - i * 0.001, 4), 40 + (i % 10) * 2, 5 + (i // 10) % 10, 8, 8) for i in range(300)]
    results += [det(1, 2, 0.995, *B), det(1, 1, 0.2, *A)]
    return gt, results


def random_case(seed=0, polygons=False):
    """Polygons of every size in 8 images of 320x240, six categories (r r c c f f), neg and not-exhaustive
    lists drawn at random, detections jittered from the ground truth or placed at random. ``polygons``: the
    detections' segmentations are the polygons themselves (with their boxes), and thin diagonal slivers are
    added as false detections (box area large, mask area small: the area rule shows in APs / APl)."""
    rng = np.random.default_rng(seed)
    W, H = 320, 240
    categories = cats("rrccff")
    images, anns, results = [], [], []
    for i in range(1, 9):
        present = set()
        for _ in range(int(rng.integers(1, 7))):
            c = int(rng.integers(1, 7))
            s = float(rng.choice([12, 25, 60, 180]) * rng.uniform(0.7, 1.3))
            cx, cy = rng.uniform(s / 2, W - s / 2), rng.uniform(s / 2, H - s / 2)
            k = int(rng.integers(5, 12))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = s / 2 * rng.uniform(0.6, 1.0, k)
            xy = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).clip(0, [W - 1, H - 1])
            poly = [np.round(xy, 2).reshape(-1).tolist()]
            rle = mask_utils.merge(mask_utils.frPyObjects(poly, H, W))
            bx = mask_utils.toBbox(rle).tolist()
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=c, segmentation=poly,
                             area=float(mask_utils.area(rle)), bbox=[round(v, 2) for v in bx]))
            present.add(c)
            if rng.random() < 0.8:  # a detection near it
                j = xy + rng.normal(0, s * 0.06, xy.shape)
                j = j.clip(0, [W - 1, H - 1])
                jp = [np.round(j, 2).reshape(-1).tolist()]
                r = rle_of(jp, H, W)
                results.append(dict(image_id=i, category_id=c if rng.random() < 0.85 else int(rng.integers(1, 7)),
                                    score=round(float(rng.uniform(0.05, 1)), 4),
                                    bbox=[round(v, 2) for v in mask_utils.toBbox(r).tolist()],
                                    segmentation=jp if polygons else r))
        absent = [c for c in range(1, 7) if c not in present]
        neg = [c for c in absent if rng.random() < 0.5]
        nel = [c for c in sorted(present) if rng.random() < 0.3]
        images.append(dict(image(i, W, H, neg, nel)))
        for _ in range(int(rng.integers(0, 6))):  # false detections of any category, anywhere
            w, h = rng.uniform(8, 90, 2)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            results.append(det(i, int(rng.integers(1, 7)), round(float(rng.uniform(0.05, 1)), 4),
                               round(x, 2), round(y, 2), round(w, 2), round(h, 2), (H, W)))
            if polygons:
                results[-1]["segmentation"] = box_poly(*results[-1]["bbox"])
    if polygons:
        slivers = np.random.default_rng(seed + 1)
        for i in range(1, 9):
            for _ in range(3):
                w, h = slivers.uniform(100, 200), slivers.uniform(100, 200)
                x, y = slivers.uniform(0, W - w), slivers.uniform(0, H - h)
                poly = [round(float(v), 2) for v in (x, y, x + 3, y, x + w, y + h, x + w - 3, y + h)]
                results.append(dict(image_id=i, category_id=int(slivers.integers(1, 7)),
                                    score=round(float(slivers.uniform(0.05, 1)), 4),
                                    bbox=[round(float(v), 2) for v in (x, y, w, h)], segmentation=[poly]))
    return dict(images=images, categories=categories, annotations=anns), results


def lvis_numbers(gt: dict, results: list) -> dict:
    """LVISEval's 13 numbers for bbox and segm, results handled as detectron2's LVIS evaluator hands them
    over (segm without the box, so areas are mask areas) - except polygon results, which LVISResults only
    reads with their box (whose area it then uses): those are handed over as a results file holds them."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gt.json"
        path.write_text(json.dumps(gt))
        for t in ("bbox", "segm"):
            res = [dict(r) for r in results]
            if t == "segm" and not any(isinstance(r["segmentation"], list) for r in res):
                for r in res:
                    r.pop("bbox")
            lvis_gt = LVIS(str(path))
            ev = LVISEval(lvis_gt, LVISResults(lvis_gt, res, max_dets=300), t)
            ev.run()
            out[t] = {k: float(v) for k, v in ev.get_results().items()}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tests/data/lvis_reference.json")
    a = p.parse_args()
    cases = []
    for name, (gt, results) in (("federated", federated_case()), ("top300", top300_case()),
                                ("random", random_case()), ("polygons", random_case(polygons=True))):
        cases.append(dict(name=name, gt=gt, results=results, lvis=lvis_numbers(gt, [dict(r) for r in results])))
    import lvis
    Path(a.out).write_text(json.dumps(dict(generator="scripts/lvis_reference.py", lvis_version=lvis.__version__
                                           if hasattr(lvis, "__version__") else "0.5.3", cases=cases)))
    for c in cases:
        print(c["name"], {t: {k: round(v, 4) for k, v in m.items()} for t, m in c["lvis"].items()})


if __name__ == "__main__":
    main()
