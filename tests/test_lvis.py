"""LVIS v1: its files read through the real pipelines (check, training and evaluation loaders, trainer),
repeat-factor sampling seen in the image ids DALI delivers, and the federated evaluation held to the
numbers of LVIS's own code (tests/data/lvis_reference.json, written by scripts/lvis_reference.py)."""
import json
import math
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dali_scp import lvis
from dali_scp.check import checked_annotations
from dali_scp.dataset import resolve
from dali_scp.image_index import image_index
from dali_scp.presets import RECIPES
from trainer import lvis_eval

REFERENCE = json.loads((Path(__file__).parent / "data" / "lvis_reference.json").read_text())
ROOT = Path(__file__).resolve().parents[1]


def case(name):
    return next(c for c in REFERENCE["cases"] if c["name"] == name)


def gt_of(c, tmp_path):
    p = tmp_path / f"{c['name']}.json"
    p.write_text(json.dumps(c["gt"]))
    return lvis_eval.load_ground_truth(p)


# ---------------------------------------------------------------- federated evaluation vs LVIS's code
@pytest.mark.parametrize("name", ["federated", "top300", "random", "polygons"])
def test_scores_equal_lvis_reference(name, tmp_path):
    c = case(name)
    ours = lvis_eval.score(gt_of(c, tmp_path), [dict(r) for r in c["results"]])
    for t in ("bbox", "segm"):
        assert set(ours[t]) == set(c["lvis"][t])
        for k, v in c["lvis"][t].items():
            assert ours[t][k] == pytest.approx(v, abs=1e-9), (name, t, k)


def test_polygon_results_take_their_box_area(tmp_path):
    """In the polygons case the same pixels as RLE (mask areas) give other size-split numbers than
    LVISResults gives polygon results (box areas): the reference above holds the rule, not only the pixels."""
    from trainer.evaluate import results_of_type
    c = case("polygons")
    gt = gt_of(c, tmp_path)
    as_rle = [dict(r, segmentation=results_of_type([r], "segm", gt.imgs).entries[0]["segmentation"])
              for r in c["results"]]
    m = lvis_eval.score(gt, as_rle, iou_types=("segm",))["segm"]
    assert m["AP"] == pytest.approx(c["lvis"]["segm"]["AP"], abs=1e-9)
    assert any(abs(m[k] - c["lvis"]["segm"][k]) > 1e-3 for k in ("APs", "APm", "APl"))


def test_federated_case_by_hand(tmp_path):
    """The federated case's per-category APs, worked out by hand (the detections are exact boxes, so
    every IoU threshold agrees): cat 1 ranks TP, FP, TP (precision 1 up to recall 0.5 and 2/3 up to 1,
    101-point interpolation); cat 2 and cat 3 each rank one counted FP before their one TP (0.5); cat 4
    has no ground truth (its only detection is ignored), so it counts in no mean."""
    c = case("federated")
    cat1 = (51 * 1.0 + 50 * 2 / 3) / 101
    m = lvis_eval.score(gt_of(c, tmp_path), [dict(r) for r in c["results"]])["bbox"]
    assert m["AP"] == pytest.approx((cat1 + 0.5 + 0.5) / 3)
    assert (m["APf"], m["APc"], m["APr"]) == (pytest.approx(cat1), pytest.approx(0.5), pytest.approx(0.5))


def test_federated_rules_change_the_numbers(tmp_path):
    """Scored as COCO would (every detection counts, 300 per category) both cases come out otherwise:
    the rules are what makes the reference numbers."""
    from faster_coco_eval import COCOeval_faster
    for name in ("federated", "top300"):
        c = case(name)
        gt = gt_of(c, tmp_path)
        ev = COCOeval_faster(gt, gt.loadRes([dict(r) for r in c["results"]]), "bbox", print_function=lambda *a: None)
        ev.params.maxDets = [300]
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert abs(ev.stats[0] - c["lvis"]["bbox"]["AP"]) > 0.05, name


def test_top300_is_per_image_across_categories():
    rs = [dict(image_id=1, category_id=k % 3, score=k / 1000) for k in range(400)] + [dict(image_id=2, category_id=1, score=0.1)]
    kept = lvis_eval.limit_per_image(rs, 300)
    assert sum(r["image_id"] == 1 for r in kept) == 300 and sum(r["image_id"] == 2 for r in kept) == 1
    assert min(r["score"] for r in kept if r["image_id"] == 1) == 100 / 1000


