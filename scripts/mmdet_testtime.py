"""``trainer.evaluate`` against mmdetection's own test of the same weights on the same images: the table in
docs/checkpoints.md ("The test-time path against mmdetection's test") and the small reference that
tests/test_testtime.py reads.

    python scripts/mmdet_testtime.py all --work /tmp/testtime     # every step below, then the table
    /work/venvs/mmdet/bin/python scripts/mmdet_testtime.py reference   # rewrites tests/data/mmdet_testtime.npz

Steps (``all`` runs them, skipping those whose output exists; ``MMDET_PY`` is the side venv's python,
default /work/venvs/mmdet/bin/python; side-venv steps run niced, one thread):

1. ``data`` (either env): a synthetic set (``dali_scp.synthetic``'s images, its demo's four shapes) whose
   images come in twelve sizes and aspect ratios, from 240 x 320 to 2000 x 1200 (larger than 1333 x 800 and
   smaller), 8 training and 2 validation images each, objects drawn at 12-48 px radius in the 1333 x 800
   test frame.
2. ``train`` (side venv; 52 min for 1000 iterations here, niced on 2 shared cores): the seed config's model, narrowed
   as ``scripts/mmdet_reference.py`` narrows it (ResNet-50 kept, 32-channel FPN and heads, 4 classes),
   trained from scratch with mmengine's Runner on 192-px crops at the test-time scale, batch 2, AdamW, so it
   detects something. The checkpoint is re-saved as plain ``{meta, state_dict}`` (what
   ``trainer.import_weights`` reads).
3. ``test`` (side venv): mmdetection's test - its test pipeline (``LoadImageFromFile`` with OpenCV,
   ``Resize(scale=(1333, 800), keep_ratio=True)``, ``PackDetInputs``), batch 1, ``CocoMetric`` (bbox, segm),
   its result files kept. With ``--images NPZ`` image loading and resize are replaced by the pixels in the
   file (the same resized tensors ours saw), everything else unchanged.
4. ours (main env): ``trainer.import_weights``, then ``trainer.evaluate --checkpoint --batch-size 1`` with
   each ``--resize``; ``ours-on-pixels`` runs our model on mmdetection's resized pixels (``mmdet-pixels``,
   side venv, which also compares DALI's JPEG decoding with OpenCV's); ``dali-pixels`` saves ours.
5. ``compare``: AP of every run (pycocotools, one scorer for all), detections matched one to one per
   image (``match``), box and mask IoU distributions, and the table (comparison.json beside it).

mmcv-lite has no compiled kernels: nms and RoIAlign are stood in by torchvision's as in
``scripts/mmdet_reference.py`` (training uses mmcv's ``RoIAlign(use_torchvision=True)``, the same
computation with a backward).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MMDET_PY = os.environ.get("MMDET_PY", "/work/venvs/mmdet/bin/python")
# (w, h): larger than 1333 x 800 (shrunk), smaller (enlarged), exactly 1333 x 800, portrait, very wide / tall
SIZES = [(1600, 1000), (2000, 1200), (1920, 1080), (1024, 1024), (1333, 800), (640, 480), (480, 640),
         (427, 640), (320, 240), (240, 320), (900, 300), (500, 1500)]
TEST_SCALE = (1333, 800)
RADIUS = (12, 48)  # object radius range in the 1333 x 800 test frame, px (what a 192-px crop holds)
TRAIN_PER_SIZE, VAL_PER_SIZE = 8, 2
CROP = 192
BATCH = int(os.environ.get("TESTTIME_BATCH", 2))
LOG_EVERY = int(os.environ.get("TESTTIME_LOG_EVERY", 10))
# one thread: on a shared, oversubscribed CPU two OpenMP threads wait on each other at every barrier
THREADS = int(os.environ.get("TESTTIME_THREADS", 1))


def fit_scale(w: int, h: int, long_side: int = TEST_SCALE[0], short_side: int = TEST_SCALE[1]) -> float:
    return min(long_side / max(w, h), short_side / min(w, h))


# ------------------------------------------------------------------ 1. data
def make_data(out: Path, seed: int = 0) -> Path:
    from dali_scp.files import atomic_write
    from dali_scp.synthetic import DEMO_CATEGORIES, draw_images
    for split, per_size, first in (("train2017", TRAIN_PER_SIZE, 1), ("val2017", VAL_PER_SIZE, 1000)):
        images, anns = [], []
        for k, (w, h) in enumerate(SIZES):
            s = fit_scale(w, h)
            im, an = draw_images(out, split, per_size, seed * 1000 + first + k, first + k * per_size,
                                 categories=DEMO_CATEGORIES, aspects=[(w, h)],
                                 size_classes=[((RADIUS[0] / s, RADIUS[1] / s), 1.0)], max_objects=6,
                                 empty_prob=0.0, crowd_prob=0.0)
            images += im
            anns += an
        doc = dict(info=dict(description="scripts/mmdet_testtime.py: sizes around 1333 x 800"), licenses=[],
                   images=images, annotations=anns,
                   categories=[dict(id=c, name=n, supercategory="synthetic") for c, n in DEMO_CATEGORIES])
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        atomic_write(out / "annotations" / f"instances_{split}.json", json.dumps(doc))
    return out


def class_names(data: Path) -> tuple:
    doc = json.loads((data / "annotations" / "instances_val2017.json").read_text())
    return tuple(c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"]))


# ------------------------------------------------------------------ 2./3. mmdetection side (side venv)
def mmdet_config(data: Path, work: Path):
    """The seed config, narrowed as scripts/mmdet_reference.py narrows it, for this data set."""
    import mmdet_reference as ref  # scripts/ is sys.path[0]: this file runs as a script
    cfg, _ = ref.build_mmdet_model()  # installs the kernel stand-ins; narrows cfg.model in place
    classes = class_names(data)
    for head in (cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head):
        head.num_classes = len(classes)
    cfg.work_dir = str(work)
    cfg.default_scope = "mmdet"
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork"), dist_cfg=dict(backend="gloo"))
    cfg.launcher = "none"
    cfg.randomness = dict(seed=0)
    metainfo = dict(classes=classes)
    cfg.test_dataloader = dict(
        batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dict(type="CocoDataset", data_root=str(data), ann_file="annotations/instances_val2017.json",
                     data_prefix=dict(img="val2017/"), test_mode=True, metainfo=metainfo,
                     pipeline=list(cfg.test_pipeline)))
    cfg.test_evaluator = dict(type="CocoMetric", ann_file=str(data / "annotations" / "instances_val2017.json"),
                              metric=["bbox", "segm"], format_only=False)
    return cfg, metainfo


def mmdet_train(data: Path, work: Path, iters: int, lr: float) -> Path:
    import torch
    from mmengine.runner import Runner
    cfg, metainfo = mmdet_config(data, work)
    for key in ("bbox_roi_extractor", "mask_roi_extractor"):  # a backward: torchvision's roi_align via mmcv
        cfg.model.roi_head[key].roi_layer.use_torchvision = True
    cfg.model.backbone.frozen_stages = 1  # stem and layer 1 stay as initialised: a third less backward work
    cfg.model.data_preprocessor.batch_augments = None  # the seed pads every training batch to 1024 x 1024
    cfg.train_dataloader = dict(
        batch_size=BATCH, num_workers=0, persistent_workers=False, sampler=dict(type="InfiniteSampler", shuffle=True),
        dataset=dict(type="CocoDataset", data_root=str(data), ann_file="annotations/instances_train2017.json",
                     data_prefix=dict(img="train2017/"), metainfo=metainfo, filter_cfg=dict(filter_empty_gt=True),
                     pipeline=[dict(type="LoadImageFromFile"),
                               dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
                               dict(type="RandomResize", scale=TEST_SCALE, ratio_range=(0.8, 1.25), keep_ratio=True),
                               dict(type="RandomCrop", crop_type="absolute", crop_size=(CROP, CROP),
                                    recompute_bbox=True, allow_negative_crop=False),
                               dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
                               dict(type="RandomFlip", prob=0.5),
                               dict(type="PackDetInputs")]))
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1)
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=lr, weight_decay=1e-4),
                             clip_grad=dict(max_norm=10.0))
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=50),
                           dict(type="MultiStepLR", by_epoch=False, begin=0, end=iters,
                                milestones=[int(iters * 0.8)], gamma=0.1)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=min(iters, 100))
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=LOG_EVERY)
    cfg.log_processor = dict(by_epoch=False)
    cfg.load_from, cfg.resume = None, False
    torch.set_num_threads(THREADS)
    runner = Runner.from_cfg(cfg)
    runner.train()
    out = work / "narrow_trained.pth"  # what trainer.import_weights reads: plain meta + state_dict
    sd = {k: v.detach().cpu() for k, v in runner.model.state_dict().items()}
    torch.save(dict(meta=dict(dataset_meta=dict(classes=list(metainfo["classes"])), iter=iters), state_dict=sd), out)
    print(f"wrote {out}")
    return out


def _register_resized_loader(images_npz: Path):
    """A transform that hands mmdetection the pixels in ``images_npz`` (RGB, already resized) as if
    ``LoadImageFromFile`` + ``Resize`` had made them: img (BGR, as OpenCV reads), img_shape, ori_shape,
    scale_factor (new / old per axis, as ``Resize`` sets it)."""
    from mmcv.transforms import BaseTransform
    from mmdet.registry import TRANSFORMS
    z = np.load(images_npz)

    @TRANSFORMS.register_module(force=True)
    class LoadResizedPixels(BaseTransform):
        def transform(self, results):
            iid = results["img_id"]
            img = z[f"img{iid}"][..., ::-1].copy()
            h, w = int(results["height"]), int(results["width"])
            nh, nw = img.shape[:2]
            results.update(img=img, img_shape=(nh, nw), ori_shape=(h, w), scale_factor=(nw / w, nh / h),
                           keep_ratio=True)
            return results


def mmdet_test(data: Path, checkpoint: Path, out: Path, images: Path | None = None) -> dict:
    import torch
    from mmengine.runner import Runner
    out.mkdir(parents=True, exist_ok=True)
    cfg, _ = mmdet_config(data, out / "work")
    if images is not None:
        _register_resized_loader(images)
        pipe = cfg.test_dataloader.dataset.pipeline
        kept = [t for t in pipe if t["type"] not in ("LoadImageFromFile", "Resize")]
        cfg.test_dataloader.dataset.pipeline = [dict(type="LoadResizedPixels")] + kept
    cfg.test_evaluator.outfile_prefix = str(out / "mmdet")
    cfg.load_from = str(checkpoint)
    torch.set_num_threads(THREADS)
    metrics = Runner.from_cfg(cfg).test()
    metrics = {k: float(v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))
    return metrics


def mmdet_pixels(data: Path, out_npz: Path) -> dict:
    """(side venv) The pixels mmdetection's test pipeline feeds its model: its own ``LoadImageFromFile``
    (OpenCV) and ``Resize(scale=(1333, 800), keep_ratio=True)``, saved RGB. Also how DALI's CPU decoder
    differs from OpenCV's on the same files, before any resize (returned, and written beside the file)."""
    import mmdet_reference
    mmdet_reference._stand_in_kernels()  # mmdet.datasets imports mmcv's ops
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets.transforms import Resize
    from nvidia.dali import fn, pipeline_def, types
    load, resize = LoadImageFromFile(), Resize(scale=TEST_SCALE, keep_ratio=True)
    images = json.loads((data / "annotations" / "instances_val2017.json").read_text())["images"]
    out, diffs = {}, []
    for im in images:
        path = data / "val2017" / im["file_name"]
        r = load(dict(img_path=str(path)))
        bgr = r["img"]

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def dali_decode():
            return fn.decoders.image(fn.readers.file(files=[str(path)])[0], device="cpu", output_type=types.RGB,
                                     adjust_orientation=False)
        pipe = dali_decode()
        pipe.build()
        rgb = np.asarray(pipe.run()[0][0])
        diffs.append(np.abs(rgb.astype(int) - bgr[..., ::-1]).max())
        out[f"img{im['id']}"] = resize(r)["img"][..., ::-1].copy()
    np.savez(out_npz, **out)
    decode = dict(images=len(images), max_abs_diff=int(max(diffs)), identical=int(sum(d == 0 for d in diffs)))
    out_npz.with_suffix(".decode.json").write_text(json.dumps(decode))
    print(f"wrote {out_npz}; DALI vs OpenCV decoding: {decode}")
    return decode


