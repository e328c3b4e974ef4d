"""Dataset check: find what would kill or silently corrupt a long run, report it by file and
annotation id, and write a filtered copy of the annotations that the pipelines read instead.

Why before training (and cached): a 90k-iteration run must never die at hour 20 on one broken JPEG,
and a degenerate polygon must not turn into a silent empty target. Finds: malformed JSON, missing or
unreadable images, corrupt/truncated JPEGs, images DALI cannot decode into the RGB image the pipelines
expect (``unsupported-image``), image sizes that fit neither the stored nor the EXIF-oriented image,
degenerate polygons (< 3 points or zero area), malformed or empty RLE masks, boxes outside the image,
unknown category or image ids. Images with a defect are excluded; annotations with a defect are
excluded (a degenerate part of a multi-part object only loses that part).

The filtered copy is what the pipelines can use directly: non-crowd RLE objects become the exactly
equivalent rectangle polygons (``dali_scp.rle``), and the annotations of images annotated in the
EXIF-oriented frame are re-expressed in stored pixels (``dali_scp.orientation``; such images carry
``annotated_orientation`` so evaluation can map predictions back). Every image with an orientation tag
other than 1 is listed in the report's notes with the frame chosen.

    python -m dali_scp.check --coco-root DIR [--split train2017] [--dataset lvis]
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dali_scp import lvis, orientation, rle
from dali_scp.files import atomic_write, cache_dir
from dali_scp.image_index import image_index
from dali_scp.raster import polygon_area

log = logging.getLogger(__name__)
CHECK_VERSION = 3  # 3: LVIS files (dali_scp.lvis)
BOX_TOLERANCE = 1.0  # px a box may exceed the image (COCO boxes are float, rounded)

# What DALI's CPU decoder turns into the right RGB image (found by experiment with DALI 2.4 against
# PIL, including 16-bit, palette, grayscale, alpha, CMYK, progressive and ICC-tagged files; ICC
# profiles are ignored, as by PIL and OpenCV). GIF, ICO, PSD, ... are not decoded at all; TIFFs in
# float/32-bit/Lab modes decode to wrong values; a TIFF's Orientation tag is applied by PIL on load
# but not by DALI, so the two disagree about its pixels.
DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "WEBP", "JPEG2000", "PPM", "TIFF"}
TIFF_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L"}


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
    """``defects`` exclude something; ``notes`` (same shape) record a decision that excludes nothing,
    e.g. which frame an EXIF-tagged image's annotations were read in."""
    defects: list
    n_images: int
    n_annotations: int
    kept_images: int
    kept_annotations: int
    filtered: str | None = None
    notes: list = field(default_factory=list)
    converted_rle: int = 0

    @classmethod
    def from_dict(cls, r: dict) -> "Report":
        r = dict(r)
        r["defects"] = [Defect(**x) for x in r["defects"]]
        r["notes"] = [Defect(**x) for x in r.get("notes", [])]
        return cls(**r)

    def summary(self) -> str:
        c = Counter(d.kind for d in self.defects)
        lines = [f"checked {self.n_images} images, {self.n_annotations} annotations: "
                 f"{len(self.defects)} defects; the pipelines read {self.kept_images} images, "
                 f"{self.kept_annotations} annotations"]
        lines += [f"  {n:6d}  {k}" for k, n in sorted(c.items())]
        oriented = sum("re-expressed" in n.message for n in self.notes)
        if self.notes:
            lines.append(f"  notes: {len(self.notes)} images with an EXIF orientation tag other than 1 "
                         f"({oriented} annotated on the oriented image, re-expressed in stored pixels)")
        if self.converted_rle:
            lines.append(f"  notes: {self.converted_rle} non-crowd RLE objects read as exact rectangle polygons")
        return "\n".join(lines)


def _unsupported(fmt, mode, tag) -> str | None:
    if fmt not in DALI_FORMATS:
        return f"{fmt or 'unknown'} images are not decoded by DALI; convert it to JPEG or PNG"
    if fmt == "TIFF" and mode not in TIFF_MODES:
        return f"a TIFF in mode {mode} is not decoded correctly by DALI; convert it to PNG"
    if fmt == "TIFF" and tag != 1:
        return (f"a TIFF with Orientation tag {tag}: PIL rotates it on load, DALI does not; convert it "
                "to PNG or JPEG")
    return None


def _inspect_image(path: Path):
    """(defect kind, message) or None, and (stored width, height, EXIF orientation). Decodes JPEGs at
    1/8 scale (draft mode): the whole entropy-coded stream is still read, so truncation and corruption
    are found at a fraction of the cost."""
    if not path.is_file():
        return ("missing-image", "file not found"), None
    try:
        with Image.open(path) as im:
            size, tag = im.size, orientation.read_tag(im)
            problem = _unsupported(im.format, im.mode, tag)
            if problem:
                return ("unsupported-image", problem), None
            im.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
            im.load()
    except Exception as e:  # PIL raises many types for broken files
        return ("corrupt-image", f"cannot decode: {e}"), None
    return None, (size[0], size[1], tag)


