"""The synthetic dataset in LVIS v1's format: a long tail of shape categories, for tests and for users
without LVIS (``python -m dali_scp.synthetic --lvis``).

Why its own shape: what is particular to LVIS is what must be exercised without it: images named by
``coco_url`` (no ``file_name``), some val images stored in ``train2017/``, no crowd regions, per-image
``neg_category_ids`` (verified absent) and ``not_exhaustive_category_ids`` (some instances left
unannotated: here one instance of such a category is drawn but not annotated, as in LVIS), and
categories whose ``frequency`` (LVIS's rule: rare in < 10 training images, common in 10-99, frequent in
>= 100) spans all three groups. The images are ``dali_scp.synthetic``'s (shape families, flat colours).

Training images draw categories from a long tail (``TRAIN_WEIGHTS``: at the default 120 training
images two categories are frequent, four common, two rare); val images draw them uniformly, so every
group is present to score, as LVIS's val set holds rare categories. The counts, hence each category's
frequency, are computed from the written training annotations, never assumed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dali_scp.files import atomic_write
from dali_scp.synthetic import draw_images

# LVIS's ids are 1..C; the eight shape families, most to least frequent in training
CATEGORIES = [(1, "disc"), (2, "square"), (3, "triangle"), (4, "star"), (5, "ring"), (6, "cross"), (7, "bar"),
              (8, "crescent")]
TRAIN_WEIGHTS = np.array([0.40, 0.35, 0.10, 0.08, 0.04, 0.025, 0.003, 0.002])
TRAIN_WEIGHTS = TRAIN_WEIGHTS / TRAIN_WEIGHTS.sum()
RARE_BELOW, FREQUENT_FROM = 10, 100  # training images holding the category (LVIS v1)
NOT_EXHAUSTIVE_PROB = 0.3   # per image: one category with >= 2 instances loses one annotation
NEG_PROB = 0.5              # per image and absent category: listed as verified absent
VAL_IN_TRAIN_FOLDER = 4     # every 4th val image is stored in train2017/, as some of LVIS's are
URL = "http://images.cocodataset.org/{folder}/{name}"  # a name only: nothing is ever downloaded


def frequency(image_count: int) -> str:
    return "r" if image_count < RARE_BELOW else "c" if image_count < FREQUENT_FROM else "f"


def _federate(rng: np.random.Generator, images: list, anns: list) -> list:
    """LVIS's per-image fields, and the annotations that remain after not-exhaustive categories lost one."""
    by_image: dict = {}
    for a in anns:
        a.pop("iscrowd", None)
        by_image.setdefault(a["image_id"], []).append(a)
    kept = []
    for im in images:
        mine = by_image.get(im["id"], [])
        present = sorted({a["category_id"] for a in mine})
        multi = [c for c in present if sum(a["category_id"] == c for a in mine) >= 2]
        nel = [int(rng.choice(multi))] if multi and rng.random() < NOT_EXHAUSTIVE_PROB else []
        if nel:
            drop = [a for a in mine if a["category_id"] == nel[0]][-1]
            mine = [a for a in mine if a is not drop]
        im["neg_category_ids"] = [c for c, _ in CATEGORIES if c not in present and rng.random() < NEG_PROB]
        im["not_exhaustive_category_ids"] = nel
        kept += mine
    return kept


def _lvis_images(images: list, folder) -> list:
    return [dict(id=im["id"], width=im["width"], height=im["height"],
                 coco_url=URL.format(folder=folder(im["id"]), name=im["file_name"]),
                 neg_category_ids=im["neg_category_ids"], not_exhaustive_category_ids=im["not_exhaustive_category_ids"])
            for im in images]


def generate(out, train: int = 120, val: int = 24, seed: int = 0) -> Path:
    root = Path(out)
    rng = np.random.default_rng([seed, 7])
    val_first = 1_000_000

    def val_folder(i):
        return "train2017" if (i - val_first) % VAL_IN_TRAIN_FOLDER == VAL_IN_TRAIN_FOLDER - 1 else "val2017"

    splits = {}
    for split, n, s, first, weights, folder in (("train", train, seed, 1, TRAIN_WEIGHTS, lambda i: "train2017"),
                                                 ("val", val, seed + 1, val_first, None, val_folder)):
        images, anns = draw_images(root, split, n, s, first, folder=folder, categories=CATEGORIES,
                                   cat_weights=weights, crowd_prob=0.0)
        anns = _federate(rng, images, anns)
        splits[split] = (_lvis_images(images, folder), anns)
    (root / "val2017").mkdir(exist_ok=True)  # COCO's layout, even when every val image went to train2017/
    train_anns = splits["train"][1]
    cats = []
    for c, name in CATEGORIES:
        imgs = {a["image_id"] for a in train_anns if a["category_id"] == c}
        n_inst = sum(a["category_id"] == c for a in train_anns)
        cats.append(dict(id=c, name=name, synset=f"{name}.n.01", frequency=frequency(len(imgs)),
                         image_count=len(imgs), instance_count=n_inst, synonyms=[name], **{"def": f"a flat {name}"}))
    for split, (images, anns) in splits.items():
        doc = dict(info=dict(description="dali-scp synthetic LVIS-like dataset", seed=seed), licenses=[],
                   images=images, annotations=anns, categories=cats)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        atomic_write(root / "annotations" / f"lvis_v1_{split}.json", json.dumps(doc))
    (root / "SYNTHETIC").write_text(json.dumps(dict(kind="lvis", train=train, val=val, seed=seed)))
    return root