# ------------------------------------------------------------------ 4. ours (main env)
def dali_pixels(data: Path, out_npz: Path, method: str) -> None:
    """The pixels ``trainer.evaluate``'s pipeline feeds the model (``--resize method``), saved RGB."""
    from dali_scp.dataset import resolve
    from dali_scp.presets import EvalResize
    from pipelines.iterator import EvalLoader
    out = {}
    for b in EvalLoader(resolve(data, "val2017"), EvalResize(method=method), batch_size=1):
        g = b.geometry[0]
        out[f"img{b.image_ids[0]}"] = b.images[0, :g.valid_h, :g.valid_w].numpy()
    np.savez(out_npz, **out)


def ours_on_pixels(checkpoint: Path, data: Path, pixels: Path, out: Path) -> None:
    """Our model (``trainer.model.inference``, ``trainer.evaluate.detections_to_results``) on given
    resized pixels, one image at a time; results.json as ``trainer.evaluate`` writes it."""
    import torch
    from dali_scp.dataset import resolve
    from trainer.evaluate import detections_to_results, load_model_from_checkpoint
    from trainer.model import inference
    model, _, _ = load_model_from_checkpoint(str(checkpoint))
    model.eval()
    split = resolve(data, "val2017")
    z = np.load(pixels)
    results = []
    with torch.no_grad():
        for im in json.loads(split.annotations.read_text())["images"]:
            img = torch.from_numpy(z[f"img{im['id']}"]).permute(2, 0, 1)
            det = inference(model, [img], [(im["height"], im["width"])])[0]
            results += detections_to_results(im["id"], det, split.label_to_cat())
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))


