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
        # mmdetection's randint(0, min(n + 1, max_num_pasted)): at most max_num_pasted - 1 objects
        k = int(rng.integers(0, max(min(n + 1, cfg.max_num_pasted), 1)))
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


# a packed mask byte -> the 3 channels of its 8 pixels, 0x00 or 0xFF each
_RGB_OF_BITS = np.repeat(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1) * np.uint8(255), 3, axis=1)


def _composite(dst, src, alpha, rows: slice, cols8: slice, new=None):
    """A copy of ``dst`` (into ``new`` if given) showing ``src`` where the packed ``alpha`` is set, inside
    ``rows`` x byte columns ``cols8``. Bit arithmetic, dst ^ ((dst ^ src) & 0xFF-mask): SIMD-friendly, 5x
    a masked copy."""
    if new is None:
        new = dst.copy()
    else:
        np.copyto(new, dst)
    pix = (rows, slice(cols8.start * 8, cols8.stop * 8))
    d = new[pix]
    m = _RGB_OF_BITS[alpha[rows, cols8]].reshape(d.shape)
    x = np.bitwise_xor(d, src[pix])
    x &= m
    d ^= x
    return new


def copy_paste_packed(images, masks, boxes, labels, choices: Choices, cfg: CopyPaste, out=None, written=None,
                      pool=None, image_out=None):
    """The CPU fast path of ``copy_paste``, on bit-packed masks ([n, H, W/8], see ``xp.packbits``):
    identical output (tested against it), but every mask operation works on the packed bytes of the
    object's box only, so cost follows the objects' area, and masks move through DALI and into
    PyTorch at 1/8 of the bytes. On the GPU the dense, batched ``copy_paste`` is the faster form.

    Precondition (true inside the pipeline, where boxes come from the rasteriser): each box contains
    its mask. ``masks[b]`` may carry zero padding beyond ``len(labels[b])`` rows. Returns images,
    packed masks padded to [Nmax, H, W/8] per sample, boxes, labels, pasted flags.

    ``out``: an all-zero [B, capacity, H, W/8] buffer to write the masks into (fresh pages cost more
    than the writes); the windows written are appended to ``written`` so the caller can re-zero them.
    ``pool`` (a ``concurrent.futures`` executor): composites the images in its threads (NumPy releases
    the GIL over whole arrays; a CPU pipeline's stage otherwise runs on one core). ``image_out``: a
    [B, H, W, 3] array the composited images are written into (reused: fresh pages again cost more).
    """
    h, w = images[0].shape[:2]
    out_img, plans, composites = [], [], {}
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
            composites[b] = (img, images[s], alpha, slice(ys0, ys1), slice(bs0, bs1),
                             None if image_out is None else image_out[b])
            out_img.append(None)
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
    for b, new in zip(composites, (pool.map if pool is not None else map)(lambda a: _composite(*a),
                                                                          composites.values())):
        out_img[b] = new
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


# --- the GPU form: five raw kernels (each with its NumPy twin), masks read in place from DALI's samples ---

