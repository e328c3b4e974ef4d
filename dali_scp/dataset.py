"""Which split to read (COCO or LVIS layout), and the mapping between the dataset's category ids and the
contiguous labels a detector is trained on (1..C, 0 = background).

Why here: every CLI takes ``--coco-root`` and ``--dataset`` and falls back to the embedded synthetic
dataset, and the category mapping must be the same for the trainer, the evaluation and the visualiser.

Layouts (``DATASETS``): ``coco`` is ``DIR/{split}/`` and ``DIR/annotations/instances_{split}.json``;
``lvis`` is LVIS v1's ``DIR/annotations/lvis_v1_{train,val}.json`` beside COCO 2017's ``DIR/train2017/``
and ``DIR/val2017/``. LVIS names each image by a path relative to ``DIR`` (``dali_scp.lvis``), so its
images folder is ``DIR`` itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dali_scp.image_index import cached_index, image_index
from dali_scp.once import once_per_job


@dataclass
class CocoSplit:
    root: Path
    split: str
    images_dir: Path
    annotations: Path
    cat_ids: list[int] = field(default_factory=list)
    cat_names: list[str] = field(default_factory=list)
    synthetic: bool = False
    dataset: str = "coco"          # the layout and evaluation: "coco" or "lvis" (``DATASETS``)

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.cat_ids) + 1

    def cat_to_label_table(self) -> np.ndarray:
        """Lookup table: dataset category id -> contiguous label (0 for unknown ids)."""
        t = np.zeros(max(self.cat_ids, default=0) + 1, np.int64)
        t[self.cat_ids] = np.arange(1, len(self.cat_ids) + 1)
        return t

    def label_to_cat(self) -> np.ndarray:
        return np.array([0] + list(self.cat_ids), np.int64)

    def name_of_label(self, label: int) -> str:
        return self.cat_names[label - 1] if 1 <= label <= len(self.cat_names) else f"label {label}"


DATASETS = ("coco", "lvis")


def split_files(root: str | os.PathLike, split: str, dataset: str = "coco") -> tuple[Path, Path]:
    """(annotation file, images folder) of ``split`` in ``dataset``'s layout under ``root``; nothing is
    checked. LVIS's file for ``train2017`` (or ``train``) is ``lvis_v1_train.json``."""
    root = Path(root)
    if dataset == "lvis":
        return root / "annotations" / f"lvis_v1_{split.removesuffix('2017')}.json", root
    if dataset != "coco":
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return root / "annotations" / f"instances_{split}.json", root / split


def resolve(coco_root: str | os.PathLike | None = None, split: str = "train2017", dataset: str = "coco",
            demo: bool = False) -> CocoSplit:
    """``coco_root`` in ``dataset``'s layout (``split_files``), or None for the embedded synthetic dataset
    of that kind (generated once into the cache, never downloaded): for COCO the demo's images with
    ``demo`` (what trainer.run, trainer.evaluate and trainer.showcase train and score without a dataset),
    else the COCO-like benchmark images (``dali_scp.synthetic``). Under an initialised torch.distributed
    every process must call it: one builds the file's index for all (``dali_scp.once``)."""
    synthetic = coco_root is None
    if synthetic:
        from dali_scp.synthetic import default_root
        coco_root = default_root(lvis=dataset == "lvis", demo=demo and dataset != "lvis")
    root = Path(coco_root)
    ann, img_dir = split_files(root, split, dataset)
    if not ann.is_file():
        expected = (f"{root}/annotations/lvis_v1_{{train,val}}.json beside {root}/train2017/ and {root}/val2017/"
                    if dataset == "lvis" else f"{root}/annotations/instances_{split}.json and {root}/{split}/*.jpg")
        raise FileNotFoundError(f"{ann}: annotation file not found (expected {dataset.upper()} layout: {expected})")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: image folder not found")
    try:
        index = once_per_job(lambda: cached_index(ann), lambda: image_index(ann), f"{ann.name}: index")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ann}: not a {dataset.upper()} instances file ({type(e).__name__}: {e}); run `python -m "
                         f"dali_scp.check --coco-root {root} --dataset {dataset}` for a full report") from e
    return CocoSplit(root, split, img_dir, ann, index.cat_ids.tolist(), index.cat_names.tolist(), synthetic, dataset)
