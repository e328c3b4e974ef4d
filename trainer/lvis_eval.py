"""LVIS's federated evaluation: box and mask AP with LVIS's rules, the numbers of the paper's Table 7.

LVIS annotates each category only in some images, so its evaluation (Gupta et al. 2019, the ``lvis``
package's ``LVISEval``) differs from COCOeval in four rules: the 300 best detections of an image are
kept across all categories (not 100 per category); a detection of a category that is neither annotated
in the image nor in its ``neg_category_ids`` is ignored (nobody checked whether it is there); an
unmatched detection of a category in the image's ``not_exhaustive_category_ids`` is ignored (some of its
instances were not annotated); and AP is also reported per frequency group: APr, APc, APf over the
rare (< 10 training images), common (10-99) and frequent (>= 100) categories, from each category's
``frequency``.

Why faster-coco-eval: the ``lvis`` package breaks on NumPy 2 (``np.float``) and is slow; faster-coco-eval's
``lvis_style`` implements the last three rules in C++, and the first is applied here before it
(``limit_per_image``). tests/test_lvis.py holds it to LVIS's own code's numbers on hand-built cases
(``scripts/lvis_reference.py``). Undefined numbers (no category of a group in the ground truth) are
-1, as LVIS reports them.
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict

from dali_scp.lvis import FREQUENCIES

MAX_DETS = 300  # LVIS's per-image limit (LVISResults' max_dets, LVISEval's params.max_dets)
# LVISEval's result keys, in its order
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
              "AR@300", "ARs@300", "ARm@300", "ARl@300"]
# faster-coco-eval's names for them (stats_as_dict with maxDets=[300])
_FCE_NAMES = ["AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf",
              "AR_all", "AR_small", "AR_medium", "AR_large"]


def load_ground_truth(path):
    """faster-coco-eval's COCO for an LVIS annotation file, with errors naming the file and entry.
    Annotation ids are renumbered exactly as for COCO (``trainer.evaluate.load_ground_truth``)."""
    from faster_coco_eval import COCO
    from trainer.evaluate import load_ground_truth as coco_ground_truth
    doc = coco_ground_truth(path).dataset
    for c in doc.get("categories", []):
        if c.get("frequency") not in FREQUENCIES:
            raise ValueError(f"{path}: category {c.get('id')!r} has frequency {c.get('frequency')!r}, not one of "
                             f"{'/'.join(FREQUENCIES)} (is this an LVIS file?)")
    for im in doc["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(im.get(key), list):
                raise ValueError(f"{path}: image {im.get('id')!r} has no list '{key}' (is this an LVIS file?)")
    return COCO(doc)


def limit_per_image(results: list, max_dets: int = MAX_DETS) -> list:
    """The ``max_dets`` highest-scoring detections of each image, over all categories (LVISResults'
    ``limit_dets_per_image``: a stable sort by score, so ties keep the file's order)."""
    per_image = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    out = []
    for rs in per_image.values():
        out += rs if len(rs) <= max_dets else sorted(rs, key=lambda r: r["score"], reverse=True)[:max_dets]
    return out


def score(gt, results: list, iou_types=("bbox", "segm"), max_dets: int = MAX_DETS) -> dict:
    """LVIS's 13 numbers per type: {type: {stat name: value}}. Each type gets its own copy of the results
    (segm without bbox, so mask areas define small/medium/large, as detectron2's LVIS evaluator does; polygon
    results with their box's area, as ``LVISResults`` sets it: ``trainer.evaluate.results_of_type``)."""
    from faster_coco_eval import COCOeval_faster
    results = limit_per_image(results, max_dets)
    metrics = {}
    from trainer.evaluate import load_results, results_of_type
    for t in iou_types:
        res = results_of_type(results, t, gt.imgs)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = load_results(gt, res)
            ev = COCOeval_faster(gt, dt, t, lvis_style=True, print_function=lambda *a, **k: None)
            ev.params.maxDets = [max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = ev.stats_as_dict
        metrics[t] = {n: float(stats[f]) for n, f in zip(STAT_NAMES, _FCE_NAMES)}
    return metrics


def format_table(metrics: dict) -> str:
    head = f"{'':6s}" + "".join(f"{n:>8s}" for n in STAT_NAMES)
    rows = [head] + [f"{t:6s}" + "".join(f"{100 * m[n]:8.1f}" if m[n] >= 0 else f"{'-':>8s}" for n in STAT_NAMES)
                     for t, m in metrics.items()]
    return "\n".join(rows)


def ground_truth_as_results(gt, polygons: bool = False) -> list:
    """Every annotation of ``gt`` as a detection with score 1 (RLE masks, as results carry them; with
    ``polygons`` the polygon annotations keep theirs): the input that must score AP 100, whatever the
    federated rules."""
    from faster_coco_eval.core import mask as mask_utils
    out = []
    for a in gt.dataset["annotations"]:
        if polygons and type(a["segmentation"]) is list:
            out.append(dict(image_id=a["image_id"], category_id=a["category_id"], score=1.0, bbox=list(a["bbox"]),
                            segmentation=a["segmentation"]))
            continue
        im = gt.imgs[a["image_id"]]
        rle = gt.annToRLE(a)
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, im["height"], im["width"])
        counts = rle["counts"]
        out.append(dict(image_id=a["image_id"], category_id=a["category_id"], score=1.0, bbox=list(a["bbox"]),
                        segmentation=dict(size=list(rle["size"]),
                                          counts=counts.decode("ascii") if isinstance(counts, bytes) else counts)))
    return out