def _frame_note(tag, frame, w, h, sw, sh) -> str:
    if frame == "oriented":
        return (f"EXIF orientation {tag}: the JSON size {w}x{h} is the oriented image's (stored {sw}x{sh}): "
                "annotated on the rotated image, re-expressed in stored pixels for the pipelines; "
                "evaluation maps predictions back")
    both = (w, h) == orientation.oriented_size(sw, sh, tag)
    return (f"EXIF orientation {tag}: the JSON size {w}x{h} "
            + ("fits both the stored and the oriented image: COCO's convention, stored pixels"
               if both else "is the stored image's: stored pixels, as PIL and pycocotools read it")
            + " (decoded without rotation)")


def _reorient_polygons(polys, tag, sw, sh):
    out = []
    for p in polys:
        xy = orientation.to_stored_points(np.asarray(p, np.float64).reshape(-1, 2), tag, sw, sh)
        out.append([int(v) if float(v).is_integer() else round(float(v), 3) for v in xy.reshape(-1)])
    return out


def _reorient(a: dict, tag: int, sw: int, sh: int) -> dict:
    """An annotation of the oriented frame in stored pixels (sw x sh): polygons, box and crowd RLE."""
    x, y, w, h = a["bbox"]
    b = orientation.to_stored_boxes([x, y, x + w, y + h], tag, sw, sh)[0]
    a = dict(a, bbox=[round(float(b[0]), 3), round(float(b[1]), 3), round(float(b[2] - b[0]), 3),
                      round(float(b[3] - b[1]), 3)])
    seg = a["segmentation"]
    if isinstance(seg, dict):
        ow, oh = orientation.oriented_size(sw, sh, tag)
        a["segmentation"] = rle.encode(orientation.to_stored_array(rle.to_mask(seg, oh, ow), tag))
    else:
        a["segmentation"] = _reorient_polygons(seg, tag, sw, sh)
    return a


def check(ann_file: str | os.PathLike, images_dir: str | os.PathLike, workers: int = 8,
          progress: bool = True) -> tuple[Report, dict | None]:
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    defects: list[Defect] = []
    fname = str(ann_file)
    try:
        doc = json.loads(ann_file.read_text())
        doc = lvis.as_coco(doc) if lvis.is_lvis(doc) else doc  # LVIS: file names from coco_url, no crowd
        images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        defects.append(Defect("malformed-json", fname, None, None, f"not a COCO instances file: {e}"))
        return Report(defects, 0, 0, 0, 0), None
    try:  # the start of the next run reads the categories from this, not the JSON
        image_index(ann_file, doc=doc)
    except (KeyError, TypeError, ValueError):
        pass  # malformed entries: reported below, and resolve() names the file
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
        return im, _inspect_image(images_dir / im["file_name"])

    notes: list[Defect] = []
    oriented: dict = {}  # image id -> (tag, stored width, stored height): annotated on the oriented image
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        it = pool.map(work, list(by_id.values()))
        for im, (err, facts) in tqdm(it, total=len(by_id), desc="checking images", unit="img",
                                     disable=not progress, leave=False):
            path = str(images_dir / im["file_name"])
            if err:
                kind, msg = err
                defects.append(Defect(kind, path, im["id"], None, msg))
                bad_images.add(im["id"])
                continue
            sw, sh, tag = facts
            w, h = im["width"], im["height"]
            frame = orientation.annotation_frame(w, h, sw, sh, tag)
            if frame is None:
                ow, oh = orientation.oriented_size(sw, sh, tag)
                extra = f" ({ow}x{oh} with its EXIF orientation {tag} applied)" if (ow, oh) != (sw, sh) else ""
                defects.append(Defect("size-mismatch", path, im["id"], None,
                                      f"JSON says {w}x{h}, file is {sw}x{sh}{extra}"))
                bad_images.add(im["id"])
                continue
            if tag != 1:
                notes.append(Defect("exif-orientation", path, im["id"], None, _frame_note(tag, frame, w, h, sw, sh)))
            if frame == "oriented":
                oriented[im["id"]] = (tag, sw, sh)

    kept_anns = []
    converted = 0
    for a in anns:
        aid, iid = a.get("id"), a.get("image_id")
        im = by_id.get(iid)
        f = str(images_dir / im["file_name"]) if im else fname

        def bad(kind, msg):
            defects.append(Defect(kind, f, iid, aid, msg))

        if im is None:
            bad("unknown-image-id", f"image_id {iid!r} is not in 'images'")
            continue
        if iid in bad_images:
            continue  # the image is excluded (and reported) already
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
        crowd = bool(a.get("iscrowd", 0))
        if isinstance(seg, dict):
            try:
                polys = None if crowd else rle.to_polygons(seg, H, W)
                if crowd:
                    rle.parse(seg, H, W)
            except ValueError as e:
                bad("malformed-rle", str(e))
                continue
            if not crowd:
                if not polys:
                    bad("degenerate-rle", "the RLE mask is empty")
                    continue
                seg = polys
                a = dict(a, segmentation=polys)
                converted += 1
        if crowd:  # not a training target (the reader skips it), kept for evaluation
            kept_anns.append(_reorient(a, *oriented[iid]) if iid in oriented else a)
            continue
        if not isinstance(seg, list) or not seg:
            bad("malformed-annotation", "segmentation is neither a polygon list nor RLE")
            continue
        good = []
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                bad("degenerate-polygon", f"polygon {k} has {len(poly) if isinstance(poly, list) else 0} "
                                          "coordinates (< 3 points)")
            elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
                bad("malformed-annotation", f"polygon {k} holds values that are not numbers")
            elif polygon_area(np.reshape(poly, (-1, 2))) <= 0:
                bad("degenerate-polygon", f"polygon {k} has zero area")
            else:
                good.append(poly)
        if not good:
            continue
        if len(good) != len(seg):
            a = dict(a, segmentation=good)
        kept_anns.append(_reorient(a, *oriented[iid]) if iid in oriented else a)

    kept_images = []
    for i, im in by_id.items():
        if i in oriented:
            tag, sw, sh = oriented[i]
            im = dict(im, width=sw, height=sh, annotated_orientation=tag)
        if i not in bad_images:
            kept_images.append(im)
    filtered = dict(doc, images=kept_images, annotations=kept_anns)
    rep = Report(defects, len(images), len(anns), len(kept_images), len(kept_anns), notes=notes,
                 converted_rle=converted)
    return rep, filtered


