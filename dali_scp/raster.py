"""Polygon -> per-instance mask rasteriser, one implementation for NumPy and CuPy.

Why our own: DALI has no rasteriser, and ``fn.segmentation.select_masks`` drops all but the last
polygon of a multi-part object. We rasterise *after* the geometric transform, straight at the output
resolution, so masks are never resampled and cost is proportional to the objects' area.

Rule: pixel (r, c) belongs to an instance iff its centre (c + 0.5, r + 0.5) lies inside one of the
instance's polygons (even-odd rule per polygon, union over parts). That is the sampling rule of
pycocotools' ``frPyObjects``/``decode`` up to boundary pixels (tested: IoU >= 0.98 on objects >= 32^2).

Scanline algorithm, fully vectorised over every polygon of the batch: each edge yields one crossing
per pixel row whose centre it spans (half-open in y, so every row has an even count); crossings
sorted by (polygon, row, column) pair up into spans [c0, c1); spans are expanded into pixel writes.
"""
from __future__ import annotations

import numpy as np

from dali_scp import xp as xpm


def rasterize_flat(poly_inst, poly_start, poly_end, verts, n_inst: int, height: int, width: int, xp=np,
                   group=None, n_groups: int = 1, out=None):
    """Rasterise polygons of ``n_inst`` instances into masks.

    poly_inst: [P] instance of each polygon; poly_start/poly_end: [P] vertex range of each polygon in
    ``verts`` [V, 2] (x, y in output pixels). Returns masks [K, H, W] uint8 for the K instances that
    cover at least one pixel, tight xyxy boxes [K, 4] float32 (pixel edges), and the indices [K] of those
    instances. Polygons with fewer than 3 vertices cover nothing.

    With ``group`` ([n_inst] sorted group index, e.g. the sample of each instance) the masks come as
    [n_groups, Kmax, H, W], each group's kept instances first and zero padding after: the padded batch
    the PyTorch hand-off needs, written once instead of rasterised and then copied into padding.
    ``out`` (with ``group``): an all-zero [n_groups, capacity, H, W] buffer to write into instead of a
    fresh allocation (the caller re-zeroes what was written; fresh pages cost more than the writes).
    """
    H, W = int(height), int(width)
    idx_t = xp.int64
    poly_inst = xp.asarray(poly_inst, dtype=idx_t)
    poly_start = xp.asarray(poly_start, dtype=idx_t)
    lens = xp.asarray(poly_end, dtype=idx_t) - poly_start
    lens = xp.where(lens >= 3, lens, 0)
    verts = xp.asarray(verts, dtype=xp.float64)
    # edges: vertex a -> next vertex b within its polygon
    e_poly = xpm.repeat(xp, xp.arange(len(lens), dtype=idx_t), lens)
    local = xpm.ranks_within(xp, lens)
    a = poly_start[e_poly] + local
    b = poly_start[e_poly] + (local + 1) % xp.maximum(lens[e_poly], 1)
    x0, y0, x1, y1 = verts[a, 0], verts[a, 1], verts[b, 0], verts[b, 1]
    r0 = xp.clip(xp.ceil(xp.minimum(y0, y1) - 0.5), 0, H).astype(idx_t)
    r1 = xp.clip(xp.ceil(xp.maximum(y0, y1) - 0.5), 0, H).astype(idx_t)
    n_rows = xp.maximum(r1 - r0, 0)
    # one crossing per (edge, row)
    ce = xpm.repeat(xp, xp.arange(len(n_rows), dtype=idx_t), n_rows)
    row = r0[ce] + xpm.ranks_within(xp, n_rows)
    t = (row + 0.5 - y0[ce]) / (y1[ce] - y0[ce])
    xc = x0[ce] + t * (x1[ce] - x0[ce])
    col = xp.clip(xp.floor(xc - 0.5) + 1, 0, W).astype(idx_t)
    key = xp.sort((e_poly[ce] * H + row) * (W + 1) + col)
    start, end = key[0::2], key[1::2]
    c0, c1 = start % (W + 1), end % (W + 1)
    srow = (start // (W + 1)) % H
    sinst = poly_inst[start // ((W + 1) * H)]
    span_len = c1 - c0
    nz = span_len > 0
    c0, c1, srow, sinst, span_len = c0[nz], c1[nz], srow[nz], sinst[nz], span_len[nz]

    covered = xp.zeros(n_inst, dtype=bool)
    covered[sinst] = True
    kept = xp.nonzero(covered)[0]
    new_id = xp.cumsum(covered) - 1
    k = int(kept.shape[0])
    if group is None:
        masks = target = xp.zeros((k, H, W), dtype=xp.uint8)
        slot_of_kept = xp.arange(k, dtype=idx_t)
    else:
        g = xp.asarray(group, dtype=idx_t)[kept]
        per_group = xp.bincount(g, minlength=n_groups)
        kmax = int(per_group.max()) if n_groups else 0
        if out is not None and out.shape[0] == n_groups and out.shape[1] >= kmax and out.shape[2:] == (H, W):
            target = out
        else:
            target = xp.zeros((n_groups, kmax, H, W), dtype=xp.uint8)
        stride, masks = target.shape[1], target[:, :kmax]
        first = xp.cumsum(per_group) - per_group
        slot_of_kept = g * stride + xp.arange(k, dtype=idx_t) - first[g]
    boxes = xp.zeros((k, 4), dtype=xp.float32)
    if k == 0:
        return masks, boxes, kept
    kid = new_id[sinst]
    pix = xpm.repeat(xp, (slot_of_kept[kid] * H + srow) * W + c0, span_len) + xpm.ranks_within(xp, span_len)
    target.reshape(-1)[pix] = 1
    big = np.iinfo(np.int64).max
    lo = xp.full((2, k), big, dtype=idx_t)
    hi = xp.full((2, k), -1, dtype=idx_t)
    xpm.scatter_min(xp, lo[0], kid, c0)
    xpm.scatter_min(xp, lo[1], kid, srow)
    xpm.scatter_max(xp, hi[0], kid, c1)
    xpm.scatter_max(xp, hi[1], kid, srow + 1)
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = lo[0], lo[1], hi[0], hi[1]
    return masks, boxes, kept


def rasterize_batch(polygons, vertices, counts, height: int, width: int, xp=np, out=None):
    """Per-sample front end used by the pipeline stage: DALI's ``polygons`` [P, 3] (mask index, first
    vertex, end vertex) and ``vertices`` [V, 2] per sample, ``counts`` instances per sample.

    The whole batch is rasterised in one call (on the GPU: one set of kernels per batch, not per sample).
    Returns per-sample lists: masks [Kmax, H, W] (the sample's K kept instances first, then zero padding
    up to the batch's largest K), boxes [K, 4], kept instance indices [K].
    """
    inst_off = np.concatenate([[0], np.cumsum([int(c) for c in counts])])
    vert_off = np.concatenate([[0], np.cumsum([int(v.shape[0]) for v in vertices])])
    pi, ps, pe = [], [], []
    for i, p in enumerate(polygons):
        p = xp.asarray(p).reshape(-1, 3).astype(xp.int64)
        pi.append(p[:, 0] + int(inst_off[i]))
        ps.append(p[:, 1] + int(vert_off[i]))
        pe.append(p[:, 2] + int(vert_off[i]))
    if pi:
        cat = xp.concatenate
        verts = cat([xp.asarray(v, dtype=xp.float64).reshape(-1, 2) for v in vertices])
        group = xp.asarray(np.repeat(np.arange(len(counts)), [int(c) for c in counts]))
        masks, boxes, kept = rasterize_flat(cat(pi), cat(ps), cat(pe), verts, int(inst_off[-1]), height, width, xp,
                                            group=group, n_groups=len(counts), out=out)
    else:
        masks, boxes, kept = (xp.zeros((len(counts), 0, height, width), xp.uint8), xp.zeros((0, 4), xp.float32),
                              xp.zeros((0,), xp.int64))
    # split the batch back into samples; kept is sorted, so each sample's rows are contiguous
    bounds = xpm.to_numpy(xp.searchsorted(kept, xp.asarray(inst_off)))
    out_m, out_b, out_k = [], [], []
    for i in range(len(counts)):
        s, e = int(bounds[i]), int(bounds[i + 1])
        out_m.append(masks[i])
        out_b.append(boxes[s:e])
        out_k.append(kept[s:e] - int(inst_off[i]))
    return out_m, out_b, out_k
