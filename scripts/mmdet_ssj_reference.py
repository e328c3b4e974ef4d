"""The statistics of the batches mmdetection's own SSJ + copy-paste train pipeline makes, for
``tests/test_ssj_statistics.py``.

    /work/venvs/mmdet/bin/python scripts/mmdet_ssj_reference.py      # rewrites tests/data/mmdet_ssj_scp_stats.npz

Why a side environment: mmdetection stays out of the project's install and tests (see
``scripts/mmdet_reference.py``). The test reads the small file this script writes, never mmdetection.

What it does: makes the synthetic COCO-like set the test makes (``DATASET``: ``dali_scp.synthetic``, 200
training images, recorded by the digest of its annotation file), builds the training dataset of
``mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-scp-90k_coco.py`` from the config shipped in the
mmdet wheel exactly as the config builds it (``MultiImageMixDataset`` around ``CocoDataset`` with the load
pipeline LoadImageFromFile, LoadAnnotations with masks, RandomResize, RandomCrop, FilterAnnotations,
RandomFlip, Pad, then CopyPaste and PackDetInputs; only ``data_root`` and the class names are the synthetic
set's), and draws ``SAMPLES`` samples, each image of the filtered dataset equally often. Unmodified
mmdetection code throughout; thin wrappers only *record* what mmdetection itself records in ``results``:

- per sample: the image, mmdetection's ``scale_factor`` (w, h) and ``scale`` (the sampled square side),
  the crop offset read off ``homography_matrix``, ``flip``, the training targets (non-crowd objects) of the
  destination after SSJ and before the paste, how many of them copy-paste kept and how many it pasted;
- per output object (non-crowd: crowd regions travel as ``ignored_instances``, which are no targets): box
  width and height (recomputed from the masks) and mask area in pixels, and whether it was pasted;
- how often FilterAnnotations returned None (mmdetection then draws another image at random).

mmcv-lite has no compiled kernels; ``mmdet_reference._stand_in_kernels`` lets mmcv.ops import (these transforms call
none of them).
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mmdet_reference import CONFIG  # noqa: E402  (the seed config: ...ssj-scp-90k_coco.py)
DATASET = dict(train=200, val=1, seed=23)   # dali_scp.synthetic.generate's arguments; the test makes the same
SAMPLES = 2090                               # 11 passes over the 190 images mmdetection keeps (10 have no annotation)
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mmdet_ssj_scp_stats.npz"


def annotation_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_dataset(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dali_scp.synthetic import generate
    return generate(root, **DATASET)


def build_mmdet_dataset(root: Path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import DATASETS
    from dali_scp.synthetic import CATEGORIES
    from mmdet_reference import seed_config
    cfg = Config.fromfile(str(seed_config(CONFIG)))
    init_default_scope("mmdet")
    d = cfg.train_dataloader.dataset
    assert d.type == "MultiImageMixDataset", d.type
    d.dataset.data_root = str(root) + "/"
    d.dataset.metainfo = dict(classes=tuple(name for _, name in sorted(CATEGORIES)))
    return DATASETS.build(d), cfg


class Recorder:
    """Wraps CopyPaste.transform / _select_object and FilterAnnotations.transform: calls the originals
    unchanged and keeps what they saw."""

    def __init__(self):
        from mmdet.datasets.transforms import CopyPaste, FilterAnnotations
        self.dst = self.selected = None
        self.filter_none = self.filter_calls = 0
        rec = self
        cp_transform, cp_select = CopyPaste.transform, CopyPaste._select_object
        fa_transform = FilterAnnotations.transform

        def transform(self, results):
            rec.dst = dict(scale=results["scale"], scale_factor=results["scale_factor"],
                           homography=np.array(results["homography_matrix"], np.float64), flip=bool(results["flip"]),
                           ori_shape=results["ori_shape"],
                           n=int((~results["gt_ignore_flags"].astype(bool)).sum()))
            rec.selected = None
            return cp_transform(self, results)

        def select(self, results):
            out = cp_select(self, results)
            rec.selected = int((~out["gt_ignore_flags"].astype(bool)).sum())
            return out

        def filt(self, results):
            out = fa_transform(self, results)
            rec.filter_calls += 1
            rec.filter_none += out is None
            return out
        CopyPaste.transform, CopyPaste._select_object, FilterAnnotations.transform = transform, select, filt


def crop_offset(dst: dict) -> tuple[int, int, int, int]:
    """(y, x) of the crop window in the resized image and the crop's (h, w), from what mmdetection
    recorded: homography = [flip] @ crop @ resize."""
    h, w = dst["ori_shape"]
    sx, sy = dst["scale_factor"]
    new_h, new_w = int(round(h * sy)), int(round(w * sx))
    crop_h, crop_w = min(new_h, 1024), min(new_w, 1024)
    H = dst["homography"]
    oy = -H[1, 2]
    ox = H[0, 2] - crop_w if dst["flip"] else -H[0, 2]
    assert abs(oy - round(oy)) < 1e-3 and abs(ox - round(ox)) < 1e-3, H
    return int(round(oy)), int(round(ox)), crop_h, crop_w


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=SAMPLES, help=f"default {SAMPLES}")
    p.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    a = p.parse_args(argv)
    from mmdet_reference import _stand_in_kernels
    _stand_in_kernels()  # mmcv-lite: mmdet.structures imports mmcv.ops, whose kernels these transforms never call
    import mmdet
    import mmengine
    import torch
    rng_seed = SEED
    np.random.seed(rng_seed)
    import random
    random.seed(rng_seed)
    torch.manual_seed(rng_seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "syn")
        digest = annotation_digest(root / "annotations" / "instances_train2017.json")
        ds, cfg = build_mmdet_dataset(root)
        rec = Recorder()
        n_images = len(ds.dataset)
        per_sample = {k: [] for k in ("image_id", "scale_x", "scale_y", "side", "crop_y", "crop_x", "crop_h", "crop_w",
                                      "flip", "n_ssj", "n_kept", "n_pasted", "ori_h", "ori_w")}
        obj_w, obj_h, obj_area, obj_pasted = [], [], [], []
        t0 = time.time()
        for i in range(a.samples):
            out = ds[i % n_images]
            s = out["data_samples"]
            gt = s.gt_instances
            dst = rec.dst
            n_out = len(gt)
            n_pasted = rec.selected or 0
            oy, ox, ch, cw = crop_offset(dst)
            for k, v in (("image_id", s.img_id), ("scale_x", dst["scale_factor"][0]),
                         ("scale_y", dst["scale_factor"][1]),
                         ("side", dst["scale"][0]), ("crop_y", oy), ("crop_x", ox), ("crop_h", ch), ("crop_w", cw),
                         ("flip", dst["flip"]), ("n_ssj", dst["n"]), ("n_kept", n_out - n_pasted),
                         ("n_pasted", n_pasted), ("ori_h", dst["ori_shape"][0]), ("ori_w", dst["ori_shape"][1])):
                per_sample[k].append(v)
            boxes = gt.bboxes.tensor.numpy() if hasattr(gt.bboxes, "tensor") else np.asarray(gt.bboxes)
            obj_w.append(boxes[:, 2] - boxes[:, 0])
            obj_h.append(boxes[:, 3] - boxes[:, 1])
            obj_area.append(gt.masks.masks.sum(axis=(1, 2)))
            obj_pasted.append(np.arange(n_out) >= n_out - n_pasted)
            if (i + 1) % 100 == 0:
                print(f"{i + 1}/{a.samples} samples, {(time.time() - t0) / (i + 1):.2f} s each", flush=True)
    ps = {k: np.array(v, np.float64 if k.startswith("scale") else np.int32) for k, v in per_sample.items()}
    ow, oh = np.concatenate(obj_w), np.concatenate(obj_h)
    assert np.all(ow == np.round(ow)) and np.all(oh == np.round(oh)), "boxes recomputed from masks are integral"
    info = dict(config=CONFIG, dataset=DATASET, annotation_sha256=digest, samples=a.samples, images=n_images, seed=SEED,
                filter_annotations_none=rec.filter_none, filter_annotations_calls=rec.filter_calls,
                versions=dict(mmdet=mmdet.__version__, mmengine=mmengine.__version__, numpy=np.__version__),
                pipeline=[t["type"] for t in cfg.train_dataloader.dataset.dataset.pipeline]
                + [t["type"] for t in cfg.train_dataloader.dataset.pipeline])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **{f"sample_{k}": v for k, v in ps.items()},
                        object_w=ow.astype(np.uint16), object_h=oh.astype(np.uint16),
                        object_mask_area=np.concatenate(obj_area).astype(np.uint32),
                        object_pasted=np.concatenate(obj_pasted).astype(np.uint8), info=np.array(json.dumps(info)))
    print(json.dumps(info, indent=1))
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e3:.0f} kB): {len(ow)} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
