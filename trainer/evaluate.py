"""COCO evaluation: box AP and mask AP with COCOeval, the numbers of the target table.

    python -m trainer.evaluate --checkpoint RUN/ckpt_00090000.pth [--coco-root DIR] [--split val2017]
    python -m trainer.evaluate --results results.json [--coco-root DIR]   # score results from elsewhere (RLE or polygons)
    python -m trainer.evaluate --checkpoint CKPT --coco-root DIR --dataset lvis  # LVIS's federated AP

Images go through a DALI evaluation pipeline (decode, resize keeping aspect as the recipe says -
mmdetection tests at 1333x800, resampling as OpenCV does: ``--resize opencv``, the seed recipes' - pad, no
augmentation). Boxes are mapped back to the original image,
masks are pasted back at the original resolution and thresholded at 0.5, RLE-encoded, labels mapped
back to the dataset's category ids. An image annotated on its EXIF-oriented view (the dataset check
marks it) gets its boxes and masks mapped from the stored pixels the model saw into that frame. Scores
are against the original annotation file (crowd regions, RLE objects as they are); annotation ids are
renumbered for COCOeval when one is 0 (``load_ground_truth``). Under torchrun every rank scores its
shard of the images and rank 0 gathers and scores; each image is scored exactly once.

The scorer is faster-coco-eval (``--scorer``), a maintained C++ port of pycocotools' COCOeval: the same
12 numbers (tests/test_scorer_parity.py holds them equal on every test set) in a fraction of the time
at COCO's size (benchmarks/eval_scale.py); ``--scorer pycocotools`` runs the reference itself.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from dali_scp import dataset as ds
from dali_scp import orientation
from dali_scp.presets import RESIZE_METHODS
from dali_scp.rle import compressed_run_totals, rle_runs
from trainer import distributed as dist_utils
from trainer.model import inference

log = logging.getLogger("evaluate")
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
SCORERS = ("faster-coco-eval", "pycocotools")
DEFAULT_SCORER = "faster-coco-eval"


def _silent(*args, **kwargs) -> None:
    pass


def coco_api(scorer: str = DEFAULT_SCORER):
    """(COCO class, function (gt, dt, iou type) -> COCOeval object) of ``scorer``. faster-coco-eval's
    COCOeval_faster logs its progress unless given a print function; pycocotools prints (``score``
    catches its stdout)."""
    if scorer == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, lambda gt, dt, t: COCOeval_faster(gt, dt, t, print_function=_silent)
    if scorer == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    raise ValueError(f"unknown scorer {scorer!r}: choose one of {', '.join(SCORERS)}")


# ---------------------------------------------------------------- results
def detections_to_results(image_id: int, det: dict, label_to_cat: np.ndarray, with_masks: bool = True,
                          orient: tuple | None = None) -> list:
    """One image's detections at the *original* resolution (boxes xyxy, scores, contiguous labels,
    masks [N, 1, H, W] probabilities) -> COCO result entries (bbox xywh, RLE segmentation).
    ``orient`` = (EXIF tag, stored width, stored height) for an image annotated in its oriented frame
    while the model saw stored pixels (``dali_scp.orientation``): boxes and masks are mapped into the
    annotation's frame."""
    boxes = det["boxes"].detach().cpu().numpy().astype(np.float64)
    scores = det["scores"].detach().cpu().tolist()
    cats = label_to_cat[det["labels"].detach().cpu().numpy()].tolist()
    rles = []
    if orient is not None and len(boxes):
        boxes = orientation.to_oriented_boxes(boxes, *orient)
    if with_masks and "masks" in det and len(boxes):
        m = (det["masks"][:, 0] > 0.5).to(torch.uint8)  # thresholded where the masks are (the GPU)
        if orient is not None:
            m = torch.from_numpy(np.ascontiguousarray(orientation.to_oriented_array(m.cpu().numpy(), orient[0])))
        # each mask's columns laid out one after the other is the column-major order pycocotools
        # encodes: transposed on the masks' device, the host encodes a view, without another copy
        cols = m.transpose(1, 2).contiguous().cpu().numpy()  # [N, W, H]
        rles = mask_utils.encode(cols.transpose(2, 1, 0))  # [H, W, N], Fortran-ordered
    xywh = np.round(np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
                    if len(boxes) else boxes.reshape(0, 4), 2).tolist()
    out = []
    for i in range(len(xywh)):
        r = dict(image_id=int(image_id), category_id=cats[i], score=round(scores[i], 5), bbox=xywh[i])
        if rles:
            r["segmentation"] = dict(size=rles[i]["size"], counts=rles[i]["counts"].decode("ascii"))
        out.append(r)
    return out


