"""faster-coco-eval (the default scorer) against pycocotools (the reference COCOeval), both run for real:
all 12 numbers of bbox and segm equal (to 1e-6) on every set the tests use: the synthetic splits
(crowd regions stored as RLE, empty images), annotation ids from 0, the EXIF set (every orientation
tag, annotations in either frame, RLE objects) scored through evaluation's mapping back into the
annotation frame, datasets of 1 and 3 images, and empty results. The results are ground truth made
imperfect (shifted masks and boxes, dropped objects, false positives, wrong classes, tied scores), so
the numbers are neither all 1 nor all 0."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from dali_scp.dataset import resolve
from trainer import evaluate as ev


def imperfect(gt_path, seed: int, results=None) -> list:
    """Results for the ground truth at ``gt_path`` (or the given ones) with errors of every kind. RLE
    masks and boxes as trainer.evaluate writes them; scores on a coarse grid, so many tie."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    rng = np.random.default_rng(seed)
    cats = sorted(gt.getCatIds())
    if results is None:
        results = []
        for a in gt.anns.values():
            if a["iscrowd"]:
                continue
            rle = gt.annToRLE(a)
            results.append(dict(image_id=a["image_id"], category_id=a["category_id"], score=1.0,
                                bbox=[float(v) for v in mask_utils.toBbox(rle)],
                                segmentation=dict(size=list(rle["size"]), counts=rle["counts"].decode()
                                                  if isinstance(rle["counts"], bytes) else rle["counts"])))
    out = []
    for r in results:
        if rng.random() < 0.15:
            continue  # a missed object
        im = gt.imgs[r["image_id"]]
        for copy in range(1 + (rng.random() < 0.3)):  # sometimes a duplicate, a false positive
            m = mask_utils.decode(dict(r["segmentation"], counts=r["segmentation"]["counts"].encode()))
            dx, dy = rng.integers(-4, 5, 2) * (1 + copy)
            m = np.roll(m, (dy, dx), (0, 1))
            if m.sum() == 0:
                continue
            rle = mask_utils.encode(np.asfortranarray(m))
            x, y, w, h = r["bbox"]
            out.append(dict(image_id=r["image_id"],
                            category_id=int(r["category_id"] if rng.random() < 0.85 else rng.choice(cats)),
                            score=float(rng.choice([0.3, 0.5, 0.5, 0.9, 0.9, 1.0])),
                            bbox=[round(float(np.clip(x + dx, 0, im["width"])), 2), round(float(y + dy), 2),
                                  round(float(w * rng.uniform(0.8, 1.2)), 2), round(float(h), 2)],
                            segmentation=dict(size=[int(v) for v in rle["size"]], counts=rle["counts"].decode())))
    return out


def assert_same_numbers(gt_path, results) -> dict:
    """Both scorers, each from its own COCO of the file; returns pycocotools' numbers."""
    m = {s: ev.score(ev.load_ground_truth(gt_path, s), results, scorer=s) for s in ev.SCORERS}
    for t in ("bbox", "segm"):
        fast, ref = ([m[s][t][n] for n in ev.STAT_NAMES] for s in ("faster-coco-eval", "pycocotools"))
        np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-6, err_msg=f"{gt_path} {t}")
    return m["pycocotools"]


def assert_informative(m: dict) -> None:
    """Numbers that a scorer could get wrong: not all 1, some above 0."""
    for t in ("bbox", "segm"):
        v = np.array([m[t][n] for n in ev.STAT_NAMES])
        assert (v < 0.999).any() and (v > 0).any(), (t, v)


@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_synthetic_splits_with_crowd_regions(syn_root, split):
    path = resolve(syn_root, split).annotations
    doc = json.loads(path.read_text())
    m = assert_same_numbers(path, imperfect(path, seed=1))
    assert_informative(m)
    if split == "train2017":
        assert any(a["iscrowd"] for a in doc["annotations"]), "crowd regions are part of it"


def test_annotation_ids_from_zero(syn_root, tmp_path):
    doc = json.loads(resolve(syn_root, "train2017").annotations.read_text())
    for k, a in enumerate(doc["annotations"]):
        a["id"] = k
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    assert_informative(assert_same_numbers(path, imperfect(path, seed=2)))
    # and the perfect answer is exactly 1 for both, the id-0 object included
    for s in ev.SCORERS:
        gt = ev.load_ground_truth(path, s)
        res = [dict(image_id=a["image_id"], category_id=a["category_id"], score=1.0, bbox=a["bbox"])
               for a in gt.anns.values() if not a["iscrowd"]]
        assert ev.score(gt, res, iou_types=("bbox",), scorer=s)["bbox"]["AP"] == 1.0, s


def test_exif_set_through_evaluations_mapping(tmp_path, monkeypatch):
    from dali_scp.presets import recipe
    from quirks import oriented_dataset, perfect_inference
    from trainer.distributed import Dist
    root = tmp_path / "exif"
    doc = oriented_dataset(root, "val2017")
    split = resolve(root, "val2017")
    monkeypatch.setattr(ev, "inference", perfect_inference(doc, ev.load_ground_truth(split.annotations)))
    metrics, _ = ev.evaluate_model(torch.nn.Module(), split, recipe("demo").eval_resize, "cpu", 4, Dist(),
                                   tmp_path / "eval", progress=False)
    assert metrics["segm"]["AP"] == 1.0
    mapped = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert_same_numbers(split.annotations, mapped)
    assert_informative(assert_same_numbers(split.annotations, imperfect(split.annotations, 3, mapped)))


@pytest.mark.parametrize("n", [1, 3])
def test_datasets_of_one_and_three_images(small_root, n):
    path = resolve(small_root(n), "val2017").annotations
    assert_same_numbers(path, imperfect(path, seed=4))


def test_empty_results(syn_root):
    path = resolve(syn_root, "val2017").annotations
    m = assert_same_numbers(path, [])
    assert {m[t]["AP"] for t in ("bbox", "segm")} == {0.0}
    # boxes only: segm is COCOeval of no detections
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in imperfect(path, seed=5)]
    m = assert_same_numbers(path, boxes)
    assert m["bbox"]["AP"] > 0 and m["segm"]["AP"] == 0.0


def test_cli_scorer_option(syn_root, tmp_path):
    path = resolve(syn_root, "val2017").annotations
    f = tmp_path / "r.json"
    f.write_text(json.dumps(imperfect(path, seed=6)))
    got = {}
    for s in ev.SCORERS:
        assert ev.main(["--results", str(f), "--coco-root", str(syn_root), "--out", str(tmp_path / s),
                        "--scorer", s]) == 0
        got[s] = json.loads((tmp_path / s / "metrics.json").read_text())
    for t in ("bbox", "segm"):
        np.testing.assert_allclose([got["faster-coco-eval"][t][n] for n in ev.STAT_NAMES],
                                   [got["pycocotools"][t][n] for n in ev.STAT_NAMES], rtol=0, atol=1e-6)