def test_not_an_lvis_file_is_named(tmp_path):
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(dict(images=[dict(id=1, file_name="a.jpg", width=4, height=4)], annotations=[],
                                 categories=[dict(id=1, name="x")])))
    with pytest.raises(ValueError, match=r"coco\.json: category 1 has frequency None"):
        lvis_eval.load_ground_truth(p)


# ---------------------------------------------------------------- the synthetic LVIS set and its reading
@pytest.fixture(scope="module")
def lvis_val():
    return resolve(None, "val2017", "lvis")  # the default set, shared with the trainer test's subprocess


@pytest.fixture(scope="module")
def lvis_train(lvis_val):
    return resolve(None, "train2017", "lvis")


def test_synthetic_lvis_is_lvis_shaped(lvis_train, lvis_val):
    train = json.loads(lvis_train.annotations.read_text())
    val = json.loads(lvis_val.annotations.read_text())
    counts = Counter()
    for c in {(a["image_id"], a["category_id"]) for a in train["annotations"]}:
        counts[c[1]] += 1
    for c in train["categories"]:  # LVIS's rule on the training images that hold the category
        n = counts[c["id"]]
        assert c["frequency"] == ("r" if n < 10 else "c" if n < 100 else "f") and c["image_count"] == n
    assert {c["frequency"] for c in train["categories"]} == {"r", "c", "f"}
    for doc in (train, val):
        assert all("file_name" not in im and "coco_url" in im for im in doc["images"])
        assert all("iscrowd" not in a for a in doc["annotations"])
        present = {}
        for a in doc["annotations"]:
            present.setdefault(a["image_id"], set()).add(a["category_id"])
        for im in doc["images"]:
            mine = present.get(im["id"], set())
            assert not set(im["neg_category_ids"]) & mine
            assert set(im["not_exhaustive_category_ids"]) <= mine
        assert any(im["neg_category_ids"] for im in doc["images"])
    assert any(im["not_exhaustive_category_ids"] for im in train["images"])
    in_train = [lvis.image_file(im) for im in val["images"] if "/train2017/" in im["coco_url"]]
    assert in_train and all((lvis_val.root / f).is_file() for f in in_train)
    assert lvis_val.images_dir == lvis_val.root and lvis_val.dataset == "lvis"


def test_check_and_index_read_lvis(lvis_train):
    raw = json.loads(lvis_train.annotations.read_text())
    ann, rep = checked_annotations(lvis_train.annotations, lvis_train.images_dir, progress=False)
    assert rep.defects == [] and rep.kept_images == len(raw["images"]) and rep.kept_annotations == len(raw["annotations"])
    filtered = json.loads(Path(ann).read_text())
    names = [im["file_name"] for im in filtered["images"]]
    assert names == ["/".join(im["coco_url"].split("/")[-2:]) for im in raw["images"]]
    assert all((lvis_train.root / n).is_file() for n in names)
    # the categories per image repeat-factor sampling reads, against the raw LVIS file
    idx = image_index(ann)
    assert idx.file_names.tolist() == names
    want = {}
    for a in raw["annotations"]:
        want.setdefault(a["image_id"], set()).add(a["category_id"])
    for k, iid in enumerate(idx.image_ids):
        assert set(idx.categories_of(k).tolist()) == want.get(int(iid), set())


def test_eval_loader_reads_val_images_from_train2017(lvis_val):
    from dali_scp.presets import EvalResize
    from pipelines.iterator import EvalLoader
    ann, _ = checked_annotations(lvis_val.annotations, lvis_val.images_dir, progress=False)
    doc = json.loads(Path(ann).read_text())
    ids = [i for b in EvalLoader(lvis_val, EvalResize(128, 128, 32), 8, annotations=str(ann)) for i in b.image_ids]
    assert sorted(ids) == sorted(im["id"] for im in doc["images"])
    assert any(im["file_name"].startswith("train2017/") for im in doc["images"])


@pytest.mark.parametrize("polygons", [False, True])
def test_ground_truth_as_results_scores_100(lvis_val, tmp_path, polygons):
    gt = lvis_eval.load_ground_truth(lvis_val.annotations)
    res = tmp_path / "gt_results.json"
    results = lvis_eval.ground_truth_as_results(gt, polygons)
    assert polygons == all(type(r["segmentation"]) is list for r in results)
    res.write_text(json.dumps(results))
    p = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--dataset", "lvis", "--results", str(res),
                        "--out", str(tmp_path / "ev")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m) == {"bbox", "segm"}
    for t in m:
        assert m[t] == {k: 1.0 for k in lvis_eval.STAT_NAMES}, t
    assert "APr" in p.stdout and "AR@300" in p.stdout


