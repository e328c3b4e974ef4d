"""Polygon -> per-instance mask rasteriser, one rule for NumPy and CuPy.

Why our own: DALI has no rasteriser, and ``fn.segmentation.select_masks`` drops all but the last
polygon of a multi-part object. We rasterise *after* the geometric transform, straight at the output
resolution, so masks are never resampled and cost is proportional to the objects' area.

Rule: pixel (r, c) belongs to an instance iff its centre (c + 0.5, r + 0.5) lies inside one of the
instance's polygons (even-odd rule per polygon, union over parts). That is the sampling rule of
pycocotools' ``frPyObjects``/``decode`` up to boundary pixels (tested: IoU >= 0.98 on objects >= 32^2).

Scanline algorithm, fully vectorised over every polygon of the batch (``spans``): each edge yields one
crossing per pixel row whose centre it spans (half-open in y, so every row has an even count);
crossings sorted by (polygon, row, column) pair up into spans [c0, c1). Two writers share it:

- ``rasterize_flat`` / ``rasterize_batch`` (the CPU): spans expanded into pixel writes of dense masks.
- ``rasterize_packed_batch`` (the GPU form, also run on NumPy in CI): the union of each instance's
  spans becomes a handful of *toggle* bits per row, written straight into bit-packed masks, and one
  prefix-XOR along the row fills them. A fixed number of array operations per batch whatever its size,
  two blocking host syncs (the crossing count, then the kept count per sample), no dense mask at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dali_scp import xp as xpm


def polygon_area(points: np.ndarray) -> float:
    """Area of one polygon, vertices [n, 2] (x, y) in order (shoelace formula; the dataset check drops
    zero-area polygons, the synthetic generator writes the COCO ``area`` field)."""
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


@dataclass
class Spans:
    """Horizontal runs [c0, c1) of row ``row`` inside polygon ``poly`` (possibly empty: c0 == c1)."""
    poly: object
    row: object
    c0: object
    c1: object


def spans(poly_start, poly_end, verts, height: int, width: int, xp=np) -> Spans:
    """The scanline core. Edges are indexed by their first vertex, so their number is the vertex count
    (a shape the host knows); the one data-dependent size is the number of crossings (one host sync on
    the GPU). Polygons must not share vertices (DALI's layout); ``Spans.poly`` indexes the polygons as
    given; polygons with fewer than 3 vertices cover nothing."""
    H, W = int(height), int(width)
    i64 = xp.int64
    n_vert, n_poly = int(verts.shape[0]), int(poly_start.shape[0])
    if n_poly == 0 or n_vert == 0:
        z = xp.zeros(0, dtype=i64)
        return Spans(z, z, z, z)
    poly_start, poly_end = xp.asarray(poly_start, dtype=i64), xp.asarray(poly_end, dtype=i64)
    # polygons without vertices first among equal starts, so a vertex's owner is the real polygon
    order = xp.argsort(poly_start * 2 + (poly_end > poly_start))
    start_sorted = poly_start[order]
    vid = xp.arange(n_vert, dtype=i64)
    owner_s = xp.clip(xp.searchsorted(start_sorted, vid, side="right") - 1, 0, n_poly - 1)
    owner = order[owner_s]
    start = start_sorted[owner_s]
    end = poly_end[owner]
    valid = (vid >= start) & (vid < end) & (end - start >= 3)
    nxt = xp.where(vid + 1 < end, vid + 1, start)
    verts = xp.asarray(verts, dtype=xp.float64)
    x0, y0, x1, y1 = verts[:, 0], verts[:, 1], verts[nxt, 0], verts[nxt, 1]
    r0 = xp.clip(xp.ceil(xp.minimum(y0, y1) - 0.5), 0, H).astype(i64)
    r1 = xp.clip(xp.ceil(xp.maximum(y0, y1) - 0.5), 0, H).astype(i64)
    n_rows = xp.where(valid, xp.maximum(r1 - r0, 0), 0)
    ends = xp.cumsum(n_rows)
    total = int(ends[-1])  # host sync: the crossing count sizes everything after it
    # one crossing per (edge, row); edge of crossing k: the first edge whose running count exceeds k
    k = xp.arange(total, dtype=i64)
    ce = xp.searchsorted(ends, k, side="right")
    row = r0[ce] + k - (ends - n_rows)[ce]
    t = (row + 0.5 - y0[ce]) / (y1[ce] - y0[ce])
    xc = x0[ce] + t * (x1[ce] - x0[ce])
    col = xp.clip(xp.floor(xc - 0.5) + 1, 0, W).astype(i64)
    key = xp.sort((owner[ce] * H + row) * (W + 1) + col)
    a, b = key[0::2], key[1::2]
    return Spans(poly=a // ((W + 1) * H), row=(a // (W + 1)) % H, c0=a % (W + 1), c1=b % (W + 1))


def rasterize_flat(poly_inst, poly_start, poly_end, verts, n_inst: int, height: int, width: int, xp=np,
                   group=None, n_groups: int = 1, out=None):
    """Rasterise polygons of ``n_inst`` instances into dense masks (the CPU writer).

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
    idx_t = np.int64
    poly_inst = np.asarray(poly_inst, dtype=idx_t)
    sp = spans(np.asarray(poly_start), np.asarray(poly_end), np.asarray(verts), H, W, np)
    span_len = sp.c1 - sp.c0
    nz = span_len > 0
    c0, c1, srow, sinst, span_len = sp.c0[nz], sp.c1[nz], sp.row[nz], poly_inst[sp.poly[nz]], span_len[nz]

    covered = np.zeros(n_inst, dtype=bool)
    covered[sinst] = True
    kept = np.nonzero(covered)[0]
    new_id = np.cumsum(covered) - 1
    k = int(kept.shape[0])
    if group is None:
        masks = target = np.zeros((k, H, W), dtype=np.uint8)
        slot_of_kept = np.arange(k, dtype=idx_t)
    else:
        g = np.asarray(group, dtype=idx_t)[kept]
        per_group = np.bincount(g, minlength=n_groups)
        kmax = int(per_group.max()) if n_groups else 0
        if out is not None and out.shape[0] == n_groups and out.shape[1] >= kmax and out.shape[2:] == (H, W):
            target = out
        else:
            target = np.zeros((n_groups, kmax, H, W), dtype=np.uint8)
        stride, masks = target.shape[1], target[:, :kmax]
        first = np.cumsum(per_group) - per_group
        slot_of_kept = g * stride + np.arange(k, dtype=idx_t) - first[g]
    boxes = np.zeros((k, 4), dtype=np.float32)
    if k == 0:
        return masks, boxes, kept
    kid = new_id[sinst]
    pix = np.repeat((slot_of_kept[kid] * H + srow) * W + c0, span_len) + xpm.ranks_within(np, span_len)
    target.reshape(-1)[pix] = 1
    big = np.iinfo(np.int64).max
    lo = np.full((2, k), big, dtype=idx_t)
    hi = np.full((2, k), -1, dtype=idx_t)
    np.minimum.at(lo[0], kid, c0)
    np.minimum.at(lo[1], kid, srow)
    np.maximum.at(hi[0], kid, c1)
    np.maximum.at(hi[1], kid, srow + 1)
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = lo[0], lo[1], hi[0], hi[1]
    return masks, boxes, kept


def _batch_layout(polygons, vertices, counts):
    """Host-side offsets that put every sample's polygons into one batch-wide index space (shapes only:
    no device data is read)."""
    n_poly = [int(p.shape[0]) for p in polygons]
    inst_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    vert_off = np.concatenate([[0], np.cumsum([int(v.shape[0]) for v in vertices])]).astype(np.int64)
    sample = np.repeat(np.arange(len(counts)), n_poly)
    return inst_off, vert_off, sample


def rasterize_batch(polygons, vertices, counts, height: int, width: int, xp=np, out=None):
    """Per-sample front end of the CPU writer: DALI's ``polygons`` [P, 3] (mask index, first vertex, end
    vertex) and ``vertices`` [V, 2] per sample, ``counts`` instances per sample.

    The whole batch is rasterised in one call. Returns per-sample lists: masks [Kmax, H, W] (the sample's
    K kept instances first, then zero padding up to the batch's largest K), boxes [K, 4], kept instance
    indices [K].
    """
    counts = [int(c) for c in counts]
    inst_off, vert_off, sample = _batch_layout(polygons, vertices, counts)
    if sum(int(p.shape[0]) for p in polygons):
        p = np.concatenate([np.asarray(p).reshape(-1, 3).astype(np.int64) for p in polygons])
        verts = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1, 2) for v in vertices])
        group = np.repeat(np.arange(len(counts)), counts)
        masks, boxes, kept = rasterize_flat(p[:, 0] + inst_off[sample], p[:, 1] + vert_off[sample],
                                            p[:, 2] + vert_off[sample], verts, int(inst_off[-1]), height, width,
                                            np, group=group, n_groups=len(counts), out=out)
    else:
        masks, boxes, kept = (np.zeros((len(counts), 0, height, width), np.uint8), np.zeros((0, 4), np.float32),
                              np.zeros((0,), np.int64))
    # split the batch back into samples; kept is sorted, so each sample's rows are contiguous
    bounds = np.searchsorted(kept, inst_off)
    out_m, out_b, out_k = [], [], []
    for i in range(len(counts)):
        s, e = int(bounds[i]), int(bounds[i + 1])
        out_m.append(masks[i])
        out_b.append(boxes[s:e])
        out_k.append(kept[s:e] - int(inst_off[i]))
    return out_m, out_b, out_k