@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_paste_alpha(const u8_samples* masks, const long long* paste_off,
                                               const long long* paste_src, const long long* paste_row,
                                               long long plane, long long n_dst, unsigned char* alpha) {
    /* alpha[b] = OR of the packed masks pasted into destination b (rows paste_row of sample paste_src);
       a destination per grid row, 32-bit words when every plane it touches is 4-byte aligned */
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    for (long long b = blockIdx.y; b < n_dst; b += gridDim.y) {
        const long long t0 = paste_off[b], t1 = paste_off[b + 1];
        unsigned char* out = alpha + b * plane;
        bool words = plane % 4 == 0 && ((unsigned long long)out & 3) == 0;
        for (long long t = t0; t < t1 && words; ++t) words = (masks[paste_src[t]] & 3) == 0;
        if (words) {
            for (long long i = first; i < plane / 4; i += step) {
                unsigned int v = 0;
                for (long long t = t0; t < t1; ++t)
                    v |= ((const unsigned int*)(masks[paste_src[t]] + paste_row[t] * plane))[i];
                ((unsigned int*)out)[i] = v;
            }
        } else {
            for (long long i = first; i < plane; i += step) {
                unsigned char v = 0;
                for (long long t = t0; t < t1; ++t) v |= ((const unsigned char*)masks[paste_src[t]])[paste_row[t] * plane + i];
                out[i] = v;
            }
        }
    }
}
""")
def PASTE_ALPHA(masks, paste_off, paste_src, paste_row, plane, n_dst, alpha):
    a = alpha.reshape(int(n_dst), int(plane))
    for b in range(int(n_dst)):
        a[b] = 0
        for t in range(int(paste_off[b]), int(paste_off[b + 1])):
            a[b] |= masks[paste_src[t]].reshape(-1)[paste_row[t] * plane:(paste_row[t] + 1) * plane]


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_dst_stats(const u8_samples* masks, const unsigned char* alpha,
                                             const long long* obj_sample, const long long* obj_row,
                                             const float* box_in, long long n_obj, int height, int row_bytes,
                                             float bbox_thr, double mask_thr, int* box_out, unsigned char* keep) {
    /* a block per object: what alpha leaves of it - tight box (zeros when empty), area - and whether it
       stays: something left, and the box moved by at most bbox_thr or more than mask_thr pixels left.
       Read as 32-bit words when aligned: bytes reversed (__byte_perm) put the word's first pixel in the
       top bit, so leading/trailing zeros give the first/last pixel */
    __shared__ int lo[2], hi[2];
    __shared__ unsigned long long s_area;
    const int plane = height * row_bytes;
    for (long long o = blockIdx.x; o < n_obj; o += gridDim.x) {
        if (threadIdx.x == 0) { lo[0] = lo[1] = 2147483647; hi[0] = hi[1] = -1; s_area = 0; }
        __syncthreads();
        const unsigned char* m = (const unsigned char*)masks[obj_sample[o]] + obj_row[o] * plane;
        const unsigned char* a = alpha + obj_sample[o] * plane;
        int x0 = 2147483647, y0 = 2147483647, x1 = -1, y1 = -1;
        unsigned long long area = 0;
        if (row_bytes % 4 == 0 && (((unsigned long long)m | (unsigned long long)a) & 3) == 0) {
            const int per_row = row_bytes / 4;
            for (int k = threadIdx.x; k < plane / 4; k += blockDim.x) {
                const unsigned int v = ((const unsigned int*)m)[k] & ~((const unsigned int*)a)[k];
                if (!v) continue;
                const int row = k / per_row, px = (k % per_row) * 32;
                const unsigned int be = __byte_perm(v, 0, 0x0123);
                area += __popc(v);
                y0 = min(y0, row);
                y1 = max(y1, row + 1);
                x0 = min(x0, px + __clz(be));
                x1 = max(x1, px + 33 - __ffs(be));
            }
        } else {
            for (int i = threadIdx.x; i < plane; i += blockDim.x) {
                const unsigned int v = m[i] & ~a[i] & 0xFFu;
                if (!v) continue;
                const int row = i / row_bytes, px = (i % row_bytes) * 8;
                area += __popc(v);
                y0 = min(y0, row);
                y1 = max(y1, row + 1);
                x0 = min(x0, px + __clz(v) - 24);  /* first pixel: the byte's highest set bit */
                x1 = max(x1, px + 9 - __ffs(v));   /* one past the last: its lowest set bit */
            }
        }
        if (area) {
            atomicAdd(&s_area, area);
            atomicMin(lo, x0); atomicMin(lo + 1, y0); atomicMax(hi, x1); atomicMax(hi + 1, y1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const bool any = s_area > 0;
            const int bx[4] = {any ? lo[0] : 0, any ? lo[1] : 0, any ? hi[0] : 0, any ? hi[1] : 0};
            bool little = true;
            for (int j = 0; j < 4; ++j) {
                box_out[4 * o + j] = bx[j];
                little = little && fabsf(__fsub_rn((float)bx[j], box_in[4 * o + j])) <= bbox_thr;
            }
            keep[o] = any && (little || (double)s_area > mask_thr);
        }
        __syncthreads();
    }
}
""")
def DST_STATS(masks, alpha, obj_sample, obj_row, box_in, n_obj, height, row_bytes, bbox_thr, mask_thr,
              box_out, keep):
    plane = int(height) * int(row_bytes)
    a = alpha.reshape(-1, plane)
    bi, bo = box_in.reshape(-1, 4), box_out.reshape(-1, 4)
    for o in range(int(n_obj)):
        s, r = obj_sample[o], obj_row[o]
        m = (masks[s].reshape(-1)[r * plane:(r + 1) * plane] & ~a[s]).reshape(int(height), int(row_bytes))
        area = _popcount(m)
        if area == 0:
            bo[o], keep[o] = 0, 0
            continue
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(m, axis=0)))
        bo[o] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        little = bool(np.all(np.abs(bo[o].astype(np.float32) - bi[o]) <= bbox_thr))
        keep[o] = little or area > mask_thr


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_paste_masks(const u8_samples* masks, const unsigned char* alpha,
                                               const long long* row_code, const long long* obj_sample,
                                               const long long* obj_row, long long plane, long long n_rows,
                                               unsigned char* out) {
    /* every byte of every output row (a row per grid row): row_code 2*o is object o less its
       destination's alpha, 2*o+1 object o pasted whole, -1 a zero row of padding; 16-byte words when
       aligned */
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    for (long long r = blockIdx.y; r < n_rows; r += gridDim.y) {
        const long long code = row_code[r], o = code >> 1;
        unsigned char* dst = out + r * plane;
        const unsigned char* src = code >= 0 ? (const unsigned char*)masks[obj_sample[o]] + obj_row[o] * plane : 0;
        const unsigned char* a = code >= 0 && !(code & 1) ? alpha + obj_sample[o] * plane : 0;
        if (plane % 16 == 0 && (((unsigned long long)dst | (unsigned long long)src | (unsigned long long)a) & 15) == 0) {
            for (long long i = first; i < plane / 16; i += step) {
                uint4 v = make_uint4(0, 0, 0, 0);
                if (src) v = ((const uint4*)src)[i];
                if (a) {
                    const uint4 m = ((const uint4*)a)[i];
                    v.x &= ~m.x; v.y &= ~m.y; v.z &= ~m.z; v.w &= ~m.w;
                }
                ((uint4*)dst)[i] = v;
            }
        } else {
            for (long long i = first; i < plane; i += step)
                dst[i] = src ? (unsigned char)(src[i] & (a ? ~a[i] : 0xFF)) : 0;
        }
    }
}
""")
def PASTE_MASKS(masks, alpha, row_code, obj_sample, obj_row, plane, n_rows, out):
    plane = int(plane)
    a, dst = alpha.reshape(-1, plane), out.reshape(int(n_rows), plane)
    for r, code in enumerate(row_code):
        if code < 0:
            dst[r] = 0
            continue
        o = code >> 1
        s, j = obj_sample[o], obj_row[o]
        dst[r] = masks[s].reshape(-1)[j * plane:(j + 1) * plane]
        if not code & 1:
            dst[r] &= ~a[s]


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_paste_rows(const long long* row_code, const int* box_kept,
                                              const float* box_in, long long n_out, float* out_box,
                                              unsigned char* out_pasted) {
    /* boxes and pasted flags of the output objects: a kept object's box after the paste, a pasted
       object's own box */
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n_out; t += step) {
        const long long o = row_code[t] >> 1, pasted = row_code[t] & 1;
        for (int j = 0; j < 4; ++j) out_box[4 * t + j] = pasted ? box_in[4 * o + j] : (float)box_kept[4 * o + j];
        out_pasted[t] = (unsigned char)pasted;
    }
}
""")
def PASTE_ROWS(row_code, box_kept, box_in, n_out, out_box, out_pasted):
    o, pasted = row_code >> 1, row_code & 1
    out_box.reshape(-1, 4)[:] = np.where(pasted[:, None] > 0, box_in.reshape(-1, 4)[o],
                                         box_kept.reshape(-1, 4)[o].astype(np.float32))
    out_pasted[:] = pasted


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_paste_images(const u8_samples* images, const unsigned char* alpha,
                                                const long long* s_idx, long long n_dst, int height, int width,
                                                int row_bytes, unsigned char* out) {
    /* out[b] = the source's pixel under alpha, the destination's own elsewhere ([H, W, 3] uint8). An
       image row per grid row; a thread per alpha byte: 8 pixels, 24 bytes, six 32-bit words blended as
       (dst & ~sel) | (src & sel) when aligned */
    const int first = blockIdx.x * blockDim.x + threadIdx.x, step = gridDim.x * blockDim.x;
    for (long long r = blockIdx.y; r < n_dst * height; r += gridDim.y) {
        const long long b = r / height, row = (r % height) * width * 3;
        const unsigned char* d = (const unsigned char*)images[b] + row;
        const unsigned char* s = (const unsigned char*)images[s_idx[b]] + row;
        unsigned char* o = out + r * width * 3;
        const unsigned char* a = alpha + r * row_bytes;
        const bool words = width % 8 == 0 && (((unsigned long long)d | (unsigned long long)s | (unsigned long long)o) & 3) == 0;
        for (int c = first; c < row_bytes; c += step) {
            const unsigned int bits = a[c];
            if (words) {
                const unsigned int* d4 = (const unsigned int*)(d + 24 * c);
                const unsigned int* s4 = (const unsigned int*)(s + 24 * c);
                unsigned int* o4 = (unsigned int*)(o + 24 * c);
                for (int w = 0; w < 6; ++w) {
                    unsigned int sel = 0;
                    for (int j = 0; j < 4; ++j)
                        if ((bits >> (7 - (4 * w + j) / 3)) & 1) sel |= 0xFFu << (8 * j);
                    o4[w] = (d4[w] & ~sel) | (s4[w] & sel);
                }
            } else {
                for (int j = 0; j < 24 && 8 * c + j / 3 < width; ++j)
                    o[24 * c + j] = ((bits >> (7 - j / 3)) & 1 ? s : d)[24 * c + j];
            }
        }
    }
}
""")
def PASTE_IMAGES(images, alpha, s_idx, n_dst, height, width, row_bytes, out):
    a = alpha.reshape(int(n_dst), int(height), int(row_bytes))
    o = out.reshape(int(n_dst), int(height), int(width), 3)
    for b in range(int(n_dst)):
        bit = np.unpackbits(a[b], axis=-1)[:, :int(width), None] > 0
        o[b] = np.where(bit, images[s_idx[b]].reshape(o.shape[1:]), images[b].reshape(o.shape[1:]))


@dataclass
class _Plan:
    """What copy-paste decides on the host from the choices and the batch's shapes, before any device
    data is read; uploaded in one transfer."""
    obj_sample: np.ndarray   # [T] sample of each input object (sample after sample)
    obj_row: np.ndarray      # [T] its row in the sample's masks
    obj_off: np.ndarray      # [B + 1] first object of each sample
    s_idx: np.ndarray        # [B] source of each destination (itself when none)
    paste_off: np.ndarray    # [B + 1] first pasted object of each destination
    paste_src: np.ndarray    # [Tsel] sample the pasted object comes from
    paste_row: np.ndarray    # [Tsel] its row there
    paste_obj: np.ndarray    # [Tsel] its index among the input objects

    @classmethod
    def make(cls, counts, choices: Choices) -> "_Plan":
        B = len(counts)
        obj_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        s_idx = np.where(choices.src >= 0, choices.src, np.arange(B)).astype(np.int64)
        picks = [np.asarray(p, np.int64) if choices.src[b] >= 0 else np.zeros(0, np.int64)
                 for b, p in enumerate(choices.picks)]
        n_sel = np.array([len(p) for p in picks], np.int64)
        paste_src = np.repeat(s_idx, n_sel)
        paste_row = np.concatenate(picks) if B else np.zeros(0, np.int64)
        return cls(np.repeat(np.arange(B), counts).astype(np.int64), xpm.ranks_within(np, np.asarray(counts, np.int64)),
                   obj_off, s_idx, np.concatenate([[0], np.cumsum(n_sel)]).astype(np.int64), paste_src, paste_row,
                   obj_off[paste_src] + paste_row)

    def upload(self, xp) -> "_Plan":
        return _Plan(*_upload(xp, [getattr(self, k) for k in self.__dataclass_fields__]))


def _upload(xp, arrays):
    """Host int64 arrays -> device views of one uploaded array (one transfer)."""
    dev = xp.asarray(np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays] + [np.zeros(0, np.int64)]))
    out, at = [], 0
    for a in arrays:
        out.append(dev[at:at + a.size].reshape(a.shape))
        at += a.size
    return out


def copy_paste_packed_batched(images, masks, boxes, labels, choices: Choices, cfg: CopyPaste, xp=np):
    """The GPU form of ``copy_paste`` (also run on NumPy in CI): the whole batch on bit-packed masks,
    never a dense mask, the samples' masks and images read where DALI put them. Alpha is an OR of packed
    rows, occlusion an AND-NOT, areas a popcount, boxes from the set bits; 8 kernels per batch whatever
    its size, one blocking host sync (which destination objects survive, which sizes the output).

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
    plane = np.int64(H * Wb)
    host = _Plan.make(counts, choices)
    plan = host.upload(xp)
    masks, images = xpm.Samples(masks), xpm.Samples(images)
    box_in = xpm.gather_samples(xp, boxes, (4,)).astype(xp.float32, copy=False)
    lab_in = xpm.gather_samples(xp, labels, ())
    n_obj = int(host.obj_off[-1])
    alpha = xp.empty((B, H, Wb), xp.uint8)
    PASTE_ALPHA(xp, (xpm.blocks(plane // 4, 256, 1024), min(max(B, 1), 65535)), 256, masks, plan.paste_off, plan.paste_src, plan.paste_row,
                plane, np.int64(B), alpha)
    box_kept, keep = xp.empty((n_obj, 4), xp.int32), xp.empty(n_obj, xp.uint8)
    DST_STATS(xp, max(1, min(n_obj, 1 << 16)), 256, masks, alpha, plan.obj_sample, plan.obj_row, box_in,
              np.int64(n_obj), np.int32(H), np.int32(Wb), np.float32(cfg.bbox_occluded_thr),
              np.float64(cfg.mask_occluded_thr), box_kept, keep)
    keep = xpm.to_numpy(keep) > 0  # host sync: which objects stay sizes the output
    # output rows: each destination's kept objects, then the ones pasted into it
    rows = [np.concatenate([2 * np.flatnonzero(keep[host.obj_off[b]:host.obj_off[b + 1]]) + 2 * host.obj_off[b],
                            2 * host.paste_obj[host.paste_off[b]:host.paste_off[b + 1]] + 1]).astype(np.int64)
            for b in range(B)]
    n_out = [len(r) for r in rows]
    M, T = max(n_out, default=0), sum(n_out)
    padded = np.full((B, M), -1, np.int64)
    for b, r in enumerate(rows):
        padded[b, :len(r)] = r
    flat = np.concatenate(rows) if B else np.zeros(0, np.int64)
    row_code_m, row_code, row_obj = _upload(xp, [padded.ravel(), flat, flat >> 1])
    out_m = xp.empty((B, M, H, Wb), xp.uint8)
    PASTE_MASKS(xp, (xpm.blocks(plane // 16, 256, 1024), min(max(B * M, 1), 65535)), 256, masks, alpha, row_code_m, plan.obj_sample,
                plan.obj_row, plane, np.int64(B * M), out_m)
    out_b, out_p = xp.empty((T, 4), xp.float32), xp.empty(T, xp.uint8)
    PASTE_ROWS(xp, xpm.blocks(T), 256, row_code, box_kept, box_in, np.int64(T), out_b, out_p)
    out_l = lab_in[row_obj]
    if cfg.blend_sigma > 0:
        img = xpm.gather_samples(xp, list(images)).reshape(B, H, W, 3)
        a = xpm.unpackbits(xp, alpha)[..., :W] > 0
        af = xpm.gaussian_filter(xp, a.astype(xp.float32), (0, cfg.blend_sigma, cfg.blend_sigma))[..., None]
        blended = af * img[plan.s_idx].astype(xp.float32) + (1.0 - af) * img.astype(xp.float32)
        out_img = xp.clip(xp.rint(blended), 0, 255).astype(xp.uint8)
    else:
        out_img = xp.empty((B, H, W, 3), xp.uint8)
        PASTE_IMAGES(xp, (xpm.blocks(Wb, 128, 1024), min(max(B * H, 1), 65535)), 128, images, alpha, plan.s_idx, np.int64(B),
                     np.int32(H), np.int32(W), np.int32(Wb), out_img)
    o_off = np.concatenate([[0], np.cumsum(n_out)]).astype(np.int64)
    cut = lambda x: [x[o_off[b]:o_off[b + 1]] for b in range(B)]  # noqa: E731
    return [out_img[b] for b in range(B)], [out_m[b] for b in range(B)], cut(out_b), cut(out_l), cut(out_p)
