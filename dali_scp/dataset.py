"""Which COCO split to read, and the mapping between the dataset's category ids and the contiguous
labels a detector is trained on (1..C, 0 = background).

Why here: every CLI takes ``--coco-root`` and falls back to the embedded synthetic dataset, and the
category mapping must be the same for the trainer, the evaluation and the visualiser.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class CocoSplit:
    root: Path
    split: str
    images_dir: Path
    annotations: Path
    cat_ids: list[int] = field(default_factory=list)
    cat_names: list[str] = field(default_factory=list)
    synthetic: bool = False

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


def resolve(coco_root: str | os.PathLike | None = None, split: str = "train2017") -> CocoSplit:
    """``coco_root`` in COCO's layout (``{split}/``, ``annotations/instances_{split}.json``), or None for
    the embedded synthetic dataset (generated once into the cache, never downloaded). Under an
    initialised torch.distributed every process must call it: one reads the categories for all
    (``dali_scp.once``)."""
    synthetic = coco_root is None
    if synthetic:
        from dali_scp.synthetic import default_root
        coco_root = default_root()
    root = Path(coco_root)
    ann = root / "annotations" / f"instances_{split}.json"
    img_dir = root / split
    if not ann.is_file():
        raise FileNotFoundError(f"{ann}: annotation file not found (expected COCO layout: "
                                f"{root}/annotations/instances_{split}.json and {root}/{split}/*.jpg)")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: image folder not found")
    try:
        cats = categories(ann)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{ann}: not a COCO instances file ({e}); run `python -m dali_scp.check "
                         f"--coco-root {root}` for a full report") from e
    cats = sorted(cats, key=lambda c: c["id"])
    return CocoSplit(root, split, img_dir, ann, [int(c["id"]) for c in cats], [c["name"] for c in cats], synthetic)


def _categories_entry(ann: Path) -> Path:
    from dali_scp.files import cache_dir
    st = ann.stat()
    key = hashlib.sha1(f"{ann.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "categories" / f"{key}.json"


def categories(ann: Path) -> list:
    """The file's ``categories``, cached per version of the file (the dataset check stores them too):
    a COCO-sized JSON takes ~10 s and ~2.5 GB to parse, which every process of every run would
    otherwise pay for a few kilobytes."""
    from dali_scp.once import once_per_job
    f = _categories_entry(ann)

    def parse():
        cats = json.loads(ann.read_text())["categories"]
        remember_categories(ann, cats)
        return cats
    cats = once_per_job(lambda: json.loads(f.read_text()) if f.is_file() else None, parse, f"{ann.name}: categories")
    if not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise KeyError("'categories' entries need 'id' and 'name'")
    return cats


def remember_categories(ann: Path, cats: list) -> None:
    from dali_scp.files import atomic_write
    f = _categories_entry(Path(ann))
    f.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(f, json.dumps(cats))