@dataclass
class PackedMasks:
    """The GPU writer's result for a batch of B samples."""
    masks: object   # [B, Kmax, H, ceil(W/8)] uint8, bit-packed (first pixel in the high bit); rows >= K_b zero
    boxes: object   # [sum K_b, 4] float32 xyxy, sample after sample
    kept: object    # [sum K_b] batch-wide index of each kept instance
    counts: list    # K_b per sample, on the host


def rasterize_packed(poly_inst, poly_start, poly_end, verts, inst_sample, inst_off, height: int, width: int,
                     xp=np, inst_off_dev=None) -> PackedMasks:
    """Rasterise straight into bit-packed masks (the GPU writer; runs on NumPy too).

    poly_*: batch-wide polygon table sorted by ``poly_start`` (device); ``inst_sample`` [n_inst] the
    sample of each instance (device, sorted); ``inst_off`` [B + 1] host offsets of each sample's
    instances. Each instance's spans are merged into their union by a running count over span start/end
    events; only the union's boundaries become toggle bits (distinct, so a scatter-*add* into 32-bit
    words ORs them), and a prefix XOR along each packed row turns toggles into the mask.
    """
    H, W = int(height), int(width)
    Wb = (W + 7) // 8
    i64, i32 = xp.int64, xp.int32
    B = len(inst_off) - 1
    n_inst = int(inst_off[-1])
    sp = spans(poly_start, poly_end, verts, H, W, xp)
    sinst = xp.asarray(poly_inst, dtype=i64)[sp.poly]
    nonempty = (sp.c1 > sp.c0).astype(i32)
    # kept instances and their slots: sample-major, in instance order (as the CPU writer)
    cov = xp.zeros(n_inst, dtype=i32)
    xpm.scatter_max(xp, cov, sinst, nonempty)
    rank = xp.cumsum(cov, dtype=i64) - cov          # exclusive: kept instances before this one
    rank_at = xp.concatenate([rank, rank[-1:] + cov[-1:]]) if n_inst else xp.zeros(1, dtype=i64)
    inst_off_dev = xp.asarray(inst_off) if inst_off_dev is None else inst_off_dev
    starts = rank_at[inst_off_dev]                  # kept instances before each sample (and the total)
    counts = xpm.to_numpy(starts[1:] - starts[:-1])  # host sync: sizes of the outputs
    counts = [int(c) for c in counts]
    kmax, total = max(counts, default=0), sum(counts)
    slot = xp.where(cov > 0, inst_sample * kmax + rank - starts[:-1][inst_sample], B * kmax)  # dump row B*kmax
    # span events: +1 at c0, -1 at c1, sorted by (slot, row, col); the low bit says start (1) or end (0)
    pos = ((slot[sinst] * H + sp.row) * (W + 1))
    ev = xp.sort(xp.concatenate([(pos + sp.c0) * 2 + 1, (pos + sp.c1) * 2]))
    delta = (ev & 1) * 2 - 1
    at = ev >> 1
    run_count = xp.cumsum(delta)
    before = (run_count - delta)[xp.searchsorted(at, at, side="left")]  # count before this position's events
    last = xp.concatenate([at[1:] != at[:-1], xp.ones(1 if ev.shape[0] else 0, dtype=bool)])
    col = at % (W + 1)
    toggle = last & ((run_count != 0) != (before != 0)) & (col < 8 * Wb)  # a span ending at the row's end needs none
    # toggle bits into the packed rows, addressed as little-endian 32-bit words
    n_bytes = (B * kmax + 1) * H * Wb
    buf = xp.zeros((n_bytes + 3) // 4, dtype=xp.uint32)
    col = xp.minimum(col, 8 * Wb - 1)  # keep the (zero) add of a dropped toggle in bounds
    byte = (at // (W + 1)) * Wb + col // 8
    bit = (byte % 4) * 8 + 7 - col % 8
    xpm.scatter_add(xp, buf, byte // 4, toggle.astype(xp.uint32) << bit.astype(xp.uint32))
    packed = buf.view(xp.uint8)[:n_bytes].reshape(B * kmax + 1, H, Wb)
    prefix_xor_rows(packed, xp)
    masks = packed[: B * kmax].reshape(B, kmax, H, Wb)
    # tight boxes from the spans (empty spans take neutral values), and the kept instances in output order
    big = np.iinfo(np.int32).max
    box = []
    for vals, fill, scatter in ((sp.c0, big, xpm.scatter_min), (sp.row, big, xpm.scatter_min),
                                (sp.c1, -1, xpm.scatter_max), (sp.row + 1, -1, xpm.scatter_max)):
        edge = xp.full(n_inst, fill, dtype=i32)
        scatter(xp, edge, sinst, xp.where(nonempty > 0, vals, fill).astype(i32))
        box.append(edge)
    kept = xp.zeros(total + 1, dtype=i64)
    kept[xp.where(cov > 0, rank, total)] = xp.arange(n_inst, dtype=i64)
    kept = kept[:total]
    boxes = xp.stack(box, axis=1)[kept].astype(xp.float32)
    return PackedMasks(masks, boxes, kept, counts)


def prefix_xor_rows(packed, xp=np):
    """In place: every bit becomes the XOR of itself and all earlier bits of its row (first pixel in
    the high bit): toggles -> filled spans. Within a byte by three shifts, across bytes by the parity
    of the bytes before (a running sum mod 2)."""
    for s in (1, 2, 4):
        packed ^= packed >> s
    odd = packed & 1
    par = xp.cumsum(odd, axis=-1, dtype=xp.uint8)  # inclusive count of odd bytes, mod 256
    par -= odd                                     # exclusive
    del odd
    par &= 1
    par *= 255
    packed ^= par


def rasterize_packed_batch(polygons, vertices, labels, height: int, width: int, xp=np):
    """Per-sample front end of the packed writer, as DALI hands a batch over: ``polygons`` [P, 3] (mask
    index, first vertex, end vertex), ``vertices`` [V, 2], ``labels`` [n] per sample, on the device.

    One gather per input for the whole batch, one upload of host-known offsets, then
    ``rasterize_packed``. Returns per-sample lists (views of batch arrays): packed masks [Kmax, H, W/8]
    (kept instances first, zero rows after), boxes [K, 4] and labels [K] of the kept instances."""
    counts = [int(lab.shape[0]) for lab in labels]
    B = len(counts)
    inst_off, vert_off, sample = _batch_layout(polygons, vertices, counts)
    n_poly, n_inst = len(sample), int(inst_off[-1])
    table = xp.asarray(np.concatenate([inst_off[sample], vert_off[sample],
                                       np.repeat(np.arange(B, dtype=np.int64), counts), inst_off]))
    p = xpm.gather_samples(xp, polygons, (3,)).astype(xp.int64)
    verts = xpm.gather_samples(xp, vertices, (2,))
    cats = xpm.gather_samples(xp, labels, ())
    poly_off, vert_off_d = table[:n_poly], table[n_poly:2 * n_poly]
    pm = rasterize_packed(p[:, 0] + poly_off, p[:, 1] + vert_off_d, p[:, 2] + vert_off_d, verts,
                          table[2 * n_poly:2 * n_poly + n_inst], inst_off, height, width, xp,
                          inst_off_dev=table[2 * n_poly + n_inst:])
    cats = cats[pm.kept]
    ends = np.cumsum(pm.counts)
    return ([pm.masks[i] for i in range(B)], [pm.boxes[e - c:e] for c, e in zip(pm.counts, ends)],
            [cats[e - c:e] for c, e in zip(pm.counts, ends)])
