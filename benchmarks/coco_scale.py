"""What the input side costs at COCO 2017's scale: the dataset check (cold, time and peak memory), the
warm start of training to its first iteration (1 process and 2 under torchrun: one check per job),
evaluation of 5,000 images x 100 detections, and the order statistics of the training stream.

The dataset is written cheaply: COCO-2017's image count (118,287 train, 5,000 val), its objects per
image, object sizes, polygon vertex counts, ~1% crowd regions stored as RLE and its 80 category ids,
but every image file is a hard link to one of a few JPEGs made with PIL at COCO's common sizes. So the
JSON is COCO-sized (~480 MB) and the files are real JPEGs, while the disk holds a few hundred KB of
pixels. ``--scale 0.1`` writes a tenth for a quick run.

    python benchmarks/coco_scale.py [--scale 0.1] [--root /tmp/coco_scale] [--json out.json] [--md out.md]
    python benchmarks/coco_scale.py --only write --scale 1     # just the dataset

Each measurement runs in its own process with a fresh private cache where it says "cold"; its peak
memory is the process's own high-water mark (VmHWM, read inside it: ``ru_maxrss`` is not usable here,
Linux carries it over from the parent across fork and exec). Times are wall-clock on whatever else the machine runs: the
report records the load average before each step so contention can be read off.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

# COCO 2017 (instances_train2017.json / instances_val2017.json)
COCO_TRAIN_IMAGES, COCO_VAL_IMAGES = 118_287, 5_000
COCO_CAT_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
                33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
                60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]
# (width, height, share of the images): COCO's most common sizes, the rest folded into the nearest
COCO_SIZES = [(640, 480, 0.42), (640, 427, 0.20), (480, 640, 0.14), (427, 640, 0.08), (640, 426, 0.06),
              (500, 375, 0.05), (612, 612, 0.05)]
MEAN_OBJECTS = 7.36        # 870,913 annotations / 118,287 images (crowd included)
EMPTY_SHARE = 0.0086       # 1,021 train images have no annotation
CROWD_SHARE = 0.01         # iscrowd=1, stored as uncompressed RLE
MULTI_PART_SHARE = 0.1     # objects split into 2-3 polygons (occlusion)
# object size: sqrt(area) lognormal fitted to COCO's 41% small (< 32²) / 34% medium / 24% large (> 96²)
SIZE_MU, SIZE_SIGMA = 3.745, 1.215


def _jpeg(path: Path, w: int, h: int, seed: int) -> None:
    """A photo-like JPEG (smooth shading plus fine texture; ~100-200 KB at 640x480 quality 90)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    low = rng.normal(0, 1, (h // 32 + 2, w // 32 + 2, 3))
    img = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 200 + 20).astype(np.uint8)).resize(
        (w, h), Image.BICUBIC), np.float32)
    img += rng.normal(0, 14, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def _objects_per_image(rng, n: int) -> np.ndarray:
    """1 + negative binomial (COCO's long tail: many images with few objects, some with dozens, max
    93), ~0.9% empty."""
    k = 1 + rng.negative_binomial(1.3, 1.3 / (1.3 + MEAN_OBJECTS - 1 + EMPTY_SHARE), n)
    k = np.minimum(k, 93)
    k[rng.random(n) < EMPTY_SHARE] = 0
    return k


def _polygon(rng, cx, cy, r, n, w, h) -> list:
    """A star-shaped polygon of n vertices around (cx, cy), clipped to the image, 2 decimals as COCO."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.55, 1.0, n)
    xy = np.stack([np.clip(cx + rad * np.cos(ang), 0, w), np.clip(cy + rad * np.sin(ang), 0, h)], 1)
    return np.round(xy, 2).reshape(-1).tolist()


def _shoelace(p) -> float:
    x, y = np.asarray(p[0::2]), np.asarray(p[1::2])
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _crowd_rle(rng, w, h) -> tuple[dict, list, float]:
    """An uncompressed column-major RLE of a large rectangle (COCO's crowd regions are large)."""
    bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    counts = [x0 * h + y0]
    for _ in range(bw - 1):
        counts += [bh, h - bh]
    counts += [bh, (w - x0 - bw) * h + (h - y0 - bh)]
    return dict(size=[h, w], counts=counts), [float(x0), float(y0), float(bw), float(bh)], float(bw * bh)


def _annotations(rng, image_id: int, w: int, h: int, k: int, next_id: int, cat_p: np.ndarray) -> list:
    out = []
    sizes = np.exp(rng.normal(SIZE_MU, SIZE_SIGMA, k))
    cats = rng.choice(len(COCO_CAT_IDS), k, p=cat_p)
    for j in range(k):
        a = dict(id=next_id + j, image_id=image_id, category_id=COCO_CAT_IDS[cats[j]], iscrowd=0)
        if rng.random() < CROWD_SHARE:
            seg, box, area = _crowd_rle(rng, w, h)
            out.append(dict(a, iscrowd=1, segmentation=seg, bbox=box, area=area))
            continue
        r = float(np.clip(sizes[j] / 1.45, 1.5, min(w, h) / 2))
        n = int(np.clip(rng.lognormal(np.log(11 + r / 5), 0.45), 3, 300))  # bigger objects, more vertices
        parts = 1 if rng.random() >= MULTI_PART_SHARE else int(rng.integers(2, 4))
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        seg = [_polygon(rng, cx + (p and rng.uniform(-r, r)), cy + (p and rng.uniform(-r, r)), r / (1 + p),
                        max(n // (1 + p), 3), w, h) for p in range(parts)]
        xs = [v for p in seg for v in p[0::2]]
        ys = [v for p in seg for v in p[1::2]]
        x0, y0 = min(xs), min(ys)
        out.append(dict(a, segmentation=seg, bbox=[x0, y0, round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
                        area=round(sum(_shoelace(p) for p in seg), 2)))
    return out


def _write_json(path: Path, images: list, annotations: list, categories: list) -> None:
    """In chunks: the C encoder's speed without a 500 MB string in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write('{"info": {"description": "COCO-2017-sized benchmark data (benchmarks/coco_scale.py)"}, ')
        f.write('"categories": ' + json.dumps(categories) + ', "images": ' + json.dumps(images) + ', "annotations": [')
        for i in range(0, len(annotations), 20000):
            f.write((", " if i else "") + json.dumps(annotations[i:i + 20000])[1:-1])
        f.write("]}")


def write_dataset(root: Path, scale: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """COCO's layout under ``root``; returns what was written (counts, JSON sizes, seconds)."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    pix = root / "pixels"
    pix.mkdir(parents=True, exist_ok=True)
    files = []
    for k, (w, h, _) in enumerate(COCO_SIZES):
        f = pix / f"{w}x{h}.jpg"
        if not f.is_file():
            _jpeg(f, w, h, seed + k)
        files.append(f)
    share = np.array([s for *_, s in COCO_SIZES])
    cat_p = 1.0 / np.arange(1, 81) ** 0.9
    cat_p[0] = 0.0
    cat_p = cat_p / cat_p.sum() * 0.7
    cat_p[0] = 0.3  # person: ~30% of COCO's objects
    categories = [dict(id=c, name=f"cat{c}", supercategory="thing") for c in COCO_CAT_IDS]
    out = {}
    for split, n_full in (("train2017", COCO_TRAIN_IMAGES), ("val2017", COCO_VAL_IMAGES)):
        n = max(int(round(n_full * scale)), 1)
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        sizes = rng.choice(len(COCO_SIZES), n, p=share / share.sum())
        counts = _objects_per_image(rng, n)
        images, anns = [], []
        first_id = 1 if split == "train2017" else 10_000_000
        for i in tqdm(range(n), desc=f"writing {split}", unit="img", disable=not progress, leave=False):
            iid = first_id + i
            w, h, _ = COCO_SIZES[sizes[i]]
            name = f"{iid:012d}.jpg"
            target = d / name
            if not target.exists():
                os.link(files[sizes[i]], target)
            images.append(dict(id=iid, file_name=name, width=w, height=h, license=1,
                               coco_url=f"http://images.cocodataset.org/{split}/{name}", date_captured=""))
            anns += _annotations(rng, iid, w, h, int(counts[i]), first_id * 10 + len(anns), cat_p)
        ann_file = root / "annotations" / f"instances_{split}.json"
        _write_json(ann_file, images, anns, categories)
        out[split] = dict(images=n, annotations=len(anns), crowd=sum(a["iscrowd"] for a in anns),
                          json_mb=round(ann_file.stat().st_size / 1e6, 1))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (root / "dataset.json").write_text(json.dumps(out))
    return out


def describe_dataset(root: Path) -> dict:
    """What ``write_dataset`` wrote (counted in a child process when it left no record: this process
    stays small, its children would inherit its peak)."""
    if not (root / "dataset.json").is_file():
        code = ("import json, sys; from pathlib import Path; r = Path(sys.argv[1]); out = {}\n"
                "for s in ('train2017', 'val2017'):\n"
                "    f = r / 'annotations' / f'instances_{s}.json'; d = json.loads(f.read_text())\n"
                "    out[s] = dict(images=len(d['images']), annotations=len(d['annotations']), "
                "crowd=sum(a.get('iscrowd', 0) for a in d['annotations']), json_mb=round(f.stat().st_size / 1e6, 1))\n"
                "(r / 'dataset.json').write_text(json.dumps(out))")
        subprocess.run([sys.executable, "-c", code, str(root)], check=True)
    return dict(json.loads((root / "dataset.json").read_text()), reused=True)


# ------------------------------------------------------------------ measuring
def _load() -> float:
    return round(os.getloadavg()[0], 2)


def vmhwm_mb() -> int:
    """This process's peak RSS (of its own address space since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return -1


def _probe_peak(out: Path, argv: list) -> int:
    """``-m MODULE ARGS``: run a module's CLI in this process, then record its peak RSS."""
    import runpy
    sys.argv = [argv[1], *argv[2:]]
    rc = 0
    try:
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out.write_text(json.dumps(dict(peak_rss_mb=vmhwm_mb())))
    return rc


def _measure(cmd: list, env: dict, log: Path, timeout: float = 3600) -> dict:
    """Run ``cmd``: wall seconds, the load average before. ``cmd`` = ``[-m, MODULE, ...]`` runs that
    module's CLI through ``_probe_peak`` and adds its peak RSS."""
    peak = None
    if cmd[0] == "-m":
        peak = log.with_suffix(".peak.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-peak", str(peak), "--", *cmd]
    load = _load()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        try:
            status = p.wait()
        except BaseException:
            p.kill()
            raise
    seconds = time.perf_counter() - t0
    rc = status
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({rc}): {log.read_text()[-2000:]}")
    m = dict(seconds=round(seconds, 1), load_before=load)
    return dict(m, **json.loads(peak.read_text())) if peak else m


def _env(cache: Path, **extra) -> dict:
    return dict(os.environ, DALI_SCP_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def measure_check(root: Path, work: Path, workers: int) -> dict:
    """A cold ``python -m dali_scp.check`` (fresh cache) with ``workers`` processes."""
    cache = Path(tempfile.mkdtemp(prefix="cache_", dir=work))
    m = _measure(["-m", "dali_scp.check", "--coco-root", str(root), "--workers", str(workers)],
                 _env(cache), work / f"check_w{workers}.log")
    return dict(m, workers=workers, cache=str(cache))


def _probe_train(out: Path, argv: list) -> int:
    """Inside each training process: when its first iteration starts (seconds since the launch,
    BENCH_T0), its peak RSS then and at the end, and how many dataset checks it ran."""
    from dali_scp import check as check_mod
    from trainer import run
    t0 = float(os.environ["BENCH_T0"])
    rec = dict(rank=int(os.environ.get("RANK", 0)), checks=0)
    real_check, real_losses = check_mod.check, run.compute_losses

    def counting_check(*a, **kw):
        rec["checks"] += 1
        return real_check(*a, **kw)

    def first_losses(*a, **kw):
        if "first_iteration_s" not in rec:
            rec["first_iteration_s"] = round(time.time() - t0, 1)
            rec["peak_rss_mb_before_first_iteration"] = vmhwm_mb()
        return real_losses(*a, **kw)

    check_mod.check, run.compute_losses = counting_check, first_losses
    rc = run.main(argv)
    rec["peak_rss_mb"] = vmhwm_mb()
    (out / f"rank{rec['rank']}.json").write_text(json.dumps(rec))
    return rc


def measure_training_start(root: Path, work: Path, cache: Path, nproc: int, name: str) -> dict:
    """trainer.run --preset demo --coco-root ROOT --max-iters 1 --no-eval, in 1 process or under
    torchrun; per process: seconds from launch to its first iteration, peak RSS, checks run."""
    out = work / name
    out.mkdir()
    args = ["--preset", "demo", "--coco-root", str(root), "--max-iters", "1", "--no-eval", "--batch-size", "2",
            "--out", str(out / "run")]
    me = [str(Path(__file__).resolve()), "--probe-train", str(out), "--"]
    if nproc == 1:
        cmd = [sys.executable, *me, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), *me, *args]
    m = _measure(cmd, _env(cache, BENCH_T0=repr(time.time())), work / f"{name}.log")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return dict(m, processes=nproc, ranks=ranks)


def measure_evaluation(root: Path, work: Path, per_image: int = 100, seed: int = 0) -> dict:
    """Scores a results file of ``per_image`` detections (box + mask RLE) on every val image with
    ``python -m trainer.evaluate --results`` (wall and peak RSS: loading, validation, COCOeval bbox
    and segm)."""
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(seed)
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    results = []
    for im in doc["images"]:
        w, h = im["width"], im["height"]
        bw, bh = rng.uniform(4, w / 2, per_image), rng.uniform(4, h / 2, per_image)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes = np.round(np.stack([x, y, bw, bh], 1), 2)
        rles = mask_utils.frPyObjects(np.ascontiguousarray(boxes, np.float64), h, w)
        cats = rng.choice(COCO_CAT_IDS, per_image)
        scores = np.round(rng.random(per_image), 4)
        for b, r, c, s in zip(boxes.tolist(), rles, cats.tolist(), scores.tolist()):
            results.append(dict(image_id=im["id"], category_id=c, bbox=b, score=s,
                                segmentation=dict(size=r["size"], counts=r["counts"].decode())))
    res_file = work / "eval_results.json"
    res_file.write_text(json.dumps(results))
    m = _measure(["-m", "trainer.evaluate", "--results", str(res_file), "--coco-root", str(root)],
                 _env(work / "eval_cache"), work / "eval.log")
    return dict(m, images=len(doc["images"]), detections=len(results), tool="python -m trainer.evaluate --results")


def _stream_ids(root: Path, split: str, seed: int, n: int, batch: int = 64) -> list:
    """The image ids of the first ``n`` samples of the training stream (CocoLoader, infinite=True, one
    process), read through the pipeline itself (``none``, tiny output: decoding is the cost)."""
    from dali_scp.dataset import resolve
    from pipelines.iterator import CocoLoader
    loader = CocoLoader("none", resolve(root, split), batch_size=batch, out_size=32, seed=seed, infinite=True,
                        num_threads=max(len(os.sched_getaffinity(0)), 1))
    ids = []
    for _, targets in loader:
        ids += [t["image_id"] for t in targets]
        if len(ids) >= n:
            return ids[:n]


def measure_order(root: Path, n: int = 4096) -> dict:
    """Spearman rho of the training stream's order: seed 1 vs seed 2 over the first ``n`` images of
    train2017 (position by position, by index in the file), and epoch 1 vs epoch 2 over the first
    ``n`` images of each epoch of val2017 read as a training set (an epoch of train2017 is 118k
    images: too long to stream on a CPU here; the reader's shuffling does not depend on the split).
    A seeded permutation per epoch gives rho ~ 0 (± 2/sqrt(n)); a sequential reader gives ~1."""
    from scipy.stats import spearmanr
    out = {}
    for split in ("train2017", "val2017"):
        doc = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        index = {im["id"]: k for k, im in enumerate(doc["images"])}
        size = len(index)
        if split == "train2017":
            a, b = (np.array([index[i] for i in _stream_ids(root, split, s, min(n, size))]) for s in (1, 2))
            key = "seed1_vs_seed2"
        else:
            k = min(n, size)
            ids = _stream_ids(root, split, 1, size + k)
            a, b = np.array([index[i] for i in ids[:k]]), np.array([index[i] for i in ids[size:size + k]])
            key = "epoch1_vs_epoch2"
        out[key] = dict(split=split, images_in_split=size, n=len(a), rho=round(float(spearmanr(a, b)[0]), 4),
                        rho_first_stream_vs_file_order=round(float(spearmanr(a, np.arange(len(a)))[0]), 4))
    return out


def markdown(r: dict) -> str:
    """The section for benchmarks/RESULTS.md."""
    d = r["dataset"]["train2017"]
    lines = [f"## COCO-2017-sized data (`benchmarks/coco_scale.py --scale {r['scale']}`)", "",
             f"{d['images']:,} train images, {d['annotations']:,} annotations ({d['crowd']:,} crowd RLE), "
             f"{d['json_mb']} MB JSON; {r['dataset']['val2017']['images']:,} val images. Machine: {r['machine']}. "
             "Wall times on whatever else ran (1-min load average before each step in brackets); peak RSS: the "
             "process's own high-water mark (VmHWM; under torchrun the largest rank's; the check's worker "
             "processes are forked before the JSON is parsed and stay small).", "",
             "| step | seconds | peak RSS | notes |", "|---|---|---|---|"]
    for c in r["check"]:
        lines.append(f"| cold dataset check, {c['workers']} worker(s) | {c['seconds']} [{c['load_before']}] | "
                     f"{c['peak_rss_mb']} MB | `python -m dali_scp.check --workers {c['workers']}`, fresh cache |")
    for s in r["train_start"]:
        per = "; ".join(f"rank {x['rank']}: first iteration at {x.get('first_iteration_s')} s, peak "
                        f"{x.get('peak_rss_mb_before_first_iteration')} MB before it, {x['checks']} check(s)"
                        for x in s["ranks"])
        lines.append(f"| {s['label']} | {s['seconds']} [{s['load_before']}] | "
                     f"{max(x['peak_rss_mb'] for x in s['ranks'])} MB | {per} |")
    if r.get("evaluation"):
        e = r["evaluation"]
        lines.append(f"| evaluation, {e['images']:,} images × {e['detections'] // max(e['images'], 1)} detections | "
                     f"{e['seconds']} [{e['load_before']}] | {e['peak_rss_mb']} MB | `{e['tool']}` (bbox + segm) |")
    lines.append("")
    if r.get("order"):
        lines += ["Training stream order (Spearman rho of file positions, position by position; ~0 = independent "
                  "orders, ~1 = the same order):", ""]
        for k, o in r["order"].items():
            lines.append(f"- {k.replace('_', ' ')}: rho = {o['rho']} over the first {o['n']:,} images of {o['split']} "
                         f"({o['images_in_split']:,} images); first stream vs file order rho = "
                         f"{o['rho_first_stream_vs_file_order']}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe-train"]:
        return _probe_train(Path(argv[1]), argv[3:])
    if argv[:1] == ["--probe-peak"]:
        return _probe_peak(Path(argv[1]), argv[3:])
    from dali_scp import cli
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=cli.Number(float, 0, 1, open_low=True), default=1.0, help="fraction of COCO's image counts to write (default 1)")
    p.add_argument("--root", default=None, help="dataset folder (default: /tmp/coco_scale_<scale>); reused if there")
    p.add_argument("--work", default=None, help="folder for caches, runs and logs (default: a new temp folder)")
    p.add_argument("--check-workers", type=cli.COUNT, nargs="+", default=[len(os.sched_getaffinity(0))],
                   help="worker counts for the cold check (default: the cores available)")
    p.add_argument("--only", nargs="+", choices=["write", "check", "train", "eval", "order"],
                   default=["write", "check", "train", "eval", "order"], help="steps to run (default: all)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--md", default=None, help="write the markdown section here")
    a = p.parse_args(argv)
    root = Path(a.root or f"/tmp/coco_scale_{a.scale:g}")
    work = Path(a.work or tempfile.mkdtemp(prefix="coco_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    r = dict(scale=a.scale, root=str(root), machine=f"{len(os.sched_getaffinity(0))} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {sys.platform}")
    t0 = time.perf_counter()
    done = root / "annotations" / "instances_val2017.json"
    r["dataset"] = write_dataset(root, a.scale) if not done.is_file() else describe_dataset(root)
    print(json.dumps(r["dataset"]), flush=True)
    r["check"], r["train_start"] = [], []
    if "check" in a.only or "train" in a.only:
        for w in a.check_workers:
            r["check"].append(measure_check(root, work, w))
            print("check", json.dumps(r["check"][-1]), flush=True)
    if "train" in a.only:
        warm = Path(r["check"][-1]["cache"])  # filled by the CLI's check: the runs below start warm
        for nproc, cache, label in ((1, warm, "warm start, 1 process"), (2, warm, "warm start, 2 processes (torchrun)"),
                                    (2, Path(tempfile.mkdtemp(prefix="cold2_", dir=work)),
                                     "cold start, 2 processes (torchrun): one check per job")):
            s = measure_training_start(root, work, cache, nproc, label.split(":")[0].replace(" ", "_").replace(",", "")
                                       .replace("(", "").replace(")", ""))
            r["train_start"].append(dict(s, label=label))
            print("train", json.dumps(r["train_start"][-1]), flush=True)
    if "eval" in a.only:
        r["evaluation"] = measure_evaluation(root, work)
        print("eval", json.dumps(r["evaluation"]), flush=True)
    if "order" in a.only:
        os.environ["DALI_SCP_CACHE"] = str(Path(r["check"][-1]["cache"]) if r["check"] else work / "order_cache")
        r["order"] = measure_order(root)
        print("order", json.dumps(r["order"]), flush=True)
    r["total_seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    md = markdown(r)
    if a.md:
        Path(a.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