# ------------------------------------------------------------------ 5. compare
def mmdet_results(folder: Path) -> list:
    """CocoMetric's two files -> one list of entries with bbox and segmentation (same detections, same order)."""
    boxes = json.loads((folder / "mmdet.bbox.json").read_text())
    segms = json.loads((folder / "mmdet.segm.json").read_text())
    assert len(boxes) == len(segms)
    return [dict(b, segmentation=s["segmentation"]) for b, s in zip(boxes, segms)]


def box_iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax1, bx1) - max(a[0], b[0])), max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match(ref: list, other: list, min_score: float = 0.0) -> dict:
    """One to one, per image: ``ref``'s detections by descending score each take the unmatched detection of
    ``other`` with the same label and the highest box IoU (>= 0.5). Box / mask IoU and score differences of
    the pairs; the unmatched of each side; how many of ``ref``'s best-overlapping partners have another label."""
    from collections import defaultdict
    from pycocotools import mask as mask_utils
    by_img = defaultdict(lambda: ([], []))
    for r in ref:
        if r["score"] >= min_score:
            by_img[r["image_id"]][0].append(r)
    for r in other:
        if r["score"] >= min_score:
            by_img[r["image_id"]][1].append(r)
    box_ious, mask_ious, dscore, other_label = [], [], [], 0
    unmatched_ref = unmatched_other = 0
    for a_list, b_list in by_img.values():
        used = set()
        for a in sorted(a_list, key=lambda r: -r["score"]):
            best, best_iou, best_any = None, 0.5, (0.0, None)
            for j, b in enumerate(b_list):
                iou = box_iou(a["bbox"], b["bbox"])
                if j not in used and iou > best_any[0]:
                    best_any = (iou, b)
                if j in used or b["category_id"] != a["category_id"]:
                    continue
                if iou >= best_iou:
                    best, best_iou = j, iou
            if best is None:
                unmatched_ref += 1
                other_label += best_any[1] is not None and best_any[0] >= 0.5
                continue
            used.add(best)
            b = b_list[best]
            box_ious.append(best_iou)
            dscore.append(abs(a["score"] - b["score"]))
            mask_ious.append(float(mask_utils.iou([a["segmentation"]], [b["segmentation"]], [0])[0, 0]))
        unmatched_other += len(b_list) - len(used)
    q = (lambda v: dict(min=float(np.min(v)), p5=float(np.percentile(v, 5)), median=float(np.median(v)))
         if v else None)
    return dict(pairs=len(box_ious), unmatched_ref=unmatched_ref, unmatched_other=unmatched_other,
                other_label=int(other_label), box_iou=q(box_ious), mask_iou=q(mask_ious),
                score_diff_max=float(max(dscore)) if dscore else None,
                score_diff_median=float(np.median(dscore)) if dscore else None)


