"""Dataset check: find what would kill or silently corrupt a long run, report it by file and
annotation id, and write a filtered copy of the annotations that the pipelines read instead.

Why before training (and cached): a 90k-iteration run must never die at hour 20 on one broken JPEG,
and a degenerate polygon must not turn into a silent empty target. Finds: malformed JSON, missing or
unreadable images, corrupt/truncated JPEGs, image sizes that disagree with the JSON, degenerate polygons
(< 3 points or zero area), boxes outside the image, unknown category or image ids, non-crowd RLE masks
(the polygon reader cannot rasterise them). Images with a defect are excluded; annotations with a
defect are excluded (a degenerate part of a multi-part object only loses that part).

    python -m dali_scp.check --coco-root DIR [--split train2017]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)
CHECK_VERSION = 1
BOX_TOLERANCE = 1.0  # px a box may exceed the image (COCO boxes are float, rounded)


@dataclass
class Defect:
    kind: str
    file: str
    image_id: int | None
    annotation_id: int | None
    message: str

    def __str__(self):
        where = self.file + (f" image {self.image_id}" if self.image_id is not None else "")
        where += f" annotation {self.annotation_id}" if self.annotation_id is not None else ""
        return f"[{self.kind}] {where}: {self.message}"


@dataclass
class Report:
    defects: list
    n_images: int
    n_annotations: int
    kept_images: int
    kept_annotations: int
    filtered: str | None = None

    def summary(self) -> str:
        c = Counter(d.kind for d in self.defects)
        lines = [f"checked {self.n_images} images, {self.n_annotations} annotations: "
                 f"{len(self.defects)} defects; the pipelines read {self.kept_images} images, "
                 f"{self.kept_annotations} annotations"]
        lines += [f"  {n:6d}  {k}" for k, n in sorted(c.items())]
        return "\n".join(lines)


def _shoelace(p):
    xs, ys = p[0::2], p[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def _check_image(path: Path, width, height):
    """Returns an error message or None. Decodes at 1/8 scale (JPEG draft mode): the whole entropy-coded
    stream is still read, so truncation and corruption are found at a fraction of the cost."""
    if not path.is_file():
        return "missing-image", "file not found"
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
            im.load()
    except Exception as e:  # PIL raises many types for broken files
        return "corrupt-image", f"cannot decode: {e}"
    if (width, height) != size:
        return "size-mismatch", f"JSON says {width}x{height}, file is {size[0]}x{size[1]}"
    return None


def check(ann_file: str | os.PathLike, images_dir: str | os.PathLike, workers: int = 8,
          progress: bool = True) -> tuple[Report, dict | None]:
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    defects: list[Defect] = []
    fname = str(ann_file)
    try:
        doc = json.loads(ann_file.read_text())
        images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        defects.append(Defect("malformed-json", fname, None, None, f"not a COCO instances file: {e}"))
        return Report(defects, 0, 0, 0, 0), None
    cat_ids = {c.get("id") for c in cats}
    bad_images: set = set()
    by_id = {}
    for im in images:
        if not all(k in im for k in ("id", "file_name", "width", "height")):
            defects.append(Defect("malformed-json", fname, im.get("id"), None,
                                  "image entry lacks one of id/file_name/width/height"))
            continue
        by_id[im["id"]] = im

    def work(im):
        return im, _check_image(images_dir / im["file_name"], im["width"], im["height"])

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        it = pool.map(work, list(by_id.values()))
        for im, err in tqdm(it, total=len(by_id), desc="checking images", unit="img", disable=not progress,
                            leave=False):
            if err:
                kind, msg = err
                defects.append(Defect(kind, str(images_dir / im["file_name"]), im["id"], None, msg))
                bad_images.add(im["id"])

    kept_anns = []
    for a in anns:
        aid, iid = a.get("id"), a.get("image_id")
        im = by_id.get(iid)
        f = str(images_dir / im["file_name"]) if im else fname

        def bad(kind, msg):
            defects.append(Defect(kind, f, iid, aid, msg))

        if im is None:
            bad("unknown-image-id", f"image_id {iid!r} is not in 'images'")
            continue
        if a.get("category_id") not in cat_ids:
            bad("unknown-category", f"category_id {a.get('category_id')!r} is not in 'categories'")
            continue
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            bad("malformed-annotation", f"bbox {box!r} is not [x, y, w, h]")
            continue
        x, y, w, h = box
        W, H = im["width"], im["height"]
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > W + BOX_TOLERANCE or y + h > H + BOX_TOLERANCE:
            bad("box-outside-image", f"bbox {box} exceeds the {W}x{H} image")
            continue
        if w <= 0 or h <= 0:
            bad("degenerate-box", f"bbox {box} has no area")
            continue
        seg = a.get("segmentation")
        if a.get("iscrowd", 0):
            kept_anns.append(a)  # crowd: excluded by the reader anyway, kept for evaluation
            continue
        if isinstance(seg, dict):
            bad("non-crowd-rle", "non-crowd annotation stored as RLE; the polygon reader cannot use it")
            continue
        if not isinstance(seg, list) or not seg:
            bad("malformed-annotation", "segmentation is neither a polygon list nor RLE")
            continue
        good = []
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                bad("degenerate-polygon", f"polygon {k} has {len(poly) if isinstance(poly, list) else 0} "
                                          "coordinates (< 3 points)")
            elif _shoelace(poly) <= 0:
                bad("degenerate-polygon", f"polygon {k} has zero area")
            else:
                good.append(poly)
        if not good:
            continue
        if len(good) != len(seg):
            a = dict(a, segmentation=good)
        kept_anns.append(a)

    kept_images = [im for i, im in by_id.items() if i not in bad_images]
    kept_anns = [a for a in kept_anns if a["image_id"] not in bad_images]
    filtered = dict(doc, images=kept_images, annotations=kept_anns)
    rep = Report(defects, len(images), len(anns), len(kept_images), len(kept_anns))
    return rep, filtered


def _cache_dir() -> Path:
    return Path(os.environ.get("DALI_SCP_CACHE", Path.home() / ".cache" / "dali_scp")) / "checked"


def _key(ann_file: Path, images_dir: Path) -> str:
    st = ann_file.stat()
    h = hashlib.sha1(f"{CHECK_VERSION}|{ann_file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{images_dir.resolve()}"
                     .encode()).hexdigest()[:16]
    return h


def checked_annotations(ann_file, images_dir, workers: int = 8, progress: bool = True) -> tuple[Path, Report]:
    """The filtered annotation file for a split, computed once per version of the JSON (cached)."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    d = _cache_dir() / _key(ann_file, images_dir)
    out, rep_file = d / ann_file.name, d / "report.json"
    if out.is_file() and rep_file.is_file():
        r = json.loads(rep_file.read_text())
        return out, Report([Defect(**x) for x in r["defects"]], r["n_images"], r["n_annotations"],
                           r["kept_images"], r["kept_annotations"], str(out))
    rep, filtered = check(ann_file, images_dir, workers, progress)
    if filtered is None:
        raise ValueError("\n".join(str(x) for x in rep.defects))
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(filtered))
    rep.filtered = str(out)
    atomic_write(rep_file, json.dumps(asdict(rep)))
    for x in rep.defects[:20]:
        log.warning("dataset check: %s", x)
    if len(rep.defects) > 20:
        log.warning("dataset check: ... %d more defects (full list: %s)", len(rep.defects) - 20, rep_file)
    if rep.defects:
        log.warning("dataset check: %s", rep.summary().replace("\n", "; "))
    return out, rep


def atomic_write(path: Path, text: str):
    """Temp file + rename: a reader never sees half a file, a crash never leaves one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dali_scp.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic dataset)")
    p.add_argument("--split", default="train2017", help="split name (default train2017)")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images (default 8)")
    p.add_argument("--json", default=None, help="also write the full report as JSON here")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any defect is found")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dali_scp.dataset import resolve
    root = Path(a.coco_root) if a.coco_root else None
    if root is not None:
        ann, img = root / "annotations" / f"instances_{a.split}.json", root / a.split
        if not ann.is_file():
            print(f"error: {ann}: annotation file not found", file=sys.stderr)
            return 2
    else:
        sp = resolve(None, a.split)
        ann, img = sp.annotations, sp.images_dir
    rep, filtered = check(ann, img, a.workers)
    for d in rep.defects:
        print(d)
    print(rep.summary())
    if a.json:
        atomic_write(Path(a.json), json.dumps(asdict(rep), indent=1))
    return 1 if (a.strict and rep.defects) or filtered is None else 0


if __name__ == "__main__":
    sys.exit(main())
