"""COCO evaluation at COCO's size: 5,000 images x 100 detections, bbox and segm.

    python benchmarks/eval_scale.py                          # synthetic 5,000-image ground truth
    python benchmarks/eval_scale.py --gt /data/coco/annotations/instances_val2017.json --json eval.json

Times, in one process and one run (so the ratios hold under the same CPU load): pycocotools alone
(``COCO``, ``loadRes``, ``COCOeval`` for bbox and segm, called directly), faster-coco-eval alone (the
same calls), and ``trainer.evaluate --results`` end to end with each ``--scorer`` (ground truth,
reading and validating the results file, scoring), with its stages. Also checks that the two scorers'
12 numbers agree.

Why a generator and not COCO itself: nothing may be downloaded, and the costs that matter (JSON of
500,000 entries, one RLE string each, RLE IoU per image and category) depend on the counts and sizes,
which the generator gives COCO's: 80 categories with COCO's non-contiguous ids, ~7 objects per image,
640 px images, polygons of 10-40 vertices, crowd regions as RLE, detections that overlap their objects
plus false positives up to ``n_dets`` per image. ``make_ground_truth``, ``make_results`` and
``time_evaluation`` are importable (the COCO-scale benchmark calls ``time_evaluation``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COCO_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 640), (500, 375), (640, 360)]


def _polygon(rng: np.random.Generator, w: int, h: int, r: float, cx: float | None = None,
             cy: float | None = None) -> list:
    """A star-shaped polygon of 10-40 vertices, radius ~r, inside the image."""
    n = int(rng.integers(10, 41))
    cx = rng.uniform(r, max(r + 1, w - r)) if cx is None else cx
    cy = rng.uniform(r, max(r + 1, h - r)) if cy is None else cy
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + rad * np.cos(a), 0, w - 0.01)
    ys = np.clip(cy + rad * np.sin(a), 0, h - 0.01)
    return np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()


def _radius(rng: np.random.Generator, w: int, h: int) -> float:
    """COCO's mix: ~41% small (< 32^2 px), ~34% medium, ~24% large."""
    k = rng.choice(3, p=[0.41, 0.35, 0.24])
    lo, hi = [(3, 18), (18, 54), (54, min(w, h) / 2)][k]
    return float(rng.uniform(lo, max(lo + 1, hi)))


def _rle(poly: list, h: int, w: int) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return dict(size=[int(h), int(w)], counts=rle["counts"].decode("ascii"))


