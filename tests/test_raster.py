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


def _random_batch(rng, b, h, w):
    """Samples of 0-6 objects: overlapping multi-part objects, degenerate parts (< 3 vertices), objects
    partly or wholly off the canvas, polygons listed out of vertex order."""
    polys, verts, labels = [], [], []
    for _ in range(b):
        n = int(rng.integers(0, 7))
        p, v, off = [], [], 0
        for i in range(n):
            cx, cy, r = rng.uniform(-15, w + 15), rng.uniform(-15, h + 15), rng.uniform(1, 25)
            for _ in range(int(rng.integers(1, 4))):
                q = star_polygon(rng, cx + rng.uniform(-r, r), cy + rng.uniform(-r, r), r, int(rng.integers(3, 40)))
                if rng.random() < 0.1:
                    q = q[:2]
                p.append([i, off, off + len(q)])
                v.append(q)
                off += len(q)
        p = np.array(p, np.int32).reshape(-1, 3)
        polys.append(p[rng.permutation(len(p))])
        verts.append(np.concatenate(v).astype(np.float32) if v else np.zeros((0, 2), np.float32))
        labels.append(rng.integers(1, 90, n).astype(np.int32))
    return polys, verts, labels


@pytest.mark.parametrize("w", [40, 44, 64, 96])  # 5, 6, 8, 12 bytes a row: words across rows, padding bits
@pytest.mark.parametrize("seed", range(3))
def test_packed_gpu_writer_equals_dense_writer_bit_for_bit(seed, w):
    """The GPU writer (toggles + prefix XOR on packed bits), run on NumPy and through the CuPy stand-in,
    against the CPU writer - itself tested against brute force above."""
    from dali_scp.cupy_standin import StandIn
    from dali_scp.raster import rasterize_packed_batch
    rng = np.random.default_rng(seed)
    h = 48
    polys, verts, labels = _random_batch(rng, 5, h, w)
    cm, cb, ck = rasterize_batch(polys, verts, [len(lab) for lab in labels], h, w)
    xp = StandIn()
    dev = lambda xs: [xp.asarray(x) for x in xs]  # noqa: E731
    for got in (rasterize_packed_batch(polys, verts, labels, h, w, np),
                rasterize_packed_batch(dev(polys), dev(verts), dev(labels), h, w, xp)):
        gm, gb, gl = [[x.get() if hasattr(x, "get") else x for x in o] for o in got]
        for i in range(len(polys)):
            np.testing.assert_array_equal(gm[i], np.packbits(cm[i], axis=-1))  # padding bits zero too
            np.testing.assert_array_equal(gb[i], cb[i])
            np.testing.assert_array_equal(gl[i], labels[i][ck[i]])


@pytest.mark.parametrize("packed", [False, True])
def test_an_empty_polygon_sharing_a_start_does_not_hide_the_real_one(packed):
    from dali_scp.raster import rasterize_packed_batch
    sq = np.array([[2, 2], [12, 2], [12, 12], [2, 12]], np.float32)
    for polys in (np.array([[0, 0, 0], [0, 0, 4]], np.int32), np.array([[0, 0, 4], [0, 0, 0]], np.int32)):
        if packed:
            m, _, _ = rasterize_packed_batch([polys], [sq], [np.array([1], np.int32)], 16, 16, np)
            m = np.unpackbits(m[0], axis=-1)
        else:
            m = rasterize_batch([polys], [sq], [1], 16, 16)[0][0]
        assert m.shape[0] == 1 and m[0].sum() == 100


def test_packed_writer_takes_the_union_of_overlapping_parts():
    """Two overlapping squares of one object: the union (800 - 100 px), not even-odd across parts
    (which would leave the 100 px overlap out) - checked against brute force."""
    from dali_scp.raster import rasterize_packed_batch
    a = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], np.float32)
    b = a + 10
    verts = [np.concatenate([a, b])]
    m, boxes, _ = rasterize_packed_batch([np.array([[0, 0, 4], [0, 4, 8]], np.int32)], verts,
                                         [np.array([7], np.int32)], 48, 48, np)
    dense = np.unpackbits(m[0][0], axis=-1).astype(bool)
    np.testing.assert_array_equal(dense, brute_force([a, b], 48, 48))
    assert dense.sum() == 700 and boxes[0].tolist() == [[10, 10, 40, 40]]
