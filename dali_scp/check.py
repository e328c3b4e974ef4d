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

The CLI and the tools share one cache entry per version of the JSON and images folder: check once
with the CLI, and training starts from its result; under torchrun one process per job checks
(``dali_scp.once``).

    python -m dali_scp.check --coco-root DIR [--split train2017] [--dataset lvis] [--workers N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dali_scp import cli, lvis, orientation, rle
from dali_scp.files import atomic_write, cache_dir, write_json
from dali_scp.image_index import image_index
from dali_scp.once import once_per_job

log = logging.getLogger(__name__)
CHECK_VERSION = 4  # 3: ambiguous EXIF frames follow the dataset; 4: LVIS files (dali_scp.lvis)
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
    frame_evidence: dict = field(default_factory=dict)  # FrameEvidence as a dict

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


@dataclass
class FrameEvidence:
    """The dataset's EXIF-tagged images whose JSON size fits exactly one frame, counted by that frame:
    what decides the frame of the images whose size fits both (``orientation.dataset_frame``)."""
    stored: int = 0
    oriented: int = 0

    @property
    def frame(self) -> str:
        return orientation.dataset_frame(self.stored, self.oriented)

    def __str__(self) -> str:
        n = self.stored + self.oriented
        if not n:
            return "no image of the dataset tells the frames apart"
        on = "the oriented image" if self.frame == "oriented" else "the stored pixels"
        k = self.oriented if self.frame == "oriented" else self.stored
        return f"{k} of the dataset's {n} tagged images whose size tells the frames apart were annotated on {on}"


def _frame_note(tag, frame, w, h, sw, sh, evidence: FrameEvidence) -> str:
    both = orientation.fits_both(w, h, sw, sh, tag)
    if frame == "oriented":
        how = (f"fits both the stored and the oriented image; read as the oriented image, as {evidence}"
               if both else f"is the oriented image's (stored {sw}x{sh}): annotated on the rotated image")
        return (f"EXIF orientation {tag}: the JSON size {w}x{h} {how}: re-expressed in stored pixels for the "
                "pipelines; evaluation maps predictions back")
    how = (f"fits both the stored and the oriented image: COCO's convention, stored pixels ({evidence})"
           if both else "is the stored image's: stored pixels, as PIL and pycocotools read it")
    return f"EXIF orientation {tag}: the JSON size {w}x{h} {how} (decoded without rotation)"


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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: what torchrun, taskset or a container's
    cpuset gives it, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def _image_pool(workers: int):
    """Worker processes for the image pass, or None for one worker (inline). Processes, because
    Pillow's decoding holds the GIL for most of an image's ~1-2 ms (threads measured no faster than
    one). Forked before the JSON is loaded, so a worker is the size of the process that asked, not of
    the 2-3 GB a COCO-sized JSON becomes in Python."""
    if workers <= 1 or mp.current_process().daemon:  # a daemonic process may not have children
        yield None
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    pool = ctx.Pool(workers)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


@dataclass
class _Polygons:
    """Every polygon of the annotations that reached the geometry test, flat, tested in one pass:
    per-polygon Python and NumPy calls cost ~30 µs each, ~60 s on COCO's 1.3M polygons."""
    coords: list = field(default_factory=list)   # the polygons (lists of numbers)
    owner: list = field(default_factory=list)    # (annotation index, index in its kept polygons, in the file)

    def verdicts(self, chunk: int = 200_000) -> list:
        """Per polygon: None (good) or the defect (kind, message)."""
        out: list = [None] * len(self.coords)
        for lo in range(0, len(self.coords), chunk):
            polys = self.coords[lo:lo + chunk]
            types = set(map(type, chain.from_iterable(polys)))
            if not types <= {int, float}:  # rare: find which polygons hold what
                for k, p in enumerate(polys):
                    if not all(type(v) in (int, float) for v in p):
                        out[lo + k] = ("malformed-annotation", "holds values that are not numbers")
            lengths = np.fromiter(map(len, polys), np.int64, len(polys))
            flat = np.fromiter(chain.from_iterable(p if out[lo + k] is None else [0.0] * len(p)
                                                   for k, p in enumerate(polys)), np.float64, int(lengths.sum()))
            finite = np.logical_and.reduceat(np.isfinite(flat), np.concatenate([[0], np.cumsum(lengths)[:-1]]))
            for k in np.flatnonzero(~finite):  # NaN or infinity: the rasterisers would cast them to garbage rows
                out[lo + k] = out[lo + k] or ("malformed-annotation", "holds a coordinate that is NaN or infinite")
            x, y = flat[0::2], flat[1::2]
            starts = np.concatenate([[0], np.cumsum(lengths // 2)[:-1]])
            nxt = np.arange(1, len(x) + 1)
            nxt[np.cumsum(lengths // 2) - 1] = starts  # each polygon's last vertex closes onto its first
            twice = np.add.reduceat(x * y[nxt], starts) - np.add.reduceat(y * x[nxt], starts)
            for k in np.flatnonzero(np.abs(twice) <= 0):
                out[lo + k] = out[lo + k] or ("degenerate-polygon", "has zero area")
        return out


def _check_annotation(a: dict, im: dict | None, cat_ids: set, polys: _Polygons, index: int, bad) -> dict | None:
    """Everything about one annotation that needs no pixels; returns it (RLE objects already as
    polygons) or None when excluded. Its polygons' geometry is tested in bulk later (``polys``)."""
    iid = a.get("image_id")
    if im is None:
        bad("unknown-image-id", f"image_id {iid!r} is not in 'images'")
        return None
    if a.get("category_id") not in cat_ids:
        bad("unknown-category", f"category_id {a.get('category_id')!r} is not in 'categories'")
        return None
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        bad("malformed-annotation", f"bbox {box!r} is not [x, y, w, h]")
        return None
    x, y, w, h = box
    W, H = im["width"], im["height"]
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > W + BOX_TOLERANCE or y + h > H + BOX_TOLERANCE:
        bad("box-outside-image", f"bbox {box} exceeds the {W}x{H} image")
        return None
    if w <= 0 or h <= 0:
        bad("degenerate-box", f"bbox {box} has no area")
        return None
    seg = a.get("segmentation")
    crowd = bool(a.get("iscrowd", 0))
    if isinstance(seg, dict):
        try:
            if crowd:
                rle.parse(seg, H, W)
            else:
                seg = rle.to_polygons(seg, H, W)
        except ValueError as e:
            bad("malformed-rle", str(e))
            return None
        if not crowd:
            if not seg:
                bad("degenerate-rle", "the RLE mask is empty")
                return None
            a = dict(a, segmentation=seg, _from_rle=True)
    if crowd:  # not a training target (the reader skips it), kept for evaluation
        return a
    if not isinstance(seg, list) or not seg:
        bad("malformed-annotation", "segmentation is neither a polygon list nor RLE")
        return None
    good = []
    for k, poly in enumerate(seg):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            bad("degenerate-polygon", f"polygon {k} has {len(poly) if isinstance(poly, list) else 0} "
                                      "coordinates (< 3 points)")
        else:
            polys.coords.append(poly)
            polys.owner.append((index, len(good), k))
            good.append(poly)
    if not good:
        return None
    return a if len(good) == len(seg) else dict(a, segmentation=good)


def check(ann_file: str | os.PathLike, images_dir: str | os.PathLike, workers: int | None = None,
          progress: bool = True) -> tuple[Report, dict | None]:
    """The report and the filtered COCO dict (None when the JSON is unusable). ``workers``: processes
    decoding images (default: the cores this process may use, ``available_cores``).

    Cost: the image pass decodes every file (at 1/8 scale for JPEGs, but the whole entropy-coded
    stream is read: ~1.2-1.9 ms per COCO-sized JPEG on one core), in worker processes; the annotation
    pass runs meanwhile in this process (polygon geometry in bulk); peak memory is the parsed JSON."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    workers = workers or available_cores()
    defects: list[Defect] = []
    fname = str(ann_file)
    with _image_pool(workers) as pool:
        try:
            doc = json.loads(ann_file.read_text())
            doc = lvis.as_coco(doc) if lvis.is_lvis(doc) else doc  # LVIS: file names from coco_url, no crowd
            images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
            cat_ids = {c.get("id") for c in cats}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            defects.append(Defect("malformed-json", fname, None, None, f"not a COCO instances file: {e}"))
            return Report(defects, 0, 0, 0, 0), None
        try:  # the start of the next run reads the categories from this, not the JSON
            image_index(ann_file, doc=doc)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # malformed entries: reported below, and resolve() names the file
        by_id = {}
        for im in images:
            if not all(k in im for k in ("id", "file_name", "width", "height")):
                defects.append(Defect("malformed-json", fname, im.get("id"), None,
                                      "image entry lacks one of id/file_name/width/height"))
                continue
            by_id[im["id"]] = im
        paths = [images_dir / im["file_name"] for im in by_id.values()]
        facts = (pool.imap(_inspect_image, paths, chunksize=max(1, min(256, len(paths) // (8 * workers))))
                 if pool else map(_inspect_image, paths))

        # annotations, while the workers decode
        ann_defects: list[Defect] = []
        polys = _Polygons()
        checked: list = []
        for a in anns:
            im = by_id.get(a.get("image_id"))
            f = str(images_dir / im["file_name"]) if im else fname

            def bad(kind, msg, a=a, f=f):
                ann_defects.append(Defect(kind, f, a.get("image_id"), a.get("id"), msg))
            checked.append(_check_annotation(a, im, cat_ids, polys, len(checked), bad))

        bad_images: set = set()
        stored: dict = {}  # image id -> (stored width, height, tag) of the images that decode
        for im, (err, got) in tqdm(zip(by_id.values(), facts), total=len(by_id), desc="checking images",
                                   unit="img", disable=not progress, leave=False):
            if err:
                defects.append(Defect(err[0], str(images_dir / im["file_name"]), im["id"], None, err[1]))
                bad_images.add(im["id"])
            else:
                stored[im["id"]] = got

    frames, notes, evidence = _frames(by_id, stored, images_dir, defects, bad_images)
    dropped_parts: dict = {}  # annotation index -> polygon indices with a defect
    for (i, j, k), verdict in zip(polys.owner, polys.verdicts()):
        if verdict:
            a = checked[i]
            ann_defects.append(Defect(verdict[0], str(images_dir / by_id[a["image_id"]]["file_name"]),
                                      a["image_id"], a.get("id"), f"polygon {k} {verdict[1]}"))
            dropped_parts.setdefault(i, set()).add(j)
    # the annotations of an excluded image go with it (the image is reported already)
    defects += [d for d in ann_defects if d.image_id not in bad_images]

    kept_anns, converted = [], 0
    for i, a in enumerate(checked):
        if a is None or a["image_id"] in bad_images:
            continue
        if a.pop("_from_rle", False):
            converted += 1
        if i in dropped_parts:
            good = [p for k, p in enumerate(a["segmentation"]) if k not in dropped_parts[i]]
            if not good:
                continue
            a = dict(a, segmentation=good)
        iid = a["image_id"]
        kept_anns.append(_reorient(a, *frames[iid]) if iid in frames else a)

    kept_images = []
    for i, im in by_id.items():
        if i in frames:
            tag, sw, sh = frames[i]
            im = dict(im, width=sw, height=sh, annotated_orientation=tag)
        if i not in bad_images:
            kept_images.append(im)
    filtered = dict(doc, images=kept_images, annotations=kept_anns)
    rep = Report(defects, len(images), len(anns), len(kept_images), len(kept_anns), notes=notes,
                 converted_rle=converted, frame_evidence=asdict(evidence))
    return rep, filtered


def _frames(by_id: dict, stored: dict, images_dir: Path, defects: list, bad_images: set):
    """Which frame each image's annotations are in: {image id: (tag, stored w, stored h)} of those
    annotated on the oriented image, a note for every tagged image, and the FrameEvidence that decided
    the images whose size fits both. Images whose size fits neither frame become defects."""
    evidence = FrameEvidence()
    for i, (sw, sh, tag) in stored.items():
        im = by_id[i]
        if tag in orientation.TRANSPOSING and not orientation.fits_both(im["width"], im["height"], sw, sh, tag):
            frame = orientation.annotation_frame(im["width"], im["height"], sw, sh, tag)
            if frame == "stored":
                evidence.stored += 1
            elif frame == "oriented":
                evidence.oriented += 1
    oriented, notes = {}, []
    for i, (sw, sh, tag) in stored.items():
        im = by_id[i]
        w, h = im["width"], im["height"]
        path = str(images_dir / im["file_name"])
        frame = orientation.annotation_frame(w, h, sw, sh, tag, when_both=evidence.frame)
        if frame is None:
            ow, oh = orientation.oriented_size(sw, sh, tag)
            extra = f" ({ow}x{oh} with its EXIF orientation {tag} applied)" if (ow, oh) != (sw, sh) else ""
            defects.append(Defect("size-mismatch", path, i, None, f"JSON says {w}x{h}, file is {sw}x{sh}{extra}"))
            bad_images.add(i)
            continue
        if tag != 1:
            notes.append(Defect("exif-orientation", path, i, None, _frame_note(tag, frame, w, h, sw, sh, evidence)))
        if frame == "oriented":
            oriented[i] = (tag, sw, sh)
    return oriented, notes, evidence


def _key(ann_file: Path, images_dir: Path) -> str:
    """The cache entry of one version of the JSON read against one images folder: the CLI and every
    tool that reads a split arrive at the same key for the same files (paths resolved)."""
    st = ann_file.stat()
    h = hashlib.sha1(f"{CHECK_VERSION}|{ann_file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{images_dir.resolve()}"
                     .encode()).hexdigest()[:16]
    return h


def _entry(ann_file: Path, images_dir: Path) -> tuple[Path, Path]:
    d = cache_dir() / "checked" / _key(ann_file, images_dir)
    return d / ann_file.name, d / "report.json"


def cached(ann_file, images_dir) -> tuple[Path, Report] | None:
    """The cached filtered copy and its report, or None."""
    out, rep_file = _entry(Path(ann_file), Path(images_dir))
    if not (out.is_file() and rep_file.is_file()):
        return None
    rep = Report.from_dict(json.loads(rep_file.read_text()))
    rep.filtered = str(out)
    return out, rep


def store(ann_file, images_dir, rep: Report, filtered: dict) -> Path:
    """Write a check's result as the cache entry of these files (the filtered copy first, the report
    last: an entry counts only once both exist)."""
    out, rep_file = _entry(Path(ann_file), Path(images_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, filtered)
    image_index(out, doc=filtered)  # the start of a run reads this, not the JSON (dali_scp.image_index)
    rep.filtered = str(out)
    atomic_write(rep_file, json.dumps(asdict(rep)))
    return out


def _check_and_store(ann_file: Path, images_dir: Path, workers: int | None, progress: bool) -> tuple[Path, Report]:
    t0 = time.perf_counter()
    workers = workers or available_cores()
    log.info("dataset check: checking %s against %s with %d worker process(es); the result is cached",
             ann_file, images_dir, workers)
    rep, filtered = check(ann_file, images_dir, workers, progress)
    if filtered is None:
        raise ValueError("; ".join(str(x) for x in rep.defects))
    out = store(ann_file, images_dir, rep, filtered)
    log.info("dataset check: %d images, %d annotations checked in %.1f s", rep.n_images, rep.n_annotations,
             time.perf_counter() - t0)
    _log_findings(rep, out.parent / "report.json")
    return out, rep


def _log_findings(rep: Report, rep_file: Path) -> None:
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


def checked_annotations(ann_file, images_dir, workers: int | None = None, progress: bool = True) -> tuple[Path, Report]:
    """The filtered annotation file for a split and its report, computed once per version of the JSON
    (cached; ``python -m dali_scp.check`` fills the same entry). Under torch.distributed one process
    per job checks and the others read its result (``dali_scp.once``): every process must call it."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    return once_per_job(lambda: cached(ann_file, images_dir),
                        lambda: _check_and_store(ann_file, images_dir, workers, progress), "dataset check")


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m dali_scp.check", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic dataset)")
    p.add_argument("--split", default="train2017", help="split name (default train2017)")
    cli.add_dataset_flag(p)
    p.add_argument("--workers", type=cli.COUNT, default=available_cores(),
                   help=f"processes decoding images (default: the cores available, here {available_cores()})")
    p.add_argument("--json", default=None, help="also write the full report as JSON here")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any defect is found")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dali_scp.dataset import resolve, split_files
    root = Path(a.coco_root) if a.coco_root else None
    if root is not None:
        ann, img = split_files(root, a.split, a.dataset)
        if not ann.is_file():
            print(f"error: {ann}: annotation file not found", file=sys.stderr)
            return 2
    else:
        sp = resolve(None, a.split, a.dataset)
        ann, img = sp.annotations, sp.images_dir
    t0 = time.perf_counter()
    rep, filtered = check(ann, img, a.workers)
    seconds = time.perf_counter() - t0
    for d in rep.defects + rep.notes:
        print(d)
    print(rep.summary())
    if filtered is not None:  # the next training run (or profiler, visualiser) starts from this
        out = store(ann, img, rep, filtered)
        print(f"checked in {seconds:.1f} s with {a.workers} worker process(es); cached for the tools: {out}")
    if a.json:
        atomic_write(Path(a.json), json.dumps(asdict(rep), indent=1))
    if filtered is None:
        print(f"error: {rep.defects[0].file}: {rep.defects[0].message}", file=sys.stderr)
    return 1 if (a.strict and rep.defects) or filtered is None else 0


if __name__ == "__main__":
    sys.exit(main())
