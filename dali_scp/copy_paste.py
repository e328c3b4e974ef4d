"""Simple Copy-Paste (Ghiasi et al., CVPR 2021) between samples of a batch, written once against
``xp`` (NumPy on the CPU, CuPy on the GPU).

Semantics follow mmdetection's ``CopyPaste`` (the recipe behind the target table): every destination
receives a random subset of the objects of another sample's *un-pasted* image; alpha is the union of
the selected source masks; destination masks lose the pixels under alpha and are dropped when both
occlusion tests fail (box moved by more than ``bbox_occluded_thr`` px and area no more than
``mask_occluded_thr`` px) or when nothing is left. Output order: kept destination objects, then pasted.

``draw_choices`` holds all randomness, ``copy_paste`` is a pure function of its inputs, so tests and
users can call it outside DALI and the GPU result can be compared with the CPU one bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from dali_scp import xp as xpm
from dali_scp.presets import CopyPaste

@dataclass
class Choices:
    """src[b]: the sample whose objects destination b receives (-1: none); picks[b]: indices of the
    selected objects of that source."""
    src: np.ndarray
    picks: list


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform random permutation without fixed points (rejection; ~e tries on average)."""
    if n < 2:
        return np.full(n, -1)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def draw_choices(rng: np.random.Generator, counts, cfg: CopyPaste) -> Choices:
    counts = [int(c) for c in counts]
    src = derangement(rng, len(counts))
    picks = []
    for b in range(len(counts)):
        if src[b] < 0 or rng.random() >= cfg.paste_prob:
            picks.append(np.zeros(0, np.int64))
            continue
        n = counts[src[b]]
        k = int(rng.integers(0, min(n, cfg.max_num_pasted) + 1))
        picks.append(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))
    return Choices(src=src, picks=picks)


def mask_boxes(masks, xp=np):
    """Tight xyxy boxes (pixel edges) of [..., H, W] masks; all-zero box for an empty mask."""
    h, w = masks.shape[-2:]
    rows = masks.any(axis=-1).astype(xp.uint8)  # argmax over uint8: portable between NumPy and CuPy
    cols = masks.any(axis=-2).astype(xp.uint8)
    nonempty = rows.any(axis=-1)
    y0 = xp.argmax(rows, axis=-1)
    y1 = h - xp.argmax(rows[..., ::-1], axis=-1)
    x0 = xp.argmax(cols, axis=-1)
    x1 = w - xp.argmax(cols[..., ::-1], axis=-1)
    boxes = xp.stack([x0, y0, x1, y1], axis=-1).astype(xp.float32)
    return boxes * nonempty[..., None]


def masked_union(masks, sel, xp=np):
    """alpha[b] = OR of masks[b, n] over the n with sel[b, n]: [B, N, H, W] x [B, N] -> [B, H, W] bool."""
    return (masks & sel[:, :, None, None].astype(xp.uint8)).any(axis=1)


