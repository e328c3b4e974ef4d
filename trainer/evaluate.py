"""COCO evaluation: box AP and mask AP with pycocotools' COCOeval, the numbers of the target table.

    python -m trainer.evaluate --checkpoint RUN/ckpt_00090000.pth [--coco-root DIR] [--split val2017]
    python -m trainer.evaluate --results results.json [--coco-root DIR]   # score results from elsewhere
    python -m trainer.evaluate --checkpoint CKPT --coco-root DIR --dataset lvis  # LVIS's federated AP

Images go through a DALI evaluation pipeline (decode, resize keeping aspect as the recipe says -
mmdetection tests at 1333x800 - pad, no augmentation). Boxes are mapped back to the original image,
masks are pasted back at the original resolution and thresholded at 0.5, RLE-encoded, labels mapped
back to the dataset's category ids. An image annotated on its EXIF-oriented view (the dataset check
marks it) gets its boxes and masks mapped from the stored pixels the model saw into that frame. Scores
are against the original annotation file (crowd regions, RLE objects as they are); annotation ids are
renumbered for COCOeval when one is 0 (``load_ground_truth``). Under torchrun every rank scores its
shard of the images and rank 0 gathers and scores; each image is scored exactly once.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from dali_scp import dataset as ds
from dali_scp import orientation
from dali_scp.rle import rle_runs
from trainer import distributed as dist_utils
from trainer.model import inference

log = logging.getLogger("evaluate")
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


# ---------------------------------------------------------------- results
def detections_to_results(image_id: int, det: dict, label_to_cat: np.ndarray, with_masks: bool = True,
                          orient: tuple | None = None) -> list:
    """One image's detections at the *original* resolution (boxes xyxy, scores, contiguous labels,
    masks [N, 1, H, W] probabilities) -> COCO result entries (bbox xywh, RLE segmentation).
    ``orient`` = (EXIF tag, stored width, stored height) for an image annotated in its oriented frame
    while the model saw stored pixels (``dali_scp.orientation``): boxes and masks are mapped into the
    annotation's frame."""
    boxes = det["boxes"].detach().cpu().numpy().astype(np.float64)
    scores = det["scores"].detach().cpu().numpy()
    cats = label_to_cat[det["labels"].detach().cpu().numpy()]
    rles = []
    if orient is not None and len(boxes):
        boxes = orientation.to_oriented_boxes(boxes, *orient)
    if with_masks and "masks" in det and len(boxes):
        m = (det["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        if orient is not None:
            m = orientation.to_oriented_array(m, orient[0])
        rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
    out = []
    for i in range(len(boxes)):
        x0, y0, x1, y1 = boxes[i]
        r = dict(image_id=int(image_id), category_id=int(cats[i]), score=round(float(scores[i]), 5),
                 bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)])
        if rles:
            seg = dict(rles[i])
            seg["counts"] = seg["counts"].decode("ascii")
            r["segmentation"] = seg
        out.append(r)
    return out