def ap_of(data: Path, results: list) -> dict:
    """AP and the rest with pycocotools (``trainer.evaluate.score``), every result set the same way."""
    from trainer import evaluate as ev
    gt = ev.load_ground_truth(data / "annotations" / "instances_val2017.json", "pycocotools")
    return ev.score(gt, results, scorer="pycocotools")


RUNS = {  # name -> (what it is, where its results are)
    "mmdet": "mmdetection's test: OpenCV decode + resize, its model, CocoMetric",
    "mmdet_on_dali": "mmdetection's model on the pixels of trainer.evaluate --resize antialias",
    "ours_antialias": "trainer.evaluate --resize antialias (DALI decode, antialiased resize)",
    "ours_opencv": "trainer.evaluate --resize opencv (DALI decode, OpenCV's INTER_LINEAR bit for bit)",
    "ours_on_mmdet": "our model on mmdetection's pixels (OpenCV decode + resize)",
}


def load_run(work: Path, name: str) -> list:
    return mmdet_results(work / name) if name.startswith("mmdet") else json.loads((work / name / "results.json").read_text())


def compare(work: Path, data: Path) -> dict:
    runs = {n: load_run(work, n) for n in RUNS if (work / n).exists()}
    aps = {n: ap_of(data, r) for n, r in runs.items()}
    pairs = [("mmdet", n) for n in runs if n != "mmdet"] + [("ours_antialias", "mmdet_on_dali")]
    matches = {f"{a} vs {b}": {f"score>={s}": match(runs[a], runs[b], s) for s in (0.0, 0.2)}
               for a, b in pairs if a in runs and b in runs}
    cocometric = {n: json.loads((work / n / "metrics.json").read_text()) for n in runs if n.startswith("mmdet")}
    report = dict(aps=aps, matches=matches, cocometric=cocometric, detections={n: len(r) for n, r in runs.items()})
    if (work / "mmdet_pixels.decode.json").exists():
        report["decode"] = json.loads((work / "mmdet_pixels.decode.json").read_text())
    (work / "comparison.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict) -> str:
    aps = report["aps"]
    ref = aps["mmdet"]
    lines = ["| run | detections | box AP | Δ | mask AP | Δ | box AP50 | mask AP50 |", "|---|---|---|---|---|---|---|---|"]
    for n, m in aps.items():
        lines.append(f"| {n}: {RUNS[n]} | {report['detections'][n]} | {100 * m['bbox']['AP']:.2f} | "
                     f"{100 * (m['bbox']['AP'] - ref['bbox']['AP']):+.2f} | {100 * m['segm']['AP']:.2f} | "
                     f"{100 * (m['segm']['AP'] - ref['segm']['AP']):+.2f} | {100 * m['bbox']['AP50']:.2f} | "
                     f"{100 * m['segm']['AP50']:.2f} |")
    if {"ours_on_mmdet", "ours_antialias", "ours_opencv"} <= set(aps):
        d = {n: {t: 100 * (aps[n][t]["AP"] - ref[t]["AP"]) for t in ("bbox", "segm")} for n in aps}
        lines += ["", "| share of ours - mmdet (AP points) | box | mask |", "|---|---|---|"]
        for what, v in (
                ("model and paste (same pixels: ours_on_mmdet - mmdet)", d["ours_on_mmdet"]),
                ("antialiased resize and decoding (ours_antialias - ours_on_mmdet)",
                 {t: d["ours_antialias"][t] - d["ours_on_mmdet"][t] for t in d["mmdet"]}),
                ("opencv resize and decoding (ours_opencv - ours_on_mmdet)",
                 {t: d["ours_opencv"][t] - d["ours_on_mmdet"][t] for t in d["mmdet"]})):
            lines.append(f"| {what} | {v['bbox']:+.2f} | {v['segm']:+.2f} |")
    lines += ["", "| pair | scores | pairs | unmatched (first / second) | other label | box IoU min / p5 / median | "
              "mask IoU min / p5 / median | max score diff |", "|---|---|---|---|---|---|---|---|"]
    for pair, by_s in report["matches"].items():
        for s, m in by_s.items():
            f = (lambda d: "-" if d is None else f"{d['min']:.3f} / {d['p5']:.3f} / {d['median']:.4f}")
            lines.append(f"| {pair} | {s} | {m['pairs']} | {m['unmatched_ref']} / {m['unmatched_other']} | "
                         f"{m['other_label']} | {f(m['box_iou'])} | {f(m['mask_iou'])} | "
                         f"{'-' if m['score_diff_max'] is None else format(m['score_diff_max'], '.1e')} |")
    return "\n".join(lines)


def run_all(work: Path, iters: int, lr: float) -> None:
    """Every step, skipping those whose output exists; side-venv steps through MMDET_PY, niced."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(THREADS))
    me = ["nice", "-n", "10", sys.executable, __file__]
    side = ["nice", "-n", "10", MMDET_PY, __file__]
    data = work / "data"

    def step(out: Path, cmd: list) -> None:
        if not out.exists():
            print("+", " ".join(map(str, cmd)), flush=True)
            subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=ROOT)

    step(data / "annotations" / "instances_val2017.json", me + ["data", "--out", data])
    trained = work / "train" / "narrow_trained.pth"
    step(trained, side + ["train", "--data", data, "--work", work / "train", "--iters", iters, "--lr", lr])
    ours = work / "ours.pth"
    step(ours, [sys.executable, "-m", "trainer.import_weights", trained, "--out", ours, "--recipe", "r50_ssj_scp_90k"])
    step(work / "mmdet" / "metrics.json", side + ["test", "--data", data, "--checkpoint", trained, "--out", work / "mmdet"])
    for method in ("opencv", "antialias"):
        step(work / f"ours_{method}" / "metrics.json",
             ["nice", "-n", "10", sys.executable, "-m", "trainer.evaluate", "--checkpoint", ours, "--coco-root", data,
              "--batch-size", 1, "--resize", method, "--scorer", "pycocotools", "--out", work / f"ours_{method}"])
    step(work / "mmdet_pixels.npz", side + ["mmdet-pixels", "--data", data, "--out", work / "mmdet_pixels.npz"])
    step(work / "ours_on_mmdet" / "results.json", me + ["ours-on-pixels", "--checkpoint", ours, "--data", data,
                                                        "--pixels", work / "mmdet_pixels.npz",
                                                        "--out", work / "ours_on_mmdet"])
    step(work / "dali_pixels.npz", me + ["dali-pixels", "--data", data, "--out", work / "dali_pixels.npz"])
    step(work / "mmdet_on_dali" / "metrics.json", side + ["test", "--data", data, "--checkpoint", trained, "--out",
                                                          work / "mmdet_on_dali", "--images", work / "dali_pixels.npz"])
    compare(work, data)


# ------------------------------------------------------------------ the committed reference (side venv)
REF_OUT = ROOT / "tests" / "data" / "mmdet_testtime.npz"
REF_SCALE = (320, 192)               # a small test scale: the same code path as 1333 x 800, a test's budget
REF_SIZES = [(400, 262), (151, 97)]  # (w, h): shrunk to 293 x 192, enlarged to 299 x 192


def reference(out_path: Path = REF_OUT) -> None:
    """tests/test_testtime.py's reference: two JPEGs (one shrunk, one enlarged by the test resize at
    REF_SCALE), what mmdetection's test pipeline makes of them - OpenCV's decoded pixels, the resized
    pixels and their shape, and the detections of ``scripts/mmdet_reference.py``'s seeded model (its
    checkpoint, which the test rebuilds bit for bit) at the original size: boxes, scores, labels and the
    masks as RLE - from one batch of both (padded together, as ours are)."""
    import io
    import torch
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate
    from PIL import Image
    from pycocotools import mask as mask_utils
    from dali_scp.synthetic import CATEGORIES, make_image
    import mmdet_reference as ref
    cfg, model = ref.build_mmdet_model()
    ref.seed_model(model)
    rng = np.random.default_rng(5)
    out, tmp = {}, Path(os.environ.get("TMPDIR", "/tmp")) / "mmdet_testtime_ref"
    tmp.mkdir(exist_ok=True)
    pipeline = Compose([dict(type="LoadImageFromFile"), dict(type="Resize", scale=REF_SCALE, keep_ratio=True),
                        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape",
                                                              "scale_factor"))])
    samples = []
    for i, (w, h) in enumerate(REF_SIZES):
        img, _ = make_image(rng, i, categories=CATEGORIES, aspects=[(w, h)], size_classes=[((8, 40), 1.0)],
                            max_objects=6, empty_prob=0.0, crowd_prob=0.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        path = tmp / f"{i:012d}.jpg"
        path.write_bytes(buf.getvalue())
        out[f"jpeg{i}"] = np.frombuffer(buf.getvalue(), np.uint8)
        s = pipeline(dict(img_path=str(path), img_id=i))
        samples.append(s)
        import mmcv
        out[f"decoded{i}"] = mmcv.imread(str(path))[..., ::-1]  # what LoadImageFromFile read, RGB
        out[f"resized{i}"] = s["inputs"].permute(1, 2, 0).numpy()[..., ::-1]  # what Resize made, RGB
    with torch.no_grad():
        results = model.test_step(pseudo_collate(samples))
    dets = []
    for i, r in enumerate(results):
        d = r.pred_instances
        rles = [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in d.masks]
        dets.append(dict(boxes=d.bboxes.tolist(), scores=d.scores.tolist(), labels=d.labels.tolist(),
                         masks=[dict(size=m["size"], counts=m["counts"].decode("ascii")) for m in rles],
                         ori_shape=list(r.ori_shape), img_shape=list(r.img_shape)))
        print(f"image {i}: {REF_SIZES[i]} -> {r.img_shape[::-1]}, {len(d)} detections, "
              f"top scores {np.round(d.scores[:3].numpy(), 4)}")
    out.update(rpn_ties_case(model))
    out.update(resize_cases())
    import cv2
    import mmdet
    out["info"] = np.array(json.dumps(dict(scale=REF_SCALE, sizes=REF_SIZES, detections=dets,
                                           versions=dict(mmdet=mmdet.__version__, opencv=cv2.__version__),
                                           model="scripts/mmdet_reference.py's seeded checkpoint (its digest)")))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e3:.0f} kB)")


def resize_cases() -> dict:
    """OpenCV's INTER_LINEAR (what mmcv.imrescale calls) on small random images: enlarged, shrunk, exactly
    halved (OpenCV switches to INTER_AREA there), one way in x and the other in y, one pixel wide."""
    import cv2
    rng = np.random.default_rng(11)
    sizes = [((17, 23), (40, 53)), ((31, 29), (19, 11)), ((24, 18), (12, 9)), ((9, 30), (21, 13)), ((1, 7), (3, 16)),
             ((20, 20), (20, 20)), ((13, 5), (29, 2)), ((25, 31), (37, 31))]
    out = {}
    for i, ((h, w), (oh, ow)) in enumerate(sizes):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out[f"cv_in{i}"], out[f"cv_out{i}"] = img, cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)
    return out


def rpn_ties_case(model) -> dict:
    """mmdetection's ``RPNHead.predict_by_feat`` (test config: 1000 per level, NMS 0.7, 1000 kept) on crafted
    outputs for a 160 x 224 input where thousands of anchors share the top score, as in a weakly trained
    RPN: which of them become proposals, and in which order, is decided by how the selection breaks ties."""
    import torch
    g = torch.Generator().manual_seed(3)
    h, w = 160, 224
    cls, reg = [], []
    for stride in (4, 8, 16, 32, 64):
        fh, fw = -(-h // stride), -(-w // stride)
        c = torch.randn(1, 3, fh, fw, generator=g) - 1.0
        c[..., : fh // 2 + 1, :] = 1.5  # the tie: every anchor in the upper half
        cls.append(c)
        reg.append(torch.randn(1, 12, fh, fw, generator=g) * 0.3)
    with torch.no_grad():
        (res,) = model.rpn_head.predict_by_feat(cls, reg, batch_img_metas=[dict(img_shape=(h, w), scale_factor=(1, 1))],
                                                cfg=model.test_cfg.rpn, rescale=False)
    out = {f"ties_cls{k}": c.numpy() for k, c in enumerate(cls)} | {f"ties_reg{k}": r.numpy() for k, r in enumerate(reg)}
    out.update(ties_boxes=res.bboxes.numpy(), ties_scores=res.scores.numpy())
    tied = int((res.scores == torch.tensor(1.5).sigmoid()).sum())
    print(f"rpn ties case: {len(res)} proposals, {tied} of them from anchors with the tied score")
    return out


# ------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    al = sub.add_parser("all", help="every step (main env; the side venv's through MMDET_PY), then the table")
    al.add_argument("--work", type=Path, required=True)
    d = sub.add_parser("data", help="the synthetic set of twelve sizes")
    d.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train", help="side venv: train the narrowed seed model")
    for q in (al, t):
        q.add_argument("--iters", type=int, default=1000)
        q.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--work", type=Path, required=True)
    s = sub.add_parser("test", help="side venv: mmdetection's test pipeline and CocoMetric")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--images", type=Path, default=None, help="resized pixels to use instead of load + resize")
    mp = sub.add_parser("mmdet-pixels", help="side venv: the pixels mmdetection's test pipeline makes")
    dp = sub.add_parser("dali-pixels", help="the pixels trainer.evaluate's pipeline makes")
    dp.add_argument("--method", default="antialias")
    op = sub.add_parser("ours-on-pixels", help="our model on given pixels")
    op.add_argument("--checkpoint", type=Path, required=True)
    op.add_argument("--pixels", type=Path, required=True)
    for q in (mp, dp, op):
        q.add_argument("--data", type=Path, required=True)
        q.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("reference", help=f"side venv: rewrite {REF_OUT.relative_to(ROOT)}")
    r.add_argument("--out", type=Path, default=REF_OUT, help=f"default {REF_OUT.relative_to(ROOT)}")
    c = sub.add_parser("compare", help="the table from a work folder")
    c.add_argument("--work", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "all":
        run_all(a.work, a.iters, a.lr)
    elif a.cmd == "data":
        make_data(a.out)
    elif a.cmd == "train":
        mmdet_train(a.data, a.work, a.iters, a.lr)
    elif a.cmd == "test":
        mmdet_test(a.data, a.checkpoint, a.out, a.images)
    elif a.cmd == "mmdet-pixels":
        mmdet_pixels(a.data, a.out)
    elif a.cmd == "dali-pixels":
        dali_pixels(a.data, a.out, a.method)
    elif a.cmd == "ours-on-pixels":
        ours_on_pixels(a.checkpoint, a.data, a.pixels, a.out)
    elif a.cmd == "reference":
        reference(a.out)
    elif a.cmd == "compare":
        compare(a.work, a.work / "data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