def copy_paste_batched(images, masks, counts, boxes, labels, src, sel, cfg: CopyPaste, xp=np):
    """The reference: the whole batch at once on dense masks, as plainly as the semantics can be
    written. Every other form (``copy_paste_packed`` on the CPU, ``copy_paste_packed_batched`` on the
    GPU) is tested equal to it bit for bit.

    images [B, H, W, 3] uint8; masks [B, N, H, W] uint8 (rows >= counts[b] are padding); boxes
    [B, N, 4]; labels [B, N]; src [B] source of each destination (-1: none); sel [B, N] bool: which
    objects of ``src[b]`` destination b receives. Returns images, masks [B, M, H, W], boxes [B, M, 4],
    labels [B, M], pasted flags [B, M] uint8 and the per-sample counts [B] (rows beyond are zero).
    """
    B, N, H, W = masks.shape
    ar_b = xp.arange(B)
    src = xp.asarray(src)
    valid = xp.arange(N)[None, :] < xp.asarray(counts)[:, None]
    has = src >= 0
    s_idx = xp.where(has, src, ar_b)
    sel = xp.asarray(sel, dtype=bool) & has[:, None] & valid[s_idx]
    # every source serves one destination (a permutation), so the union is taken per source
    sel_by_src = xp.zeros_like(sel)
    sel_by_src[s_idx[has]] = sel[has]
    alpha = masked_union(masks, sel_by_src, xp)[s_idx]
    if cfg.blend_sigma > 0:
        a = xpm.gaussian_filter(xp, alpha.astype(xp.float32), (0, cfg.blend_sigma, cfg.blend_sigma))[..., None]
        blended = a * images[s_idx].astype(xp.float32) + (1.0 - a) * images.astype(xp.float32)
        out_img = xp.clip(xp.rint(blended), 0, 255).astype(xp.uint8)
    else:
        out_img = xp.where(alpha[..., None], images[s_idx], images)
    dst = masks * (~alpha)[:, None].astype(xp.uint8)
    dst_boxes = mask_boxes(dst, xp)
    area = dst.sum(axis=(2, 3), dtype=xp.int64)
    moved_little = xp.all(xp.abs(dst_boxes - boxes) <= cfg.bbox_occluded_thr, axis=-1)
    keep = valid & (moved_little | (area > cfg.mask_occluded_thr)) & (area > 0)
    n_keep = keep.sum(axis=1)
    n_out = n_keep + sel.sum(axis=1)
    M = int(n_out.max()) if B else 0
    slot_keep = xp.cumsum(keep, axis=1) - 1
    slot_sel = n_keep[:, None] + xp.cumsum(sel, axis=1) - 1
    out_m = xp.zeros((B, M, H, W), xp.uint8)
    out_b = xp.zeros((B, M, 4), xp.float32)
    out_l = xp.zeros((B, M), labels.dtype)
    out_p = xp.zeros((B, M), xp.uint8)
    bi, ni = xp.nonzero(keep)
    ki = slot_keep[bi, ni]
    out_m[bi, ki], out_b[bi, ki], out_l[bi, ki] = dst[bi, ni], dst_boxes[bi, ni], labels[bi, ni]
    bj, nj = xp.nonzero(sel)
    kj, sj = slot_sel[bj, nj], s_idx[bj]
    pasted = masks[sj, nj]
    out_m[bj, kj], out_b[bj, kj], out_l[bj, kj] = pasted, mask_boxes(pasted, xp), labels[sj, nj]
    out_p[bj, kj] = 1
    return out_img, out_m, out_b, out_l, out_p, n_out


