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

import logging
from dataclasses import dataclass

import numpy as np

from dali_scp import xp as xpm
from dali_scp.presets import CopyPaste

log = logging.getLogger(__name__)


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
    """Tight xyxy boxes (pixel edges) of [N, H, W] masks; all-zero box for an empty mask."""
    n, h, w = masks.shape
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    nonempty = rows.any(axis=1)
    y0 = xp.argmax(rows, axis=1)
    y1 = h - xp.argmax(rows[:, ::-1], axis=1)
    x0 = xp.argmax(cols, axis=1)
    x1 = w - xp.argmax(cols[:, ::-1], axis=1)
    boxes = xp.stack([x0, y0, x1, y1], axis=1).astype(xp.float32)
    return boxes * nonempty[:, None]


def paste_alpha(masks_src, picks, xp=np):
    """Union of the picked source masks, [H, W] uint8."""
    h, w = masks_src.shape[1:]
    if len(picks) == 0:
        return xp.zeros((h, w), dtype=xp.uint8)
    return masks_src[xp.asarray(picks)].max(axis=0)


def copy_paste(images, masks, boxes, labels, choices: Choices, cfg: CopyPaste, xp=None):
    """images: list of [H, W, 3] uint8 (one canvas size); masks/boxes/labels: per-sample lists of
    [n, H, W] uint8, [n, 4] float32 xyxy, [n] ints. Returns the same four per-sample lists and a fifth,
    ``pasted`` [n] uint8 (1 for objects that came from the source; for the visualiser)."""
    xp = xp or xpm.get_xp(*images)
    out_img, out_m, out_b, out_l, out_p = [], [], [], [], []
    for b, img in enumerate(images):
        s = int(choices.src[b])
        picks = choices.picks[b]
        if s < 0 or len(picks) == 0:
            out_img.append(img), out_m.append(masks[b]), out_b.append(boxes[b]), out_l.append(labels[b])
            out_p.append(xp.zeros(labels[b].shape[0], dtype=xp.uint8))
            continue
        alpha = paste_alpha(masks[s], picks, xp)
        if cfg.blend_sigma > 0:
            a = xpm.gaussian_filter(xp, alpha.astype(xp.float32), cfg.blend_sigma)[..., None]
            blended = a * images[s].astype(xp.float32) + (1.0 - a) * img.astype(xp.float32)
            out_img.append(xp.clip(xp.rint(blended), 0, 255).astype(xp.uint8))
        else:
            out_img.append(xp.where(alpha[..., None].astype(bool), images[s], img))
        # destination objects lose what is covered; keep by mmdetection's occlusion rule
        dst = masks[b] * (1 - alpha)[None]
        dst_boxes = mask_boxes(dst, xp)
        area = dst.sum(axis=(1, 2), dtype=xp.int64)
        moved_little = xp.all(xp.abs(dst_boxes - boxes[b]) <= cfg.bbox_occluded_thr, axis=1)
        keep = (moved_little | (area > cfg.mask_occluded_thr)) & (area > 0)
        kidx = xp.nonzero(keep)[0]
        pidx = xp.asarray(picks)
        pasted = masks[s][pidx]
        out_m.append(xp.concatenate([dst[kidx], pasted]))
        out_b.append(xp.concatenate([dst_boxes[kidx], mask_boxes(pasted, xp)]))
        out_l.append(xp.concatenate([labels[b][kidx], labels[s][pidx]]))
        out_p.append(xp.concatenate([xp.zeros(kidx.shape[0], xp.uint8), xp.ones(pidx.shape[0], xp.uint8)]))
    return out_img, out_m, out_b, out_l, out_p


POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


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


def copy_paste_packed(images, masks, boxes, labels, choices: Choices, cfg: CopyPaste):
    """The CPU fast path of ``copy_paste``, on bit-packed masks ([n, H, W/8], see ``xp.packbits``):
    identical output (tested against it), but every mask operation works on the packed bytes of the
    object's box only, so cost follows the objects' area, and masks move through DALI and into
    PyTorch at 1/8 of the bytes. On the GPU the dense, batched ``copy_paste`` is the faster form.

    Precondition (true inside the pipeline, where boxes come from the rasteriser): each box contains
    its mask. ``masks[b]`` may carry zero padding beyond ``len(labels[b])`` rows. Returns images,
    packed masks padded to [Nmax, H, W/8] per sample, boxes, labels, pasted flags.
    """
    h, w = images[0].shape[:2]
    out_img, plans = [], []
    for b, img in enumerate(images):
        n = len(labels[b])
        s = int(choices.src[b])
        picks = choices.picks[b]
        if s < 0 or len(picks) == 0:
            out_img.append(img)
            plans.append([(masks[b][j], _window8(boxes[b][j], h, w), None, boxes[b][j], labels[b][j], 0)
                          for j in range(n)])
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
            sel = np.unpackbits(alpha[ys0:ys1, bs0:bs1], axis=-1).astype(bool)
            new[pix][sel] = images[s][pix][sel]
            out_img.append(new)
        plan = []
        for j in range(n):
            win = _window8(boxes[b][j], h, w)
            sub = masks[b][j][win] & ~alpha[win]
            box = _tight_packed(sub, win)
            if box is None:
                continue
            moved_little = bool(np.all(np.abs(box - boxes[b][j]) <= cfg.bbox_occluded_thr))
            if moved_little or int(POPCOUNT[sub].sum()) > cfg.mask_occluded_thr:
                plan.append((None, win, sub, box, labels[b][j], 0))
        for j in picks:
            win = _window8(boxes[s][j], h, w)
            plan.append((masks[s][j], win, None, _tight_packed(masks[s][j][win], win), labels[s][j], 1))
        plans.append(plan)
    nmax = max((len(p) for p in plans), default=0)
    packed = np.zeros((len(plans), nmax, h, w // 8), np.uint8)
    out_b, out_l, out_p = [], [], []
    for b, plan in enumerate(plans):
        for i, (full, win, sub, _, _, _) in enumerate(plan):
            packed[b, i][win] = sub if sub is not None else full[win]
        out_b.append(np.array([p[3] for p in plan], np.float32).reshape(-1, 4))
        out_l.append(np.array([p[4] for p in plan], dtype=labels[0].dtype if len(labels) else np.int32))
        out_p.append(np.array([p[5] for p in plan], np.uint8))
    return out_img, list(packed), out_b, out_l, out_p


def pad_masks(masks, xp=np):
    """Per-sample [n_i, H, W] -> per-sample [max n, H, W] views of one zero-padded batch array."""
    nmax = max((m.shape[0] for m in masks), default=0)
    h, w = masks[0].shape[1:] if masks else (0, 0)
    out = xp.zeros((len(masks), nmax, h, w), dtype=xp.uint8)
    for i, m in enumerate(masks):
        out[i, : m.shape[0]] = m
    return list(out)