def make_ground_truth(n_images: int = 5000, seed: int = 0, crowd_share: float = 0.01,
                      progress: bool = True) -> dict:
    """A COCO instances dict (no image files): COCO's image sizes, categories and object counts."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in tqdm(range(n_images), desc="ground truth", unit="img", disable=not progress, leave=False):
        w, h = SIZES[rng.integers(len(SIZES))]
        iid = i + 1
        images.append(dict(id=iid, file_name=f"{iid:012d}.jpg", width=w, height=h))
        for _ in range(int(rng.poisson(7.3))):
            poly = _polygon(rng, w, h, _radius(rng, w, h))
            crowd = rng.random() < crowd_share
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            seg = dict(size=[h, w], counts=rle["counts"].decode("ascii")) if crowd else [poly]
            anns.append(dict(id=len(anns) + 1, image_id=iid, category_id=int(rng.choice(COCO_CAT_IDS)),
                             segmentation=seg, area=float(mask_utils.area(rle)),
                             bbox=[round(float(v), 2) for v in mask_utils.toBbox(rle)], iscrowd=int(crowd)))
    return dict(images=images, annotations=anns,
                categories=[dict(id=c, name=f"cat{c}", supercategory="thing") for c in COCO_CAT_IDS])


def make_results(gt: dict, n_dets: int = 100, seed: int = 1, progress: bool = True) -> list:
    """``n_dets`` results per image (fewer only where COCO's 100 would be exceeded): for each object
    1-3 jittered copies (mostly its category), the rest false positives of random size and category;
    RLE masks at the image's size and their boxes, as ``trainer.evaluate`` writes them."""
    rng = np.random.default_rng(seed)
    by_img: dict = {}
    for a in gt["annotations"]:
        if not a["iscrowd"]:
            by_img.setdefault(a["image_id"], []).append(a)
    out = []
    for im in tqdm(gt["images"], desc="results", unit="img", disable=not progress, leave=False):
        w, h, iid = im["width"], im["height"], im["id"]
        polys, cats, scores = [], [], []
        for a in by_img.get(iid, []):
            xy = np.asarray(a["segmentation"][0]).reshape(-1, 2)
            r = max(np.sqrt(a["area"] / np.pi), 2.0)
            for _ in range(int(rng.integers(1, 4))):
                jit = xy + rng.normal(0, 0.08 * r, 2) + rng.normal(0, 0.04 * r, xy.shape)
                jit = np.clip(jit, 0, [w - 0.01, h - 0.01])
                polys.append(np.round(jit.reshape(-1), 2).tolist())
                cats.append(a["category_id"] if rng.random() < 0.8 else int(rng.choice(COCO_CAT_IDS)))
                scores.append(rng.uniform(0.3, 1.0))
        while len(polys) < n_dets:
            polys.append(_polygon(rng, w, h, _radius(rng, w, h)))
            cats.append(int(rng.choice(COCO_CAT_IDS)))
            scores.append(rng.uniform(0.0, 0.7))
        for poly, c, s in list(zip(polys, cats, scores))[:n_dets]:
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            out.append(dict(image_id=iid, category_id=int(c), score=round(float(s), 5),
                            bbox=[round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                            segmentation=dict(size=[h, w], counts=rle["counts"].decode("ascii"))))
    return out


def write_root(root: Path, gt: dict, split: str = "val2017") -> Path:
    """A COCO layout around ``gt`` (annotations only: ``--results`` reads no image)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(gt))
    return path


class Clock:
    """Wall and CPU seconds of a block (CPU: this process's threads and its finished children), so a
    figure taken while other work shares the cores still says what the work costs."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + c.ru_utime + c.ru_stime


def _direct(library: str, gt_path: Path, res_path: Path) -> tuple[Clock, dict]:
    """What a user of the library alone would run: ground truth, results file, COCOeval bbox and segm
    (segm scored from the masks alone, as trainer.evaluate does)."""
    with Clock() as clock, contextlib.redirect_stdout(io.StringIO()):
        if library == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval
            kw = {}
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
            kw = dict(print_function=lambda *a, **k: None)
        gt = COCO(str(gt_path))
        results = json.loads(res_path.read_text())
        stats = {}
        for t in ("bbox", "segm"):
            res = [dict(r) for r in results]
            if t == "segm":
                for r in res:
                    r.pop("bbox")
            e = Eval(gt, gt.loadRes(res), t, **kw)
            e.evaluate()
            e.accumulate()
            e.summarize()
            stats[t] = [float(v) for v in e.stats[:12]]
    return clock, stats


def _trainer_evaluate(gt_path: Path, res_path: Path, scorer: str, stages: bool) -> tuple[Clock, dict, dict]:
    """``trainer.evaluate --results`` end to end (in this process), then (``stages``) its stages one by
    one."""
    from trainer import evaluate as ev
    root = gt_path.parent.parent
    split = gt_path.stem.removeprefix("instances_")
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        with Clock() as total:
            rc = ev.main(["--results", str(res_path), "--coco-root", str(root), "--split", split, "--out", out,
                          "--scorer", scorer])
        assert rc == 0, f"trainer.evaluate --results exited {rc}"
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    stats = {k: [m[n] for n in ev.STAT_NAMES] for k, m in metrics.items()}
    if not stages:
        return total, stats, {}
    stages = {}
    t = time.perf_counter()
    gt = ev.load_ground_truth(gt_path, scorer=scorer)
    stages["ground_truth_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results = ev.read_results(res_path)
    stages["read_results_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ev.validate_results(results, gt, str(res_path))
    stages["validate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev.score(gt, results, scorer=scorer)
    stages["score_s"] = time.perf_counter() - t
    return total, stats, stages


def _other_checkout(checkout: Path, gt_path: Path, res_path: Path) -> Clock:
    """``trainer.evaluate --results`` of a checkout of this project in its own process, as a user runs
    it (start-up included)."""
    root, split = gt_path.parent.parent, gt_path.stem.removeprefix("instances_")
    with Clock() as clock:
        subprocess.run([sys.executable, "-m", "trainer.evaluate", "--results", str(res_path), "--coco-root",
                        str(root), "--split", split], cwd=checkout, check=True, capture_output=True)
    return clock


def time_evaluation(root_or_gt_json, n_dets: int = 100, seed: int = 1, progress: bool = True,
                    trainer_scorers=("faster-coco-eval",), other_checkout=None) -> dict:
    """Times of COCO evaluation of ``n_dets`` generated results per image of a ground truth: a COCO
    root (its ``annotations/instances_val2017.json``) or an instances JSON. Returns seconds for
    pycocotools alone, faster-coco-eval alone, trainer.evaluate --results with each of
    ``trainer_scorers`` (the first one also by stage), the ratio asked of it (trainer.evaluate with the
    default scorer / pycocotools alone), and the largest difference between the scorers' 12 numbers of
    bbox and segm. ``other_checkout``: also time trainer.evaluate --results of that checkout (a
    before/after in one run)."""
    p = Path(root_or_gt_json)
    gt_path = p if p.is_file() else p / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_path.read_text())
    results = make_results(gt, n_dets, seed, progress)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if gt_path.parent.name != "annotations" or not (gt_path.parent.parent / gt_path.stem.removeprefix("instances_")).is_dir():
            gt_path = write_root(tmp / "root", gt)  # trainer.evaluate wants a COCO layout
        res_path = tmp / "results.json"
        res_path.write_text(json.dumps(results))
        out = dict(images=len(gt["images"]), annotations=len(gt["annotations"]), detections=len(results),
                   results_mb=round(res_path.stat().st_size / 2**20, 1))
        stats = {}
        for lib in ("pycocotools", "faster-coco-eval"):
            c, stats[lib] = _direct(lib, gt_path, res_path)
            out[f"{lib}_alone_s"], out[f"{lib}_alone_cpu_s"] = c.wall, c.cpu
        for k, scorer in enumerate(trainer_scorers):
            total, stats[f"trainer_{scorer}"], stages = _trainer_evaluate(gt_path, res_path, scorer, k == 0)
            out[f"trainer_evaluate_{scorer}_s"], out[f"trainer_evaluate_{scorer}_cpu_s"] = total.wall, total.cpu
            if stages:
                out[f"trainer_evaluate_{scorer}_stages"] = stages
        if other_checkout:
            out["other_checkout"] = str(other_checkout)
            for name, where in (("other_checkout", Path(other_checkout)), ("this_checkout", ROOT)):  # same terms
                c = _other_checkout(where, gt_path, res_path)
                out[f"{name}_trainer_evaluate_process_s"], out[f"{name}_trainer_evaluate_process_cpu_s"] = c.wall, c.cpu
    ref = np.asarray([stats["pycocotools"][t] for t in ("bbox", "segm")])
    out["max_stat_difference"] = float(max(np.abs(np.asarray([s[t] for t in ("bbox", "segm")]) - ref).max()
                                           for s in stats.values()))
    out["trainer_evaluate_vs_pycocotools"] = out[f"trainer_evaluate_{trainer_scorers[0]}_s"] / out["pycocotools_alone_s"]
    out["trainer_evaluate_vs_pycocotools_cpu"] = (out[f"trainer_evaluate_{trainer_scorers[0]}_cpu_s"]
                                                  / out["pycocotools_alone_cpu_s"])
    out["stats_pycocotools"] = stats["pycocotools"]
    return out


def main(argv=None) -> int:
    from dali_scp import cli
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", default=None, help="a COCO instances JSON or COCO root (default: generate one)")
    p.add_argument("--images", type=cli.COUNT, default=5000, help="images of the generated ground truth (default 5000)")
    p.add_argument("--dets", type=cli.COUNT, default=100, help="detections per image (default 100)")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--both-scorers", action="store_true",
                   help="also time trainer.evaluate --scorer pycocotools (a few more minutes)")
    p.add_argument("--other-checkout", default=None, metavar="DIR",
                   help="also time trainer.evaluate --results of this checkout of the project (e.g. a git worktree "
                        "of the commit before a change), in the same run")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        gt = a.gt or write_root(Path(tmp) / "root", make_ground_truth(a.images, a.seed))
        r = time_evaluation(gt, a.dets, a.seed + 1,
                            trainer_scorers=("faster-coco-eval", "pycocotools") if a.both_scorers else
                            ("faster-coco-eval",), other_checkout=a.other_checkout)
    print(json.dumps({k: v for k, v in r.items() if k != "stats_pycocotools"}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
