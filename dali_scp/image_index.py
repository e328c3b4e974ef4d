"""What the start of a run needs from an annotation file, without parsing it in Python again: the images
in file order (file names and ids), the categories, and which categories each image holds.

Why: COCO train2017's JSON is 489 MB; ``json.load`` of it takes ~10 s and ~3 GB per process, and every
process of a job would pay that at every start just to learn the category list and the file names the
training order is written in (``dali_scp.order``). DALI's reader parses the JSON itself, in C++. So the
few arrays a start needs are stored once per version of the file (its path, size and mtime), in the
cache (``dali_scp.files.cache_dir``), as an ``.npz`` of plain arrays (no pickle); the dataset check,
which parses the file anyway, writes the index of the original file and of its filtered copy.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_scp.files import atomic_write, cache_dir
from dali_scp.lvis import image_file

INDEX_VERSION = 2  # 2: image_anns


@dataclass(frozen=True)
class ImageIndex:
    file_names: np.ndarray       # [n] str, the ``images`` entries in file order
    image_ids: np.ndarray        # [n] int64
    cat_ids: np.ndarray          # [C] int64, the ``categories`` entries sorted by id
    cat_names: np.ndarray        # [C] str
    image_cat_ptr: np.ndarray    # [n + 1] int64: image i holds the (non-crowd) categories ...
    image_cats: np.ndarray       # ... image_cats[ptr[i]:ptr[i + 1]] (distinct, sorted)
    image_anns: np.ndarray       # [n] int64: annotations of image i, crowd ones included

    def __len__(self) -> int:
        return len(self.image_ids)

    def categories_of(self, i: int) -> np.ndarray:
        return self.image_cats[self.image_cat_ptr[i]:self.image_cat_ptr[i + 1]]

    @classmethod
    def from_doc(cls, doc: dict) -> ImageIndex:
        images = doc.get("images", [])
        ids = np.array([int(im["id"]) for im in images], np.int64)
        row = {int(i): k for k, i in enumerate(ids)}
        per_image: list[set] = [set() for _ in images]
        anns = np.zeros(len(images), np.int64)
        for a in doc.get("annotations", []):
            k = row.get(int(a.get("image_id", -1)))
            if k is not None:
                anns[k] += 1
                if not a.get("iscrowd", 0):
                    per_image[k].add(int(a["category_id"]))
        counts = np.array([len(s) for s in per_image], np.int64)
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.array([c for s in per_image for c in sorted(s)], np.int64)
        cats = sorted(doc.get("categories", []), key=lambda c: int(c["id"]))
        return cls(file_names=np.array([image_file(im) for im in images], dtype=str),
                   image_ids=ids, cat_ids=np.array([int(c["id"]) for c in cats], np.int64),
                   cat_names=np.array([str(c.get("name", c["id"])) for c in cats], dtype=str),
                   image_cat_ptr=ptr, image_cats=flat, image_anns=anns)

    def save(self, path: Path) -> None:
        atomic_write(path, lambda f: np.savez(f, **{k: getattr(self, k) for k in self.__dataclass_fields__}))

    @classmethod
    def load(cls, path: Path) -> ImageIndex:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})


def _cache_path(ann_file: Path) -> Path:
    st = ann_file.stat()
    key = hashlib.sha1(f"{INDEX_VERSION}|{ann_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "index" / f"{key}.npz"


def cached_index(ann_file: str | os.PathLike) -> ImageIndex | None:
    """The index of ``ann_file`` if the cache holds it (None for a missing or damaged entry)."""
    path = _cache_path(Path(ann_file))
    if path.is_file():
        try:
            return ImageIndex.load(path)
        except (OSError, ValueError, KeyError):
            pass
    return None


def image_index(ann_file: str | os.PathLike, doc: dict | None = None) -> ImageIndex:
    """The index of ``ann_file``, from the cache, else built (from ``doc`` when the caller has the file
    parsed already, else by parsing it) and stored."""
    ann_file = Path(ann_file)
    path = _cache_path(ann_file)
    hit = cached_index(ann_file) if doc is None else None
    if hit is not None:
        return hit
    if doc is None:
        doc = json.loads(ann_file.read_text())
    idx = ImageIndex.from_doc(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    idx.save(path)
    return idx