def _key(ann_file: Path, images_dir: Path) -> str:
    st = ann_file.stat()
    h = hashlib.sha1(f"{CHECK_VERSION}|{ann_file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{images_dir.resolve()}"
                     .encode()).hexdigest()[:16]
    return h


def checked_annotations(ann_file, images_dir, workers: int = 8, progress: bool = True) -> tuple[Path, Report]:
    """The filtered annotation file for a split, computed once per version of the JSON (cached)."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    d = cache_dir() / "checked" / _key(ann_file, images_dir)
    out, rep_file = d / ann_file.name, d / "report.json"
    if out.is_file() and rep_file.is_file():
        rep = Report.from_dict(json.loads(rep_file.read_text()))
        rep.filtered = str(out)
        return out, rep
    rep, filtered = check(ann_file, images_dir, workers, progress)
    if filtered is None:
        raise ValueError("; ".join(str(x) for x in rep.defects))
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(filtered))
    image_index(out, doc=filtered)  # the start of a run reads this, not the JSON (dali_scp.image_index)
    rep.filtered = str(out)
    atomic_write(rep_file, json.dumps(asdict(rep)))
    for x in rep.defects[:20]:
        log.warning("dataset check: %s", x)
    if len(rep.defects) > 20:
        log.warning("dataset check: ... %d more defects (full list: %s)", len(rep.defects) - 20, rep_file)
    for x in rep.notes[:20]:
        log.info("dataset check: %s", x)
    if len(rep.notes) > 20:
        log.info("dataset check: ... %d more notes (full list: %s)", len(rep.notes) - 20, rep_file)
    if rep.defects or rep.notes or rep.converted_rle:
        (log.warning if rep.defects else log.info)("dataset check: %s", rep.summary().replace("\n", "; "))
    return out, rep


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    from dali_scp.dataset import resolve, split_files
    p = argparse.ArgumentParser(prog="python -m dali_scp.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic dataset)")
    p.add_argument("--split", default="train2017", help="split name (default train2017)")
    cli.add_dataset_flag(p)
    p.add_argument("--workers", type=int, default=8, help="threads decoding images (default 8)")
    p.add_argument("--json", default=None, help="also write the full report as JSON here")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any defect is found")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(a.coco_root) if a.coco_root else None
    if root is not None:
        ann, img = split_files(root, a.split, a.dataset)
        if not ann.is_file():
            print(f"error: {ann}: annotation file not found", file=sys.stderr)
            return 2
    else:
        sp = resolve(None, a.split, a.dataset)
        ann, img = sp.annotations, sp.images_dir
    rep, filtered = check(ann, img, a.workers)
    for d in rep.defects + rep.notes:
        print(d)
    print(rep.summary())
    if a.json:
        atomic_write(Path(a.json), json.dumps(asdict(rep), indent=1))
    if filtered is None:
        print(f"error: {rep.defects[0].file}: {rep.defects[0].message}", file=sys.stderr)
    return 1 if (a.strict and rep.defects) or filtered is None else 0


if __name__ == "__main__":
    sys.exit(main())