def validate_results(results, gt: COCO, source: str = "results") -> None:
    """Clear errors naming the entry, instead of a KeyError inside pycocotools."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a JSON list of result entries, got {type(results).__name__}")
    imgs, cats = gt.imgs, set(gt.getCatIds())
    for i, r in enumerate(results):
        where = f"{source}: entry {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: not an object")
        iid = r.get("image_id")
        if not isinstance(iid, int) or isinstance(iid, bool):
            raise ValueError(f"{where}: image_id {iid!r} is not an integer")
        if iid not in imgs:
            raise ValueError(f"{where}: image_id {iid} is not in the ground truth")
        where += f" (image {iid})"
        if r.get("category_id") not in cats:
            raise ValueError(f"{where}: category_id {r.get('category_id')!r} is not in the ground truth")
        s = r.get("score")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not np.isfinite(s):
            raise ValueError(f"{where}: score {s!r} is not a finite number")
        if "bbox" in r:
            b = r["bbox"]
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)) or b[2] < 0 or b[3] < 0:
                raise ValueError(f"{where}: bbox {b!r} is not [x, y, w, h] with w, h >= 0")
        if "segmentation" in r:
            seg = r["segmentation"]
            h, w = imgs[iid]["height"], imgs[iid]["width"]
            if not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
                raise ValueError(f"{where}: segmentation is not an RLE dict with 'size' and 'counts'")
            if list(seg["size"]) != [h, w]:
                raise ValueError(f"{where}: RLE size {seg['size']} differs from the image's [{h}, {w}]")
            counts = seg["counts"]
            try:
                runs = counts if isinstance(counts, list) else rle_runs(counts)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: malformed RLE ({e})") from e
            if any((not isinstance(x, int)) or x < 0 for x in runs) or sum(runs) != h * w:
                raise ValueError(f"{where}: malformed RLE (runs cover {sum(runs) if runs else 0} pixels, "
                                 f"the image has {h * w})")
        if "bbox" not in r and "segmentation" not in r:
            raise ValueError(f"{where}: has neither bbox nor segmentation")


def load_ground_truth(path) -> COCO:
    """pycocotools' COCO for ``path``, with errors naming the file. Annotation ids are renumbered
    1..N (logged) when any is 0, negative, missing or repeated: COCOeval stores the matched id per
    detection and reads 0 as "unmatched" (a correct detection of an id-0 object counts as a false
    positive), and a repeated id makes one object stand in for another. Results files carry no ids,
    so nothing else changes; files with positive unique ids are loaded exactly as pycocotools does."""
    try:
        doc = json.loads(Path(path).read_text())
        anns = doc["annotations"]
        ids = [a.get("id") for a in anns]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from e
    ok = all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
    if not ok or len(set(ids)) != len(ids):
        why = ("an annotation id is 0" if 0 in ids else "annotation ids are not positive unique integers")
        log.info("%s: %s; ground-truth annotation ids renumbered 1..%d for COCOeval (it reads id 0 as "
                 "'unmatched')", path, why, len(anns))
        doc["annotations"] = [dict(a, id=k + 1) for k, a in enumerate(anns)]
    gt = COCO()
    gt.dataset = doc
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from e
    return gt


def score(gt: COCO, results: list, iou_types=("bbox", "segm"), verbose: bool = False) -> dict:
    """COCOeval per type; returns {type: {stat name: value}}. Each type gets its own copy of the
    results (segm without bbox, so mask areas define small/medium/large, as detectron2 does)."""
    metrics = {}
    for t in iou_types:
        key = "bbox" if t == "bbox" else "segmentation"
        res = [dict(r) for r in results if key in r]
        if not res:
            continue
        if t == "segm":
            for r in res:
                r.pop("bbox", None)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink if not verbose else sys.stdout):
            dt = gt.loadRes(res)
            ev = COCOeval(gt, dt, t)
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


def scoring(dataset: str = "coco") -> Scoring:
    if dataset == "lvis":
        from trainer import lvis_eval
        return Scoring(lvis_eval.load_ground_truth, lvis_eval.score, lvis_eval.format_table, lvis_eval.STAT_NAMES)
    return Scoring(load_ground_truth, score, format_table, STAT_NAMES)


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
        images = batch.images.to(device)
        imgs = [images[i, : g.valid_h, : g.valid_w].permute(2, 0, 1) for i, g in enumerate(batch.geometry)]
        dets = inference(model, imgs, batch.orig_sizes)
        for iid, (h, w), det in zip(batch.image_ids, batch.orig_sizes, dets):
            scored.append(iid)
            o = (orient[iid], w, h) if iid in orient else None
            results += detections_to_results(iid, det, l2c, orient=o)
    return results, scored


def evaluate_model(model, split: ds.CocoSplit, resize, device: str, batch_size: int, d: dist_utils.Dist,
                   out_dir: Path | None = None, progress: bool = True):
    """Distributed-aware: returns (metrics, ids of the scored images) on rank 0, (None, None) elsewhere.
    Fails loudly if an image of the split was not scored exactly once."""
    from dali_scp.check import checked_annotations
    ann, _ = checked_annotations(split.annotations, split.images_dir, progress=progress)
    mine = predict(model, split, resize, device, batch_size, d, progress and d.is_main, annotations=str(ann))
    gathered = dist_utils.gather_objects(d, mine)
    if not d.is_main:
        return None, None
    results, scored = merge_rank_results(gathered)
    sc = scoring(split.dataset)
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
    from dali_scp.presets import Recipe
    from trainer import checkpoint as ckpt
    from trainer.model import build_model
    state = ckpt.load(Path(path))
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise ckpt.CheckpointError(f"{path}: not a dali-scp checkpoint (expected keys 'model' and 'recipe')")
    try:
        recipe = Recipe.from_dict(state["recipe"])
    except (TypeError, KeyError) as e:
        raise ckpt.CheckpointError(f"{path}: its recipe is not one this version reads ({e})") from e
    n = state.get("num_classes", num_classes)
    model = build_model(recipe, n)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path}: checkpoint does not match the model built from its recipe "
                         f"({recipe.name}, {recipe.backbone}, {n} classes): {str(e).splitlines()[0]} ...") from e
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
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by trainer.run")
    src.add_argument("--results", help="an existing COCO results JSON to score (no model)")
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic dataset)")
    p.add_argument("--split", default="val2017")
    cli.add_dataset_flag(p)
    p.add_argument("--out", default=None, help="folder for results.json and metrics.json")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch per process")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    split = ds.resolve(a.coco_root, a.split, a.dataset)
    sc = scoring(a.dataset)
    if a.results:
        gt = sc.load_ground_truth(split.annotations)
        try:
            results = json.loads(Path(a.results).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{a.results}: cannot read results JSON ({e})") from e
        validate_results(results, gt, a.results)
        metrics = sc.score(gt, results)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(sc.format_table(metrics))
        return 0
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = dist_utils.init(device)
    model, recipe, state = load_model_from_checkpoint(a.checkpoint)
    check_classes(a.checkpoint, state, split)
    model.to(device)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / f"eval_{a.split}"
    metrics, _ = evaluate_model(model, split, recipe.eval_resize, device, a.batch_size, d, out)
    if d.is_main:
        print(sc.format_table(metrics))
        print(f"results and metrics written to {out}")
    dist_utils.cleanup(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
