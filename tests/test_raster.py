"""The rasteriser against independent ground truth: a brute-force point-in-polygon test written here
and pycocotools' own rasteriser."""
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dali_scp.raster import rasterize_batch, rasterize_flat
from dali_scp.synthetic import star_polygon


def brute_force(polys, h, w):
    """Even-odd test of every pixel centre against every edge (no shared code with the rasteriser)."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros((h, w), bool)
    for p in polys:
        inside = np.zeros((h, w), bool)
        n = len(p)
        for i in range(n):
            (x0, y0), (x1, y1) = p[i], p[(i + 1) % n]
            if y0 == y1:
                continue
            cond = (yy >= min(y0, y1)) & (yy < max(y0, y1))
            xint = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
            inside ^= cond & (xx > xint)
        out |= inside
    return out


def raster_one(parts, h, w):
    verts = np.concatenate(parts)
    ends = np.cumsum([len(p) for p in parts])
    return rasterize_flat(np.zeros(len(parts), int), ends - [len(p) for p in parts], ends, verts, 1, h, w)


def test_matches_brute_force_exactly_including_multi_part_and_clipping():
    rng = np.random.default_rng(0)
    for _ in range(20):
        parts = [star_polygon(rng, rng.uniform(-20, 100), rng.uniform(-20, 80), rng.uniform(3, 40),
                              int(rng.integers(3, 61))) for _ in range(int(rng.integers(1, 4)))]
        masks, boxes, kept = raster_one(parts, 70, 90)
        ref = brute_force(parts, 70, 90)
        if not ref.any():
            assert len(kept) == 0
            continue
        assert kept.tolist() == [0]
        np.testing.assert_array_equal(masks[0].astype(bool), ref)
        ys, xs = np.nonzero(ref)
        assert boxes[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_pycocotools(seed):
    rng = np.random.default_rng(seed)
    h, w = 300, 400
    for _ in range(30):
        r = rng.uniform(18, 140)
        parts = [star_polygon(rng, rng.uniform(0, w), rng.uniform(0, h), r, int(rng.integers(10, 61)))]
        if rng.random() < 0.3:
            parts.append(star_polygon(rng, rng.uniform(0, w), rng.uniform(0, h), r / 2, 12))
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([p.ravel().tolist() for p in parts], h, w)))
        if ref.sum() < 32 * 32:
            continue
        m, _, _ = raster_one(parts, h, w)
        iou = (m[0] & ref).sum() / (m[0] | ref).sum()
        assert iou >= 0.98, iou


def test_multi_part_keeps_every_part():
    a = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], float)
    b = a + [50, 20]
    m, boxes, _ = raster_one([a, b], 64, 96)
    assert m[0, 20, 20] and m[0, 40, 70] and not m[0, 20, 45]
    assert m[0].sum() == 400 + 400
    assert boxes[0].tolist() == [10, 10, 80, 50]


def test_degenerate_and_outside_objects_are_dropped_and_batch_split_is_exact():
    square = np.array([[2, 2], [12, 2], [12, 12], [2, 12]], float)
    line = np.array([[0, 0], [5, 5]], float)
    outside = square + [500, 0]
    # sample 0: square (inst 0), line (inst 1); sample 1: outside (inst 0), square moved (inst 1)
    polys = [np.array([[0, 0, 4], [1, 4, 6]]), np.array([[0, 0, 4], [1, 4, 8]])]
    verts = [np.concatenate([square, line]), np.concatenate([outside, square + [20, 20]])]
    masks, boxes, kept = rasterize_batch(polys, verts, [2, 2], 40, 40)
    assert [k.tolist() for k in kept] == [[0], [1]]
    assert masks[0].shape == (1, 40, 40) and masks[0].sum() == 100 and masks[1][0, 25, 25] == 1
    assert boxes[1].tolist() == [[22, 22, 32, 32]]
    empty_m, empty_b, empty_k = rasterize_batch([np.zeros((0, 3), int)], [np.zeros((0, 2))], [0], 40, 40)
    assert empty_m[0].shape == (0, 40, 40) and empty_k[0].shape == (0,)


def test_batch_masks_are_padded_to_the_largest_sample():
    sq = np.array([[2, 2], [12, 2], [12, 12], [2, 12]], float)
    polys = [np.array([[0, 0, 4]]), np.array([[0, 0, 4], [1, 4, 8], [2, 8, 12]]), np.zeros((0, 3), int)]
    verts = [sq, np.concatenate([sq, sq + 15, sq + [0, 25]]), np.zeros((0, 2))]
    masks, boxes, kept = rasterize_batch(polys, verts, [1, 3, 0], 40, 40)
    assert [m.shape[0] for m in masks] == [3, 3, 3]
    assert [m.reshape(3, -1).sum(1).tolist() for m in masks] == [[100, 0, 0], [100, 100, 100], [0, 0, 0]]
    assert [len(b) for b in boxes] == [1, 3, 0]
    assert boxes[1][2].tolist() == [2, 27, 12, 37]


def test_the_gpu_branches_of_the_xp_shims_agree_with_numpy(monkeypatch):
    """The CuPy-only code paths (repeat by sorted search, cupyx scatter) driven by a NumPy stand-in, so
    CI without a GPU still executes every line the GPU will run."""
    import sys
    import types
    fake_cupy = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    fake_cupyx = types.SimpleNamespace(scatter_min=np.minimum.at, scatter_max=np.maximum.at)
    monkeypatch.setitem(sys.modules, "cupyx", fake_cupyx)
    from dali_scp.synthetic import star_polygon
    rng = np.random.default_rng(1)
    polys, verts = [], []
    for b in range(3):
        qs = [star_polygon(rng, rng.uniform(0, 64), rng.uniform(0, 48), rng.uniform(3, 30), 12) for _ in range(b + 1)]
        ends = np.cumsum([len(q) for q in qs])
        polys.append(np.stack([np.arange(len(qs)), ends - 12, ends], 1))
        verts.append(np.concatenate(qs))
    ref = rasterize_batch(polys, verts, [1, 2, 3], 48, 64, np)
    got = rasterize_batch(polys, verts, [1, 2, 3], 48, 64, fake_cupy)
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
