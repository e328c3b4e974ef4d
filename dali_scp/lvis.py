"""LVIS v1 annotation files, read as the COCO files they almost are.

Why a separate step: LVIS v1 (Gupta et al. 2019) annotates COCO 2017's images in COCO's JSON layout, but
its image entries carry no ``file_name`` (the file is named by the last two parts of ``coco_url``:
``train2017/000000391895.jpg``, and some val images live in ``train2017/``) and its annotations no
``iscrowd`` (LVIS has no crowd regions). ``as_coco`` adds both, so DALI's COCO reader (``file_root`` =
the dataset folder) and everything after the dataset check read an LVIS file like a COCO one. The
federated-evaluation fields (``neg_category_ids``, ``not_exhaustive_category_ids``, each category's
``frequency``) pass through untouched for ``trainer.lvis_eval``.
"""
from __future__ import annotations

FREQUENCIES = ("r", "c", "f")  # rare: < 10 training images, common: 10-99, frequent: >= 100


def image_file(im: dict) -> str:
    """The image's file relative to the dataset folder: ``file_name`` when the entry has one (COCO),
    else the folder and name at the end of its ``coco_url`` (LVIS)."""
    if im.get("file_name"):
        return str(im["file_name"])
    url = im.get("coco_url")
    if isinstance(url, str) and url.count("/") >= 1:
        return "/".join(url.rstrip("/").split("/")[-2:])
    return ""


def is_lvis(doc: dict) -> bool:
    """An LVIS file: image entries named by ``coco_url`` instead of ``file_name``."""
    images = doc.get("images") if isinstance(doc, dict) else None
    return bool(images) and isinstance(images, list) and all(
        isinstance(im, dict) and "file_name" not in im and "coco_url" in im for im in images)


def as_coco(doc: dict) -> dict:
    """``doc`` with ``file_name`` on every image (from ``coco_url``) and ``iscrowd`` 0 on every annotation;
    the lists are new, the input is not modified. An entry without a usable ``coco_url`` keeps no
    ``file_name``, and the dataset check reports it."""
    images = [dict(im, file_name=image_file(im)) if image_file(im) else im for im in doc["images"]]
    out = dict(doc, images=images)
    if isinstance(doc.get("annotations"), list):  # anything else is the check's to report
        out["annotations"] = [dict(a, iscrowd=0) if isinstance(a, dict) and "iscrowd" not in a else a
                              for a in doc["annotations"]]
    return out
