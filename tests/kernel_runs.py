"""Every raw kernel's source through both GPU stages on the emulated device (dali_scp.emulated_device):
batches like tests/test_gpu.py's and the edge cases where kernels go wrong, each stage run along the
GPU path (through the CuPy stand-in, so ``gather_samples`` launches too) with every launch run as its real
grid, a capped grid in reverse order and one odd-sized block, compared byte for byte with the NumPy
twins; the stages' results are also checked against the CPU forms (dense rasteriser, dense copy-paste
reference).

    python tests/kernel_runs.py [--mode plain|address|thread] [--cases all|sanitizer] [--json FILE]
    (address, thread: runs itself again in a Python with the sanitizer's runtime preloaded)

Used by tests/test_emulated_device.py (a subprocess per mode: a kernel that crashes ends only that
process), scripts/kernel_sanitizers.sh and scripts/kernel_mutations.py. Prints one JSON line:
{"mode", "cases", "runs", "ran": {kernel: launches}, "missing": [...], "failures": [...], "seconds"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dali_scp import xp as xpm  # noqa: E402
from dali_scp.copy_paste import copy_paste, copy_paste_packed_batched, draw_choices  # noqa: E402
from dali_scp.cupy_standin import StandIn  # noqa: E402
from dali_scp.emulated_device import emulate  # noqa: E402
from dali_scp.presets import CopyPaste  # noqa: E402
from dali_scp.raster import rasterize_batch, rasterize_packed_batch  # noqa: E402
from pipelines.gpu_budget import HostBatch, coco_like_batch  # noqa: E402

# Edges whose crossing with a pixel row's centre line lies exactly on a pixel centre (x = k + 0.5): the
# twin's two roundings (x0 + round(t * dx)) and a fused multiply-add land on either side of it, so a
# contracted multiply-add moves the span's end by a pixel. Found by comparing both with exact rational
# arithmetic over random edges with vertices on whole, third- and two-third pixels.
ROUNDING_EDGES = [((45.0, 38.0), (0.0, 13.0)), ((44.33333206176758, 49.33333206176758), (8.666666984558105, 13.666666984558105)),
                  ((45.0, 46.0), (6.0, 55.0)), ((38.0, 35.0), (5.0, 50.0)), ((44.0, 16.0), (2.0, 2.0)),
                  ((38.0, 50.0), (11.0, 47.0)), ((39.0, 12.0), (0.0, 51.0))]


@dataclass
class Case:
    name: str
    batch: HostBatch
    height: int
    width: int
    aligned: bool = True
    cfg: CopyPaste = field(default_factory=CopyPaste)
    choice_seed: int = 2
    xp: str = "standin"  # "numpy": the NumPy path (every kernel but gather_samples)
    poison: int = 0xA5   # what the stand-in's ``empty`` fills outputs with


def _batch(samples, height, width, seed=0) -> HostBatch:
    """``samples``: per sample, a list of objects, each a list of polygons ([n, 2] x, y arrays)."""
    rng = np.random.default_rng(seed)
    polys, verts, cats, images = [], [], [], []
    for objects in samples:
        p, v, off = [], [], 0
        for i, parts in enumerate(objects):
            for q in parts:
                q = np.asarray(q, np.float64).reshape(-1, 2)
                p.append([i, off, off + len(q)])
                v.append(q)
                off += len(q)
        polys.append(np.array(p, np.int32).reshape(-1, 3))
        verts.append(np.concatenate(v).astype(np.float32) if v else np.zeros((0, 2), np.float32))
        cats.append(rng.integers(1, 91, len(objects)).astype(np.int32))
        images.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return HostBatch(polys, verts, cats, images)


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _blobs(rng, n, h, w, rmin=2.0, rmax=None):
    from dali_scp.synthetic import star_polygon
    rmax = rmax or max(0.3 * min(h, w), 2 * rmin)
    out = []
    for _ in range(n):
        r = float(np.exp(rng.uniform(np.log(rmin), np.log(rmax))))
        cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        out.append([star_polygon(rng, cx, cy, r, int(rng.integers(3, 40)))])
    return out


def edge_cases() -> list[Case]:
    rng = np.random.default_rng(11)
    cases = []
    H, W = 45, 67  # neither a multiple of 8; not square
    blobs = lambda n, h=H, w=W: _blobs(rng, n, h, w)  # noqa: E731
    cases.append(Case("empty samples", _batch([blobs(6), [], blobs(3), []], H, W), H, W))
    cases.append(Case("all-empty batch", _batch([[], [], []], H, W), H, W))
    cases.append(Case("one object covering the image", _batch(
        [[[_rect(-5, -5, W + 5, H + 5)]] + blobs(3), [[_rect(0, 0, W, H)]], blobs(4)], H, W), H, W))
    border = [[_rect(-10, 5, 8, 20)], [_rect(W - 3, -4, W + 9, 9)], [_rect(-3, H - 2, W + 3, H + 6)],
              [[(-20, -20), (5, -1), (-1, 5)]], [_rect(W + 1, 0, W + 9, H)], [_rect(0, -9, W, -0.5)]]  # last two: outside
    cases.append(Case("polygons crossing the border", _batch([border, blobs(5), border[::-1]], H, W), H, W))
    degenerate = [[[(3, 3), (30, 3.2), (3, 3.4)]],              # thin sliver, under a pixel high
                  [[(10, 2), (10.3, 40), (10.1, 2)]],            # thin and vertical
                  [[(5, 10), (40, 10), (60, 10)]],               # collinear, horizontal: no area
                  [[(5, 5), (20, 20), (35, 35)]],                # collinear, diagonal
                  [[(8, 8), (8, 8), (20, 8), (20, 8), (20, 30), (8, 30)]],  # repeated vertices
                  [[(1, 1), (9, 9)]], [[(4, 4)]],                # fewer than 3 vertices: nothing
                  [[(30, 5), (50, 25), (50, 5), (30, 25)]],      # self-intersecting bow tie
                  [[(0.5, 0.5), (0.5, 0.5), (0.5, 0.5)]],        # a point
                  [_rect(12, 30, 24, 40), _rect(18, 35, 30, 44), _rect(40, 30, 44, 34)]]  # overlapping parts
    cases.append(Case("thin and degenerate polygons", _batch([degenerate, blobs(4), degenerate[3:]], H, W), H, W))
    half = [[_rect(k + 0.5, k + 0.5, k + 7.5, k + 3.5)] for k in range(0, 36, 6)]
    third = [[[(k + 1 / 3, 2 / 3), (k + 6 + 2 / 3, 4 + 1 / 3), (k + 1 / 3, 30 + 2 / 3)]] for k in range(0, 60, 9)]
    cases.append(Case("vertices on half- and third-pixels", _batch([half, third, half + third], H, W), H, W))
    ra = [[[a, b, (b[0], a[1])]] for a, b in ROUNDING_EDGES]  # each edge closed into a right triangle
    cases.append(Case("crossings exactly on pixel centres", _batch([ra, ra[::-1], ra[2:]], 64, 64), 64, 64))
    for h, w in ((9, 7), (1, 1), (24, 8), (33, 130)):
        cases.append(Case(f"size {h}x{w}", _batch([blobs(4, h, w), blobs(2, h, w), blobs(5, h, w)], h, w), h, w))
    crowd = _blobs(rng, 300, 96, 96, 1.0, 12.0)
    cases.append(Case("300 objects in one sample", _batch([crowd, crowd[:150], _blobs(rng, 2, 96, 96)], 96, 96), 96, 96,
                      cfg=CopyPaste(max_num_pasted=300)))
    cases.append(Case("one sample: nothing to paste", _batch([blobs(5)], H, W), H, W))
    cases.append(Case("paste_prob 0", _batch([blobs(5), blobs(4)], H, W), H, W, cfg=CopyPaste(paste_prob=0.0)))
    cases.append(Case("occlusion thresholds 0", _batch([blobs(8), blobs(8), blobs(8)], H, W), H, W,
                      cfg=CopyPaste(bbox_occluded_thr=0.0, mask_occluded_thr=0)))
    cases.append(Case("blended paste", coco_like_batch(4, 8, 64, 9), 64, 64, cfg=CopyPaste(blend_sigma=1.0)))
    cases.append(Case("the NumPy path", coco_like_batch(4, 10, 100, 5), 100, 100, xp="numpy"))
    for c in cases[:]:  # and every edge case again with every sample at an odd address
        if c.xp == "standin":
            cases.append(Case(c.name + " (unaligned)", c.batch, c.height, c.width, False, c.cfg, c.choice_seed + 1,
                              poison=0xFF))
    return cases


def stage_batches(seeds=range(4)) -> list[Case]:
    """tests/test_gpu.py's batches: 6 samples of up to 20 COCO-like objects at 320^2 (40-byte mask rows) and
    100^2 (13-byte rows), aligned and unaligned."""
    out = []
    for seed in seeds:
        for size, aligned in ((320, True), (100, True), (320, False), (100, False)):
            out.append(Case(f"coco-like {size} seed {seed}" + ("" if aligned else " (unaligned)"),
                            coco_like_batch(6, 20, size, seed), size, size, aligned, choice_seed=seed,
                            poison=0xA5 if seed % 2 else 0xFF))
    return out


CASE_SETS = {"all": lambda: stage_batches(range(10)) + edge_cases(),
             "sanitizer": lambda: stage_batches(range(1)) + edge_cases()}


def _unaligned(xp, a):
    """A C-contiguous copy of ``a`` at an odd address: the kernels' byte paths instead of their words."""
    out = xp.empty(a.nbytes + 1, xp.uint8)[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def run_case(c: Case) -> None:
    """Both stages along the GPU path (every launch emulated and compared inside ``emulate()``), then
    their results against the CPU forms."""
    xp = np if c.xp == "numpy" else StandIn(poison=c.poison)
    dev = (lambda xs: [x.copy() for x in xs]) if xp is np else (
        lambda xs: [xp.asarray(x) if c.aligned else _unaligned(xp, xp.asarray(x)) for x in xs])
    host = (lambda xs: list(xs)) if xp is np else (lambda xs: [x.get() for x in xs])
    b, H, W = c.batch, c.height, c.width
    masks, boxes, labels = rasterize_packed_batch(dev(b.polygons), dev(b.vertices), dev(b.cat_ids), H, W, xp)
    cm, cb, ck = rasterize_batch(b.polygons, b.vertices, [len(x) for x in b.cat_ids], H, W)
    hm, hb, hl = host(masks), host(boxes), host(labels)
    for i in range(len(hm)):
        k = len(ck[i])
        assert np.array_equal(np.unpackbits(hm[i][:k], axis=-1)[..., :W], cm[i][:k]), f"{c.name}: masks of sample {i}"
        assert np.array_equal(hb[i], cb[i]) and np.array_equal(hl[i], b.cat_ids[i][ck[i]]), f"{c.name}: boxes of sample {i}"
    ch = draw_choices(np.random.default_rng(c.choice_seed), [len(x) for x in hl], c.cfg)
    if xp is not np and not c.aligned:
        masks, boxes, labels = ([_unaligned(xp, x) for x in xs] for xs in (masks, boxes, labels))
    out = copy_paste_packed_batched(dev(b.images), masks, boxes, labels, ch, c.cfg, xp)
    dense = [np.unpackbits(m[:len(lab)], axis=-1)[..., :W] for m, lab in zip(hm, hl)]
    ref = copy_paste(list(b.images), dense, hb, hl, ch, c.cfg, xp=np)
    got = [host(x) for x in out]
    for i in range(len(b.images)):
        n = len(ref[3][i])
        if c.cfg.blend_sigma > 0:
            assert np.abs(got[0][i].astype(int) - ref[0][i].astype(int)).max() <= 1, f"{c.name}: image {i}"
        else:
            assert np.array_equal(got[0][i], ref[0][i]), f"{c.name}: image {i}"
        assert np.array_equal(np.unpackbits(got[1][i][:n], axis=-1)[..., :W], ref[1][i]), f"{c.name}: pasted masks of sample {i}"
        for j, what in ((2, "boxes"), (3, "labels"), (4, "pasted flags")):
            assert np.array_equal(got[j][i], ref[j][i]), f"{c.name}: {what} of sample {i}"


def run_gathers(xp) -> None:
    """``gather_samples`` on its own: dtypes, tails, empty samples, and samples at odd addresses."""
    rng = np.random.default_rng(0)
    for dtype, tail in ((np.uint8, (5, 3)), (np.float32, (2,)), (np.int32, ()), (np.float64, (3,))):
        arrays = [rng.integers(0, 200, (int(n),) + tail).astype(dtype) for n in rng.integers(0, 40, 11)]
        arrays.append(np.zeros((0,) + tail, dtype))
        got = xpm.gather_samples(xp, [xp.asarray(a) for a in arrays], tail)
        assert np.array_equal(got.get(), np.concatenate(arrays))
    base = xp.asarray(np.arange(1000, dtype=np.uint8))
    views = [base[1 + 37 * i: 1 + 37 * i + 33] for i in range(9)]
    assert np.array_equal(xpm.gather_samples(xp, views, ()).get(), np.concatenate([v.get() for v in views]))
    big = [xp.asarray(rng.integers(0, 255, n, dtype=np.uint8)) for n in (4096 * 16 + 5, 16, 0, 31)]
    assert np.array_equal(xpm.gather_samples(xp, big, ()).get(), np.concatenate([v.get() for v in big]))


# --- planted bugs the plain run cannot see and a sanitizer must (tests/test_emulated_device.py checks that
# each sanitizer runtime really reports, so a clean sanitizer run means something) -------------------------

@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_planted_race(const int* x, long long n, int* out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[0] = max(out[0], x[i]);  /* a read-modify-write that needs atomicMax */
}
""", register=False)
def PLANTED_RACE(x, n, out):
    out[0] = max(int(out[0]), int(x[:int(n)].max(initial=out[0])))


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_planted_overread(const int* x, long long n, int* out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i <= n; i += (long long)gridDim.x * blockDim.x)
        if (x[i] == -123456789) out[0] = 1;  /* reads x[n], one past the end: no visible effect */
}
""", register=False)
def PLANTED_OVERREAD(x, n, out):
    pass


