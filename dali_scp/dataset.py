"""Which COCO split to read, and the mapping between the dataset's category ids and the contiguous
labels a detector is trained on (1..C, 0 = background).

Why here: every CLI takes ``--coco-root`` and falls back to the embedded synthetic dataset, and the
category mapping must be the same for the trainer, the evaluation and the visualiser.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dali_scp.image_index import image_index


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
    the embedded synthetic dataset (generated once into the cache, never downloaded)."""
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
        index = image_index(ann)  # cached per version of the file: a warm start parses no JSON here
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ann}: not a COCO instances file ({type(e).__name__}: {e}); run `python -m "
                         f"dali_scp.check --coco-root {root}` for a full report") from e
    return CocoSplit(root, split, img_dir, ann, index.cat_ids.tolist(), index.cat_names.tolist(), synthetic)