def read_results(path) -> list:
    """A results JSON file, with an error naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read results JSON ({e})") from e


def _check_runs(where: str, runs, h: int, w: int) -> None:
    """The one-entry check behind validate_results' bulk one, and its messages."""
    if isinstance(runs, str):
        try:
            runs = rle_runs(runs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: malformed RLE ({e})") from e
    elif not isinstance(runs, list):
        raise ValueError(f"{where}: malformed RLE (counts is a {type(runs).__name__}, not a string or a list)")
    if any((not isinstance(x, int)) or x < 0 for x in runs) or sum(runs) != h * w:
        raise ValueError(f"{where}: malformed RLE (runs cover {sum(runs) if runs else 0} pixels, "
                         f"the image has {h * w})")


def _check_polygons(where: str, seg: list, bbox, h: int, w: int) -> None:
    """A polygon segmentation as pycocotools' and LVIS's result loaders read it: [[x1, y1, x2, y2, ...], ...],
    with the entry's bbox, from which they take its area (without one they fail). A part of fewer than three
    points is refused: pycocotools would read a first part of four numbers as a box [x, y, w, h]. So is a
    coordinate ten image sizes away: pycocotools' rasteriser allocates memory in proportion to the distance."""
    if bbox is None:
        raise ValueError(f"{where}: a polygon segmentation needs the entry's bbox (COCO's and LVIS's result "
                         "loaders take a polygon result's area from its box)")
    if not seg:
        raise ValueError(f"{where}: segmentation is an empty list of polygons")
    for k, part in enumerate(seg):
        if type(part) is not list or not all(type(v) is float or type(v) is int for v in part):
            raise ValueError(f"{where}: polygon {k} is not a list of numbers [x1, y1, x2, y2, ...]")
        if len(part) % 2 or len(part) < 6:
            raise ValueError(f"{where}: polygon {k} has {len(part)} coordinates; expected x, y pairs of 3 points "
                             "or more")
        try:
            xy = np.asarray(part, np.float64)
        except OverflowError:
            xy = np.array([np.inf])
        if not np.isfinite(xy).all():
            raise ValueError(f"{where}: polygon {k} has a coordinate that is not a finite number")
        if np.abs(xy).max() > 10 * max(h, w):
            raise ValueError(f"{where}: polygon {k} has a coordinate ({np.abs(xy).max():g}) more than ten image "
                             f"sizes away from the {w} x {h} image")


def validate_results(results, gt, source: str = "results") -> None:
    """Clear errors naming the entry, instead of a KeyError inside the scorer (or C code reading past
    an RLE's end). ``gt``: either scorer's COCO. The compressed RLE strings (one per detection, 500,000
    in a COCO-sized file) are decoded together (``dali_scp.rle.compressed_run_totals``); the first bad
    one is then named with ``rle_runs``' message."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a JSON list of result entries, got {type(results).__name__}")
    imgs, cats = gt.imgs, set(gt.getCatIds())
    rle_at, rle_counts, rle_pixels = [], [], []
    number = (int, float)
    for i, r in enumerate(results):
        if type(r) is not dict:
            raise ValueError(f"{source}: entry {i}: not an object")
        iid = r.get("image_id")
        if type(iid) is not int or iid not in imgs:
            where = f"{source}: entry {i}"
            if not isinstance(iid, int) or isinstance(iid, bool):
                raise ValueError(f"{where}: image_id {iid!r} is not an integer")
            if iid not in imgs:
                raise ValueError(f"{where}: image_id {iid} is not in the ground truth")
        if r.get("category_id") not in cats:
            raise ValueError(f"{source}: entry {i} (image {iid}): category_id {r.get('category_id')!r} is not in "
                             "the ground truth")
        s = r.get("score")
        if type(s) not in number or not np.isfinite(s):
            raise ValueError(f"{source}: entry {i} (image {iid}): score {s!r} is not a finite number")
        b = r.get("bbox")
        if b is not None or "bbox" in r:
            if not (type(b) is list and len(b) == 4 and all(isinstance(v, number) for v in b)) or b[2] < 0 or b[3] < 0:
                raise ValueError(f"{source}: entry {i} (image {iid}): bbox {b!r} is not [x, y, w, h] with w, h >= 0")
        seg = r.get("segmentation")
        if seg is None and "segmentation" not in r:
            if b is None:
                raise ValueError(f"{source}: entry {i} (image {iid}): has neither bbox nor segmentation")
            continue
        where = f"{source}: entry {i} (image {iid})"
        h, w = imgs[iid]["height"], imgs[iid]["width"]
        if type(seg) is list:
            _check_polygons(where, seg, b, h, w)
            continue
        if not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
            raise ValueError(f"{where}: segmentation is neither an RLE dict with 'size' and 'counts' nor a "
                             "list of polygons")
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"{where}: RLE size {seg['size']} differs from the image's [{h}, {w}]")
        counts = seg["counts"]
        if type(counts) is str:
            rle_at.append(i)
            rle_counts.append(counts)
            rle_pixels.append(h * w)
        else:
            _check_runs(where, counts, h, w)
    if rle_at:
        totals, ok = compressed_run_totals(rle_counts)
        bad = np.flatnonzero(~ok | (totals != np.asarray(rle_pixels, np.int64)))
        if len(bad):
            i = rle_at[bad[0]]
            where = f"{source}: entry {i} (image {results[i]['image_id']})"
            im = imgs[results[i]["image_id"]]
            _check_runs(where, rle_counts[bad[0]], im["height"], im["width"])  # names what is wrong
            raise ValueError(f"{where}: malformed RLE (a run length written in more than 7 characters)")


def _indexed(coco_cls, doc: dict):
    gt = coco_cls()
    gt.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def load_ground_truth(path, scorer: str = DEFAULT_SCORER):
    """The scorer's COCO for ``path``, with errors naming the file. Annotation ids are renumbered
    1..N (logged) when any is 0, negative, missing or repeated: COCOeval (both scorers) stores the
    matched id per detection and reads 0 as "unmatched" (a correct detection of an id-0 object counts
    as a false positive), and a repeated id makes one object stand in for another. Results files carry
    no ids, so nothing else changes; files with positive unique ids are loaded exactly as the library
    loads them."""
    coco_cls, _ = coco_api(scorer)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
        anns = doc["annotations"]
        ids = [a.get("id") for a in anns]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from e
    ok = all(type(i) is int and i > 0 for i in ids)
    if not ok or len(set(ids)) != len(ids):
        why = ("an annotation id is 0" if 0 in ids else "annotation ids are not positive unique integers")
        log.info("%s: %s; ground-truth annotation ids renumbered 1..%d for COCOeval (it reads id 0 as "
                 "'unmatched')", path, why, len(anns))
        doc["annotations"] = [dict(a, id=k + 1) for k, a in enumerate(anns)]
    try:
        return _indexed(coco_cls, doc)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from e


class TypedResults(NamedTuple):
    """The entries scored as one IoU type, and the areas the result loader must not compute itself."""
    entries: list
    areas: dict  # index in ``entries`` -> area (polygon results: their box's)


def results_of_type(results: list, iou_type: str, imgs: dict) -> TypedResults:
    """Copies of the entries scored as ``iou_type``. segm entries lose their bbox, so mask areas define
    small/medium/large (as detectron2 does) - except polygon results, scored as pycocotools' ``loadRes`` and
    LVIS's ``LVISResults`` score them: rasterised at their image's size (``annToRLE`` / ``ann_to_rle``:
    ``frPyObjects`` + ``merge``; the polygons become that RLE here, so both scorers get the same pixels)
    with the area of their box (``imgs``: the ground truth's images by id)."""
    key = "bbox" if iou_type == "bbox" else "segmentation"
    res = [dict(r) for r in results if key in r]
    areas = {}
    if iou_type == "segm":
        for i, r in enumerate(res):
            box = r.pop("bbox", None)
            if type(r["segmentation"]) is list:
                im = imgs[r["image_id"]]
                rle = mask_utils.merge(mask_utils.frPyObjects(r["segmentation"], im["height"], im["width"]))
                r["segmentation"] = dict(size=rle["size"], counts=rle["counts"].decode("ascii"))
                areas[i] = box[2] * box[3]
    return TypedResults(res, areas)


def load_results(gt, typed: TypedResults):
    """``gt.loadRes`` of the entries (it numbers them 1..N in order), then the areas it must not compute."""
    dt = gt.loadRes(typed.entries)
    for i, area in typed.areas.items():
        dt.anns[i + 1]["area"] = area
    return dt


def score(gt, results: list, iou_types=("bbox", "segm"), verbose: bool = False,
          scorer: str = DEFAULT_SCORER) -> dict:
    """COCOeval per type; returns {type: {stat name: value}}. ``gt``: a COCO of either library (the
    other one's is re-indexed from its data). Each type gets its own copy of the results (``results_of_type``:
    segm without bbox, so mask areas define small/medium/large, as detectron2 does; polygon results as
    pycocotools scores them). No results of a type: COCOeval
    of an empty detection set (0 where there is ground truth, -1 where there is none), not an error."""
    coco_cls, make_eval = coco_api(scorer)
    if not isinstance(gt, coco_cls):
        gt = _indexed(coco_cls, gt.dataset)
    metrics = {}
    for t in iou_types:
        res = results_of_type(results, t, gt.imgs)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink if not verbose else sys.stdout):
            if res.entries:
                dt = load_results(gt, res)
            else:  # pycocotools' loadRes cannot take an empty list
                dt = _indexed(coco_cls, dict(images=list(gt.dataset["images"]), annotations=[],
                                             categories=[dict(c) for c in gt.dataset["categories"]]))
            ev = make_eval(gt, dt, t)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[t] = {n: float(v) for n, v in zip(STAT_NAMES, ev.stats)}
    return metrics


class Scoring(NamedTuple):
    """A dataset kind's evaluation: COCOeval here, LVIS's federated rules in ``trainer.lvis_eval``."""
    load_ground_truth: Callable
    score: Callable          # (ground truth, results) -> {type: {stat name: value}}
    format_table: Callable
    stat_names: list


def scoring(dataset: str = "coco", scorer: str = DEFAULT_SCORER) -> Scoring:
    """``scorer`` picks the COCOeval implementation; LVIS is scored by faster-coco-eval's LVIS rules."""
    if dataset == "lvis":
        from trainer import lvis_eval
        return Scoring(lvis_eval.load_ground_truth, lvis_eval.score, lvis_eval.format_table, lvis_eval.STAT_NAMES)
    return Scoring(functools.partial(load_ground_truth, scorer=scorer), functools.partial(score, scorer=scorer),
                   format_table, STAT_NAMES)


def format_table(metrics: dict) -> str:
    head = f"{'':6s}" + "".join(f"{n:>7s}" for n in STAT_NAMES)
    rows = [head] + [f"{t:6s}" + "".join(f"{100 * m[n]:7.1f}" for n in STAT_NAMES) for t, m in metrics.items()]
    return "\n".join(rows)


# ---------------------------------------------------------------- model inference
@torch.no_grad()
def predict(model, split: ds.CocoSplit, resize, device: str = "cpu", batch_size: int = 4,
            d: dist_utils.Dist | None = None, progress: bool = True, annotations: str | None = None) -> list:
    """This rank's COCO results for its shard of ``split`` and the ids of the images it scored.
    ``annotations`` (the checked copy) says which images to read, their stored sizes and which were
    annotated in their EXIF-oriented frame; predictions for those are mapped back into it. Ranks beyond
    the number of images score nothing (DALI needs an image per shard)."""
    from pipelines.devices import pipeline_device
    from pipelines.iterator import EvalLoader
    d = d or dist_utils.Dist()
    images = json.loads(Path(annotations or split.annotations).read_text())["images"]
    orient = {im["id"]: im["annotated_orientation"] for im in images if im.get("annotated_orientation", 1) != 1}
    shards = min(d.world_size, len(images))
    if d.rank >= shards:
        return [], []
    loader = EvalLoader(split, resize, batch_size, pipeline_device(device), shard_id=d.rank, num_shards=shards,
                        device_id=d.local_rank, annotations=annotations)
    l2c = split.label_to_cat()
    model.eval()
    results, scored = [], []
    for batch in tqdm(loader, total=len(loader), desc="evaluating", unit="batch", disable=not progress, leave=False):
        results += batch_results(model, batch, device, l2c, orient)
        scored += batch.image_ids
    return results, scored


@torch.no_grad()
def batch_results(model, batch, device: str, label_to_cat: np.ndarray, orient: dict | None = None) -> list:
    """One ``pipelines.iterator.EvalBatch`` -> COCO result entries at the original image sizes (the model
    batches and pads the valid regions itself). ``orient``: image id -> EXIF tag, for images annotated in
    their oriented frame."""
    orient = orient or {}
    images = batch.images.to(device)
    imgs = [images[i, : g.valid_h, : g.valid_w].permute(2, 0, 1) for i, g in enumerate(batch.geometry)]
    dets = inference(model, imgs, batch.orig_sizes)
    results = []
    for iid, (h, w), det in zip(batch.image_ids, batch.orig_sizes, dets):
        o = (orient[iid], w, h) if iid in orient else None
        results += detections_to_results(iid, det, label_to_cat, orient=o)
    return results


def evaluate_model(model, split: ds.CocoSplit, resize, device: str, batch_size: int, d: dist_utils.Dist,
                   out_dir: Path | None = None, progress: bool = True, scorer: str = DEFAULT_SCORER):
    """Distributed-aware: returns (metrics, ids of the scored images) on rank 0, (None, None) elsewhere.
    Fails loudly if an image of the split was not scored exactly once. Leaves the model in eval mode."""
    from dali_scp.check import checked_annotations
    ann, _ = checked_annotations(split.annotations, split.images_dir, progress=progress)
    mine = predict(model, split, resize, device, batch_size, d, progress and d.is_main, annotations=str(ann))
    gathered = dist_utils.gather_objects(d, mine)
    if not d.is_main:
        return None, None
    results, scored = merge_rank_results(gathered)
    sc = scoring(split.dataset, scorer)
    gt = sc.load_ground_truth(split.annotations)
    expected = {im["id"] for im in json.loads(Path(ann).read_text())["images"]}
    if sorted(scored) != sorted(expected):
        raise RuntimeError(f"evaluation scored {len(scored)} images, expected each of {len(expected)} once")
    metrics = sc.score(gt, results) if results else {t: {n: 0.0 for n in sc.stat_names} for t in ("bbox", "segm")}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from dali_scp.files import atomic_write
        atomic_write(out_dir / "results.json", json.dumps(results))
        atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics, scored


def merge_rank_results(per_rank: list):
    """Concatenate the ranks' (results, scored ids); an image that two ranks scored is kept from the
    first rank only, so every image counts once. Returns (results, scored ids)."""
    owner = {}
    for rank, (_, ids) in enumerate(per_rank):
        for i in ids:
            owner.setdefault(i, rank)
    results = [r for rank, (res, _) in enumerate(per_rank) for r in res if owner[r["image_id"]] == rank]
    return results, sorted(owner)


# ---------------------------------------------------------------- CLI
def load_model_from_checkpoint(path: str, num_classes: int | None = None):
    from trainer import checkpoint as ckpt
    from trainer.checkpoint_reader import printable
    from trainer.model import build_model, shape_mismatches
    state, recipe, n, tensors = ckpt.load_trained(Path(path), num_classes)
    # the numbers above come from the file: the model is built for real only once a skeleton on the meta device
    # (no memory) has exactly the file's tensor shapes, so a crafted recipe or class count cannot make it huge
    what = f"the model built from its recipe ({printable(recipe.name)}, {printable(recipe.backbone)}, {n} classes)"
    with torch.device("meta"):
        skeleton = build_model(recipe, n).state_dict()
    wrong = shape_mismatches(skeleton, tensors)
    if wrong:
        k = wrong[0]
        got = tuple(tensors[k].shape) if torch.is_tensor(tensors.get(k)) else "nothing"
        raise ckpt.CheckpointError(f"{path}: checkpoint does not match {what}: {len(wrong)} tensors differ, e.g. "
                                   f"{k}: the file has {got}, the model needs {tuple(skeleton[k].shape)}")
    model = build_model(recipe, n)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path}: checkpoint does not match {what}: {printable(e, 200)} ...") from e
    return model, recipe, state