def run_planted(name: str) -> None:
    k = {"race": PLANTED_RACE, "overread": PLANTED_OVERREAD}[name]
    x = np.arange(1000, dtype=np.int32)
    out = np.zeros(1, np.int32)
    k(np, 2, 256, x, np.int64(x.size), out)


def run_all(mode: str = "plain", which: str = "all", planted: str | None = None) -> dict:
    t0 = time.time()
    cases = CASE_SETS[which]()
    failures = []
    if planted:
        cases = []
    with emulate(mode) as dev:
        if planted:
            run_planted(planted)
        for c in cases:
            try:
                run_case(c)
            except AssertionError as e:
                failures.append(f"{c.name}: {e}")
        try:
            if not planted:
                run_gathers(StandIn())
        except AssertionError as e:
            failures.append(f"gather_samples: {e}")
    return {"mode": mode, "cases": len(cases), "runs": dev.runs, "ran": dict(sorted(dev.ran.items())),
            "missing": sorted(set(xpm.KERNELS) - set(dev.ran)), "failures": failures,
            "seconds": round(time.time() - t0, 1)}


def in_subprocess(mode: str, *args: str, timeout: float = 900):
    """Run this file in a fresh Python for ``mode`` (its sanitizer runtime preloaded); returns the
    CompletedProcess and the summary (None when the run ended without one: a crash or a sanitizer report)."""
    import subprocess
    from dali_scp.emulated_device import prepare, sanitizer_env
    prepare(list(xpm.KERNELS.values()), mode)  # compiled here, without the runtime preloaded
    args = [x for i, x in enumerate(args) if x != "--mode" and (i == 0 or args[i - 1] != "--mode")]
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode", mode, *args], env=sanitizer_env(mode),
                       capture_output=True, text=True, timeout=timeout)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    return p, (json.loads(lines[-1]) if lines else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="plain", choices=("plain", "address", "thread"))
    ap.add_argument("--cases", default="all", choices=sorted(CASE_SETS))
    ap.add_argument("--json", help="also write the summary here")
    ap.add_argument("--planted", choices=("race", "overread"),
                    help="run only a planted bug (the sanitizer that should see it must end the run)")
    a = ap.parse_args(argv)
    from dali_scp.emulated_device import RUNTIMES
    if a.mode in RUNTIMES and RUNTIMES[a.mode] not in os.environ.get("LD_PRELOAD", ""):
        # by hand: the same run again in a Python with the sanitizer's runtime preloaded
        p, _ = in_subprocess(a.mode, *(argv if argv is not None else sys.argv[1:]))
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
        return p.returncode
    summary = run_all(a.mode, a.cases, a.planted)
    line = json.dumps(summary)
    print(line, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    return 1 if summary["failures"] or (summary["missing"] and not a.planted) else 0


if __name__ == "__main__":
    sys.exit(main())