def stack_padded(arrays, xp=np):
    """Per-sample [n_i, ...] arrays -> one [B, max n, ...] zero-padded array."""
    n = max((a.shape[0] for a in arrays), default=0)
    out = xp.zeros((len(arrays), n) + tuple(arrays[0].shape[1:]), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


def choices_to_selection(choices: Choices, n: int) -> np.ndarray:
    sel = np.zeros((len(choices.picks), n), bool)
    for b, p in enumerate(choices.picks):
        sel[b, p] = True
    return sel


def copy_paste(images, masks, boxes, labels, choices: Choices, cfg: CopyPaste, xp=None):
    """The pure function, per-sample lists in and out: images [H, W, 3] uint8 (one canvas size),
    masks [n, H, W] uint8, boxes [n, 4] float32 xyxy (tight around the masks), labels [n]. Returns the
    same four lists and a fifth, ``pasted`` [n] uint8 (1 for objects that came from the source).

    NumPy arrays run the dense reference below; CuPy arrays run the packed GPU form (same result)."""
    xp = xp or xpm.get_xp(*images)
    if xp is not np:
        w = int(images[0].shape[1])
        out_img, packed, out_b, out_l, out_p = copy_paste_packed_batched(
            images, [xpm.packbits(xp, m) for m in masks], boxes, labels, choices, cfg, xp)
        rows = [xpm.unpackbits(xp, m[: lab.shape[0]])[..., :w] for m, lab in zip(packed, out_l)]
        return out_img, rows, out_b, out_l, out_p
    counts = [int(lab.shape[0]) for lab in labels]
    m = stack_padded(masks, xp)
    sel = xp.asarray(choices_to_selection(choices, m.shape[1]))
    out_img, out_m, out_b, out_l, out_p, n_out = copy_paste_batched(
        xp.stack(images), m, xp.asarray(counts), stack_padded(boxes, xp),
        stack_padded([xp.asarray(lab) for lab in labels], xp), xp.asarray(choices.src), sel, cfg, xp)
    n_out = xpm.to_numpy(n_out)
    per_sample = lambda x: [x[b, : n_out[b]] for b in range(len(images))]  # noqa: E731
    return list(out_img), per_sample(out_m), per_sample(out_b), per_sample(out_l), per_sample(out_p)


POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(a) -> int:
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return int(np.bitwise_count(a).sum(dtype=np.int64))
    return int(POPCOUNT[a].sum(dtype=np.int64))


class _Row(NamedTuple):
    """One output object of ``copy_paste_packed``. Every sample is planned before any mask is written,
    because the output's row count is the batch's largest plan. Its packed window ``win`` is copied from
    ``mask`` (an object that arrives whole: untouched or pasted) or is ``bits`` (what the paste left of a
    destination object); exactly one of the two is set."""
    mask: np.ndarray | None
    win: tuple
    bits: np.ndarray | None
    box: np.ndarray
    label: np.integer
    pasted: int


def _window8(box, h, w):
    """Rows and *byte* columns of a packed mask that hold the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (slice(max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), h)),
            slice(max(int(np.floor(x0)), 0) // 8, min((int(np.ceil(x1)) + 7) // 8, w // 8)))


def _tight_packed(sub, win):
    """Tight xyxy box of a packed window (None if empty)."""
    rows = np.flatnonzero(sub.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(sub, axis=0)))
    x0 = win[1].start * 8
    return np.array([x0 + cols[0], win[0].start + rows[0], x0 + cols[-1] + 1, win[0].start + rows[-1] + 1],
                    np.float32)


def copy_paste_packed(images, masks, boxes, labels, choices: Choices, cfg: CopyPaste, out=None, written=None):
    """The CPU fast path of ``copy_paste``, on bit-packed masks ([n, H, W/8], see ``xp.packbits``):
    identical output (tested against it), but every mask operation works on the packed bytes of the
    object's box only, so cost follows the objects' area, and masks move through DALI and into
    PyTorch at 1/8 of the bytes. On the GPU the dense, batched ``copy_paste`` is the faster form.

    Precondition (true inside the pipeline, where boxes come from the rasteriser): each box contains
    its mask. ``masks[b]`` may carry zero padding beyond ``len(labels[b])`` rows. Returns images,
    packed masks padded to [Nmax, H, W/8] per sample, boxes, labels, pasted flags.

    ``out``: an all-zero [B, capacity, H, W/8] buffer to write the masks into (fresh pages cost more
    than the writes); the windows written are appended to ``written`` so the caller can re-zero them.
    """
    h, w = images[0].shape[:2]
    out_img, plans = [], []
    for b, img in enumerate(images):
        n = len(labels[b])
        s = int(choices.src[b])
        picks = choices.picks[b]
        if s < 0 or len(picks) == 0:
            out_img.append(img)
            plans.append([_Row(mask=masks[b][j], win=_window8(boxes[b][j], h, w), bits=None, box=boxes[b][j],
                               label=labels[b][j], pasted=0) for j in range(n)])
            continue
        alpha = np.zeros((h, w // 8), np.uint8)
        ys0 = bs0 = 1 << 30
        ys1 = bs1 = 0
        for j in picks:
            win = _window8(boxes[s][j], h, w)
            alpha[win] |= masks[s][j][win]
            ys0, ys1 = min(ys0, win[0].start), max(ys1, win[0].stop)
            bs0, bs1 = min(bs0, win[1].start), max(bs1, win[1].stop)
        if cfg.blend_sigma > 0:
            from dali_scp import xp as xpm
            a = xpm.gaussian_filter(np, np.unpackbits(alpha, axis=-1).astype(np.float32), cfg.blend_sigma)[..., None]
            blended = a * images[s].astype(np.float32) + (1.0 - a) * img.astype(np.float32)
            out_img.append(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
        else:
            new = img.copy()
            pix = (slice(ys0, ys1), slice(bs0 * 8, bs1 * 8))
            # select by bit arithmetic, dst ^ ((dst ^ src) & 0xFF-mask): SIMD-friendly, 5x a masked copy
            m = np.repeat(np.unpackbits(alpha[ys0:ys1, bs0:bs1], axis=-1) * np.uint8(255), 3, axis=-1)
            d, sv = new[pix], images[s][pix]
            d[...] = d ^ ((d ^ sv) & m.reshape(d.shape))
            out_img.append(new)
        plan = []
        for j in range(n):
            win = _window8(boxes[b][j], h, w)
            sub = masks[b][j][win] & ~alpha[win]
            box = _tight_packed(sub, win)
            if box is None:
                continue
            moved_little = bool(np.all(np.abs(box - boxes[b][j]) <= cfg.bbox_occluded_thr))
            if moved_little or _popcount(sub) > cfg.mask_occluded_thr:
                plan.append(_Row(mask=None, win=win, bits=sub, box=box, label=labels[b][j], pasted=0))
        for j in picks:
            win = _window8(boxes[s][j], h, w)
            plan.append(_Row(mask=masks[s][j], win=win, bits=None, box=_tight_packed(masks[s][j][win], win),
                             label=labels[s][j], pasted=1))
        plans.append(plan)
    nmax = max((len(p) for p in plans), default=0)
    if out is not None and out.shape[0] == len(plans) and out.shape[1] >= nmax and out.shape[2:] == (h, w // 8):
        packed = out[:, :nmax]
    else:
        packed = np.zeros((len(plans), nmax, h, w // 8), np.uint8)
        written = None
    out_b, out_l, out_p = [], [], []
    for b, plan in enumerate(plans):
        for i, row in enumerate(plan):
            packed[b, i][row.win] = row.bits if row.bits is not None else row.mask[row.win]
            if written is not None:
                written.append((b, i, row.win))
        out_b.append(np.array([r.box for r in plan], np.float32).reshape(-1, 4))
        out_l.append(np.array([r.label for r in plan], dtype=labels[0].dtype if len(labels) else np.int32))
        out_p.append(np.array([r.pasted for r in plan], np.uint8))
    return out_img, list(packed), out_b, out_l, out_p


# Per-byte lookup tables for boxes from packed rows: leading zeros (first pixel = high bit), trailing
# zeros, both 8 for an empty byte, and the popcount (where ``xp.bitwise_count`` is missing).
_BYTE_LUT = np.array([[8 - i.bit_length() for i in range(256)],
                      [8 if i == 0 else (i & -i).bit_length() - 1 for i in range(256)],
                      [bin(i).count("1") for i in range(256)]], np.uint8)


@dataclass
class _Plan:
    """Everything copy-paste decides on the host (from the choices and the batch's shapes), uploaded to
    the device in one transfer."""
    sel_by_src: np.ndarray   # [B, N] bool: objects of sample s pasted somewhere
    s_idx: np.ndarray        # [B] source of each destination (itself when none)
    valid: np.ndarray        # [B, N] real (not padding) objects
    box_rows: np.ndarray     # [T] row in the [B * N] layout of each input object
    paste_rows: np.ndarray   # [Tsel] row in the [B * N] layout of each pasted object
    paste_obj: np.ndarray    # [Tsel] its index among the input objects (compact order)
    paste_dst: np.ndarray    # [Tsel] destination sample
    paste_rank: np.ndarray   # [Tsel] rank among the destination's pasted objects
    n_sel: np.ndarray        # [B] objects pasted into each destination

    @classmethod
    def make(cls, counts, choices: Choices, n: int) -> "_Plan":
        B = len(counts)
        obj_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        valid = np.arange(n)[None, :] < np.asarray(counts)[:, None]
        s_idx = np.where(choices.src >= 0, choices.src, np.arange(B)).astype(np.int64)
        sel_by_src = np.zeros((B, n), bool)
        picks = [np.asarray(p, np.int64) if choices.src[b] >= 0 else np.zeros(0, np.int64)
                 for b, p in enumerate(choices.picks)]
        for b, p in enumerate(picks):
            sel_by_src[s_idx[b], p] = True
        n_sel = np.array([len(p) for p in picks], np.int64)
        paste_dst = np.repeat(np.arange(B), n_sel)
        src_of = s_idx[paste_dst]
        flat = np.concatenate(picks) if picks else np.zeros(0, np.int64)
        box_rows = np.concatenate([b * n + np.arange(c) for b, c in enumerate(counts)]).astype(np.int64) \
            if B else np.zeros(0, np.int64)
        return cls(sel_by_src, s_idx, valid, box_rows, src_of * n + flat, obj_off[src_of] + flat, paste_dst,
                   xpm.ranks_within(np, n_sel), n_sel)

    def upload(self, xp) -> "_Plan":
        fields = [getattr(self, k) for k in self.__dataclass_fields__]
        dev = xp.asarray(np.concatenate([np.asarray(f, np.int64).ravel() for f in fields]))
        out, at = [], 0
        for f in fields:
            out.append(dev[at:at + f.size].reshape(f.shape))
            at += f.size
        return _Plan(*out)


def copy_paste_packed_batched(images, masks, boxes, labels, choices: Choices, cfg: CopyPaste, xp=np):
    """The GPU form of ``copy_paste`` (also run on NumPy in CI): the whole batch on bit-packed masks,
    never a dense mask. Alpha is an OR of packed rows, occlusion an AND-NOT, areas a popcount, boxes come
    from the packed rows and columns; a fixed number of array operations per batch whatever its size,
    one blocking host sync (how many destination objects survive, which sizes the output).

    Per-sample lists in, as DALI hands them over: images [H, W, 3] uint8, packed masks [N_b, H, W/8]
    (rows beyond the sample's objects are padding), boxes [n_b, 4] tight around the masks (the
    rasteriser's; pasted objects keep them, as in mmdetection), labels [n_b]. Returns per-sample lists:
    images, packed masks [M, H, W/8] (M the batch's largest output count, zero rows after the sample's
    own), boxes, labels, pasted flags (uint8).
    """
    B = len(images)
    counts = [int(lab.shape[0]) for lab in labels]
    H, W = int(images[0].shape[0]), int(images[0].shape[1])
    Wb = int(masks[0].shape[-1])
    rows = [int(m.shape[0]) for m in masks]
    N = max(rows + [1])
    host = _Plan.make(counts, choices, N)
    plan = host.upload(xp)
    # the batch as one array per input (one kernel each, whatever B)
    img = xpm.gather_samples(xp, images).reshape(B, H, W, 3)
    m = xpm.gather_samples(xp, masks)
    if rows != [N] * B:  # ragged input (the list API): pad to [B, N]
        padded = xp.zeros((B * N + 1, H, Wb), xp.uint8)
        padded[plan.box_rows] = m[xp.asarray(np.concatenate([np.arange(c) + o for c, o in
                                                               zip(counts, np.cumsum([0] + rows[:-1]))]))]
        m = padded[: B * N]
    m = m.reshape(B, N, H, Wb)
    box_in = xpm.gather_samples(xp, boxes, (4,)).astype(xp.float32)
    lab_in = xpm.gather_samples(xp, labels, ())
    # alpha per source (each source serves one destination), then per destination
    alpha = xpm.masked_or(xp, m, plan.sel_by_src > 0)[plan.s_idx]
    a = xpm.unpackbits(xp, alpha)[..., :W] > 0
    if cfg.blend_sigma > 0:
        af = xpm.gaussian_filter(xp, a.astype(xp.float32), (0, cfg.blend_sigma, cfg.blend_sigma))[..., None]
        blended = af * img[plan.s_idx].astype(xp.float32) + (1.0 - af) * img.astype(xp.float32)
        out_img = xp.clip(xp.rint(blended), 0, 255).astype(xp.uint8)
    else:
        out_img = xp.where(a[..., None], img[plan.s_idx], img)
    del a
    # pasted objects leave before the destinations lose the covered pixels (in place)
    pasted = m.reshape(B * N, H, Wb)[plan.paste_rows]
    m &= (~alpha)[:, None]
    # boxes and areas of what is left of every destination object
    lut = xp.asarray(_BYTE_LUT)
    row_any = (m.max(axis=-1) > 0).astype(xp.uint8)          # [B, N, H]
    col_any = (m.max(axis=2) > 0).astype(xp.uint8)           # [B, N, Wb]
    nonempty = row_any.max(axis=-1) > 0
    y0 = xp.argmax(row_any, axis=-1)
    y1 = H - xp.argmax(row_any[..., ::-1], axis=-1)
    j0 = xp.argmax(col_any, axis=-1)
    j1 = Wb - 1 - xp.argmax(col_any[..., ::-1], axis=-1)
    ib = xp.arange(B)[:, None]
    col = (xp.arange(B * N).reshape(B, N, 1) * H + xp.arange(H)) * Wb  # flat index of (b, n, row, byte 0)
    flat = m.reshape(-1)
    x0 = 8 * j0 + lut[0][flat[col + j0[..., None]]].min(axis=-1)      # first set bit of the first byte column
    x1 = 8 * j1 + 8 - lut[1][flat[col + j1[..., None]]].min(axis=-1)  # last set bit of the last one
    del col
    dst_boxes = xp.stack([x0, y0, x1, y1], axis=-1).astype(xp.float32) * nonempty[..., None]
    pop = xp.bitwise_count(m) if hasattr(xp, "bitwise_count") else lut[2][m]
    area = pop.sum(axis=(2, 3), dtype=xp.int32)
    del pop
    old = xp.zeros((B * N + 1, 4), xp.float32)
    old[plan.box_rows] = box_in
    moved_little = xp.all(xp.abs(dst_boxes - old[: B * N].reshape(B, N, 4)) <= cfg.bbox_occluded_thr, axis=-1)
    keep = (plan.valid > 0) & (moved_little | (area > cfg.mask_occluded_thr)) & (area > 0)
    n_keep_d = keep.sum(axis=1)
    n_keep = xpm.to_numpy(n_keep_d)  # host sync: sizes the output
    n_out = n_keep + host.n_sel
    M = int(n_out.max()) if B else 0
    T = int(n_out.sum())
    o_off = np.concatenate([[0], np.cumsum(n_out)]).astype(np.int64)
    off = xp.asarray(o_off)
    # kept objects, then pasted ones; rows of padding (and dropped objects) go to a dump row
    rank = xp.cumsum(keep, axis=1) - 1
    out_m = xp.zeros((B * M + 1, H, Wb), xp.uint8)
    out_m[xp.where(keep, ib * M + rank, B * M).reshape(-1)] = m.reshape(B * N, H, Wb)
    out_m[plan.paste_dst * M + n_keep_d[plan.paste_dst] + plan.paste_rank] = pasted
    del m, pasted
    keep_at = xp.where(keep, off[:-1][:, None] + rank, T).reshape(-1)
    paste_at = off[plan.paste_dst] + n_keep_d[plan.paste_dst] + plan.paste_rank
    out_b = xp.zeros((T + 1, 4), xp.float32)
    out_b[keep_at] = dst_boxes.reshape(B * N, 4)
    out_b[paste_at] = box_in[plan.paste_obj]
    lab_pad = xp.zeros(B * N + 1, lab_in.dtype)
    lab_pad[plan.box_rows] = lab_in
    out_l = xp.zeros(T + 1, lab_in.dtype)
    out_l[keep_at] = lab_pad[: B * N]
    out_l[paste_at] = lab_in[plan.paste_obj]
    out_p = xp.zeros(T + 1, xp.uint8)
    out_p[paste_at] = 1
    out_m = out_m[: B * M].reshape(B, M, H, Wb)
    cut = lambda x: [x[o_off[b]:o_off[b + 1]] for b in range(B)]  # noqa: E731
    return [out_img[b] for b in range(B)], [out_m[b] for b in range(B)], cut(out_b), cut(out_l), cut(out_p)
