"""The picture at the end of an evaluated run: a few val images, ground truth next to the model's
predictions (masks, boxes, class names and scores), drawn with the visualiser's helpers.

Why from the results file: evaluation has already run the model, mapped boxes back and pasted the masks at
the original resolution; drawing those same COCO results (no second inference, no second resize) shows
exactly what COCOeval scored, and costs well under a second for a handful of images.

    python -m trainer.showcase --results RUN/eval_val2017/results.json [--coco-root DIR] --out pic.png
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from pipelines.outputs import Geometry

SCORE_THR = 0.5  # predictions drawn: score >= this (COCOeval scores all of them)


def pick_images(gt, n: int) -> list:
    """The first ``n`` images (by id) that have at least one non-crowd object: deterministic, so runs
    with different recipes show the same images."""
    ids = [i for i in sorted(gt.imgs) if any(not a.get("iscrowd", 0) for a in gt.imgToAnns.get(i, []))]
    return ids[:n]


def _load(images_dir: Path, info: dict) -> np.ndarray:
    from dali_scp.lvis import image_file
    im = Image.open(images_dir / image_file(info))
    if im.size != (info["width"], info["height"]):  # annotated in the EXIF-oriented frame
        im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"))


def _square(img: np.ndarray, masks: np.ndarray):
    """Pad bottom/right to a square (the visualiser's tile layout; the padding is hatched)."""
    h, w = img.shape[:2]
    s = max(h, w)
    sq = np.zeros((s, s, 3), np.uint8)
    sq[:h, :w] = img
    m = np.zeros((len(masks), s, s), np.uint8)
    m[:, :h, :w] = masks
    return sq, m, Geometry(scale=1.0, valid_h=h, valid_w=w, flipped=False)


def _tile(img, masks, boxes_xywh, names, tile):
    from pipelines.visualize import render_sample
    sq, m, geometry = _square(img, masks)
    b = np.array(boxes_xywh, np.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    target = dict(masks=m, boxes=b, labels=np.arange(len(b)), pasted=np.zeros(len(b), bool), geometry=geometry)
    return render_sample(sq, target, lambda i: names[i], tile)


def render(gt, images_dir: Path, results: list, image_ids: list, score_thr: float = SCORE_THR,
           tile: int = 320, per_row: int = 2) -> Image.Image:
    """Rows of (ground truth | predictions) pairs, ``per_row`` images per row."""
    from pycocotools import mask as mask_utils
    by_img: dict = {}
    for r in results:
        if r["score"] >= score_thr:
            by_img.setdefault(r["image_id"], []).append(r)
    cat_name = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    header = 22
    rows = (len(image_ids) + per_row - 1) // per_row
    grid = Image.new("RGB", (2 * per_row * tile, max(rows, 1) * (tile + header)), (25, 25, 25))
    draw = ImageDraw.Draw(grid)
    for k, iid in enumerate(image_ids):
        info = gt.imgs[iid]
        img = _load(images_dir, info)
        h, w = img.shape[:2]
        anns = [a for a in gt.imgToAnns.get(iid, []) if not a.get("iscrowd", 0)]
        gt_masks = np.array([gt.annToMask(a) for a in anns], np.uint8).reshape(-1, h, w)
        dets = sorted(by_img.get(iid, []), key=lambda r: -r["score"])
        if dets and all("segmentation" in r for r in dets):
            rles = [dict(r["segmentation"], counts=r["segmentation"]["counts"].encode("ascii"))
                    if isinstance(r["segmentation"]["counts"], str) else r["segmentation"] for r in dets]
            pred_masks = mask_utils.decode(rles).transpose(2, 0, 1)
        else:
            pred_masks = np.zeros((len(dets), h, w), np.uint8)
        x, y = (k % per_row) * 2 * tile, (k // per_row) * (tile + header)
        grid.paste(_tile(img, gt_masks, [a["bbox"] for a in anns], [cat_name[a["category_id"]] for a in anns],
                         tile), (x, y + header))
        grid.paste(_tile(img, pred_masks, [r["bbox"] for r in dets],
                         [f"{cat_name[r['category_id']]} {r['score']:.2f}" for r in dets], tile),
                   (x + tile, y + header))
        draw.text((x + 4, y + 5), f"image {iid}: ground truth, {len(anns)} objects", fill=(230, 230, 230))
        draw.text((x + tile + 4, y + 5), f"predicted: {len(dets)} with score >= {score_thr:g}",
                  fill=(230, 230, 230))
    return grid


def write_picture(annotations, images_dir, results, out, n: int = 4, score_thr: float = SCORE_THR,
                  tile: int = 320) -> Path:
    """Draw ``n`` val images (ground truth | predictions) from COCO ``results`` (a list or a JSON file)
    into the PNG ``out``; returns its path."""
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
    if not isinstance(results, list):
        results = json.loads(Path(results).read_text())
    grid = render(gt, Path(images_dir), results, pick_images(gt, n), score_thr, tile)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def after_evaluation(split, run_dir, n: int = 4) -> Path | None:
    """The trainer's last step: draw the picture from ``run_dir/eval_<split>/results.json`` into
    ``run_dir/predictions_<split>.png`` and print where it is. A picture that cannot be drawn is a
    warning, never the end of a finished run."""
    import logging
    run_dir = Path(run_dir)
    out = run_dir / f"predictions_{split.split}.png"
    try:
        write_picture(split.annotations, split.images_dir, run_dir / f"eval_{split.split}" / "results.json", out, n)
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
        logging.getLogger("trainer").warning("could not draw the predictions picture: %s", e)
        return None
    print(f"\nground truth | predictions (score >= {SCORE_THR:g}) on {n} {split.split} images: {out}")
    return out


def main(argv=None) -> int:
    from dali_scp import cli, dataset as ds
    p = cli.ArgumentParser(prog="python -m trainer.showcase", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="COCO results JSON (e.g. RUN/eval_val2017/results.json)")
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic demo dataset, as trainer.run trains on)")
    p.add_argument("--split", default="val2017")
    cli.add_dataset_flag(p)
    p.add_argument("--num", type=cli.COUNT, default=4, help="images to draw (default 4)")
    p.add_argument("--score-thr", type=cli.FRACTION, default=SCORE_THR, help=f"draw predictions >= this (default {SCORE_THR})")
    p.add_argument("--tile", type=cli.PIXELS, default=320, help="tile size in px")
    p.add_argument("--out", required=True, help="output PNG")
    a = p.parse_args(argv)
    try:
        split = ds.resolve(a.coco_root, a.split, a.dataset, demo=True)
        out = write_picture(split.annotations, split.images_dir, a.results, a.out, a.num, a.score_thr, a.tile)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