def test_repeat_factor_sampling_over_samples_rare_images(lvis_train):
    """The image ids DALI delivers over several epochs of the synthetic LVIS training set: each image
    about r(I) times per epoch, r(I) computed here from the raw LVIS file with LVIS's definition (the
    rare categories' images ~3.5 times, the images of frequent categories only, once)."""
    from pipelines.iterator import CocoLoader
    t = RECIPES["demo_lvis"].repeat_threshold
    raw = json.loads(lvis_train.annotations.read_text())
    cats = {}
    for a in raw["annotations"]:
        cats.setdefault(a["image_id"], set()).add(a["category_id"])
    n = len(raw["images"])
    f = Counter(c for s in cats.values() for c in s)
    r = {im["id"]: max([1.0] + [max(1.0, math.sqrt(t / (f[c] / n))) for c in cats.get(im["id"], ())])
         for im in raw["images"]}
    epochs = 6
    total = int(sum(r.values()) * epochs)
    loader = CocoLoader("none", lvis_train, batch_size=16, out_size=64, infinite=True, repeat_threshold=t, seed=1)
    seen = Counter()
    for _, targets in loader:
        seen.update(tg["image_id"] for tg in targets)
        if sum(seen.values()) >= total:
            break
    e = sum(seen.values()) / sum(r.values())  # epochs read
    rare = [i for i in r if r[i] > 3]
    once = [i for i in r if r[i] == 1.0]
    assert rare and once
    for group in (rare, once):
        want = sum(r[i] for i in group) * e
        got = sum(seen[i] for i in group)
        # per image per epoch the count is floor(r) + Bernoulli(frac r); over the group and the epochs
        # its spread is at most sqrt(len(group) * e / 4), plus up to one epoch's worth at the cut
        assert abs(got - want) <= 3 * math.sqrt(len(group) * e / 4) + sum(r[i] for i in group), (got, want)
    assert sum(seen[i] for i in rare) / len(rare) > 2.5 * sum(seen[i] for i in once) / len(once)


def test_trainer_runs_lvis_demo(lvis_train, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "trainer.run", "--dataset", "lvis", "--max-iters", "2", "--no-eval",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"]["name"] == "demo_lvis"
    assert cfg["resolved"]["repeat_threshold"] == RECIPES["demo_lvis"].repeat_threshold > 0
    assert cfg["resolved"]["dataset_kind"] == "lvis" and cfg["resolved"]["num_classes"] == 9
    assert list(out.glob("ckpt_*.pth"))


def test_visualiser_and_profiler_read_lvis(lvis_train, tmp_path):
    from pipelines import profile
    from pipelines.visualize import make_grid
    grid = make_grid("ssj_scp", None, n=2, tile=64, dataset="lvis")
    assert grid.size == (128, 64 + 22)
    out = profile.run(["none"], None, batch=2, threads=1, iters=1, warmup=1, out_size=64, progress=False, dataset="lvis")
    assert out["dataset"] == str(lvis_train.root) and out["results"][1]["images_per_s"] > 0


# ---------------------------------------------------------------- recipes
def test_lvis_recipes():
    for name, pipe in (("r50_lsj_scp_lvis", "lsj_scp"), ("r50_lsj_lvis", "lsj")):
        r = RECIPES[name]
        assert (r.pipeline, r.image_size, r.backbone, r.repeat_threshold) == (pipe, 1024, "resnet50", 0.001)
        assert (r.detections_per_image, r.score_threshold) == (300, 1e-4)
        # the COCO LSJ recipe of the same schedule and model but for LVIS's sampling and test-time numbers
        coco = RECIPES[f"r50_{pipe}_270k"]
        assert replace(r, name=coco.name, repeat_threshold=0.0, detections_per_image=100, score_threshold=0.05) == coco
    assert RECIPES["r50_lsj_scp_90k"].repeat_threshold == 0 and RECIPES["demo"].detections_per_image == 100


def test_recipe_sets_test_time_detections():
    from trainer.model import build_model
    m = build_model(replace(RECIPES["demo"], detections_per_image=300, score_threshold=1e-4), 9)
    assert (m.roi_heads.detections_per_img, m.roi_heads.score_thresh) == (300, 1e-4)


def test_missing_lvis_file_is_named(tmp_path):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lvis_v1_val\.json: annotation file not found \(expected LVIS"):
        resolve(tmp_path, "val2017", "lvis")