def check_classes(path: str, state: dict, split: ds.CocoSplit) -> None:
    """Labels map to the dataset's categories in id order (as mmdetection's and torchvision's COCO models
    number them): a different count is an error, different names (imported checkpoints record them) a warning."""
    n = state.get("num_classes")
    if n is not None and n != split.num_classes:
        raise ValueError(f"{path}: the model has {n - 1} classes, {split.annotations} has {split.num_classes - 1} "
                         "categories")
    names = state.get("class_names")
    if names and list(names) != list(split.cat_names):
        diff = next(i for i, (x, y) in enumerate(zip(names, split.cat_names)) if x != y)
        log.warning("%s: class %d is %r in the checkpoint, %r in the dataset (labels follow category-id order)",
                    path, diff + 1, names[diff], split.cat_names[diff])


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    p = cli.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by trainer.run")
    src.add_argument("--results", help="an existing COCO results JSON to score (no model)")
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic demo dataset, as trainer.run trains on)")
    p.add_argument("--split", default="val2017")
    cli.add_dataset_flag(p, default=None)  # None: the checkpoint's (coco for --results)
    p.add_argument("--out", default=None, help="folder for results.json and metrics.json")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--batch-size", type=cli.COUNT, default=4, help="images per batch per process")
    p.add_argument("--resize", choices=RESIZE_METHODS, default=None,
                   help="test-time resize filter (default: the checkpoint recipe's): antialias = DALI's linear, "
                        "antialiased when shrinking; opencv = bilinear without antialiasing, as mmdetection's test "
                        "(docs/checkpoints.md)")
    p.add_argument("--scorer", choices=SCORERS, default=DEFAULT_SCORER,
                   help=f"COCOeval implementation (default {DEFAULT_SCORER}; pycocotools: the reference, slower)")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = load_model_from_checkpoint(a.checkpoint) if a.checkpoint else None  # a bad file: before any work
    if a.dataset is None:  # the dataset kind the checkpoint's run trained on (coco for results files)
        a.dataset = ((loaded[2].get("config") or {}).get("resolved", {}).get("dataset_kind", "coco")
                     if loaded else "coco")
    split = ds.resolve(a.coco_root, a.split, a.dataset, demo=True)
    sc = scoring(a.dataset, a.scorer)
    if a.results:
        gt = sc.load_ground_truth(split.annotations)
        results = read_results(a.results)
        validate_results(results, gt, a.results)
        metrics = sc.score(gt, results)
        if a.out:
            from dali_scp.files import atomic_write
            Path(a.out).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(a.out) / "metrics.json", json.dumps(metrics, indent=1))
        print(sc.format_table(metrics))
        return 0
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = dist_utils.init(device)
    model, recipe, state = loaded
    check_classes(a.checkpoint, state, split)
    model.to(device)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / f"eval_{a.split}"
    resize = replace(recipe.eval_resize, method=a.resize or recipe.eval_resize.method)
    metrics, _ = evaluate_model(model, split, resize, device, a.batch_size, d, out, scorer=a.scorer)
    if d.is_main:
        print(sc.format_table(metrics))
        print(f"results and metrics written to {out}")
    dist_utils.cleanup(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
