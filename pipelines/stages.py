"""Callables that DALI's ``fn.python_function`` runs on whole batches (NumPy on the CPU, CuPy on the
GPU). They hold the only state of the custom stages: output size, recipe parameters and the
copy-paste random generator (seeded, so the same seed gives the same batches)."""
from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict

import numpy as np

from dali_scp import xp as xpm
from dali_scp.copy_paste import (choices_to_selection, copy_paste_batched, copy_paste_packed, draw_choices,
                                 stack_padded)
from dali_scp.presets import CopyPaste
from dali_scp.raster import rasterize_batch

log = logging.getLogger(__name__)

# Seconds spent inside each stage since the last reset (read by pipelines.profile). On the GPU this is
# the Python + launch time; the profiler synchronises separately to get device time.
STAGE_SECONDS: dict = defaultdict(float)


def timed(name):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                STAGE_SECONDS[name] += time.perf_counter() - t
        return wrapper
    return deco


class RasterizeStage:
    """Masks leave bit-packed: 1/8 of the bytes through DALI and into PyTorch. On the CPU the dense
    masks are written into a reused zero buffer (re-zeroed box by box), because faulting in fresh
    pages for objects x 1024^2 bytes costs more than rasterising."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self._arena = None

    def _buffer(self, b: int, kmax: int):
        a = self._arena
        if a is None or a.shape[0] != b or a.shape[1] < kmax:
            self._arena = np.zeros((b, max(kmax, 32), self.height, self.width), np.uint8)
        return self._arena

    @staticmethod
    def _pack_windows(masks, boxes):
        """Pack each object's box (byte-aligned) into a zero packed batch and re-zero the box in the
        dense buffer: cost follows the objects' area, not objects x H x W."""
        b, kmax, h, w = len(masks), masks[0].shape[0] if masks else 0, *masks[0].shape[1:]
        packed = np.zeros((b, kmax, h, w // 8), np.uint8)
        for i, (m, bx) in enumerate(zip(masks, boxes)):
            for j, (x0, y0, x1, y1) in enumerate(bx.astype(np.int64)):
                c0, c1 = x0 // 8, (x1 + 7) // 8
                win = m[j, y0:y1, c0 * 8:c1 * 8]
                packed[i, j, y0:y1, c0:c1] = np.packbits(win, axis=-1)
                win[...] = 0
        return list(packed)

    @timed("masks")
    def __call__(self, polygons, vertices, labels):
        xp = xpm.get_xp(*vertices)
        counts = [int(l.shape[0]) for l in labels]
        out = self._buffer(len(counts), max(counts, default=0)) if xp is np else None
        masks, boxes, kept = rasterize_batch(polygons, vertices, counts, self.height, self.width, xp, out=out)
        if out is None:
            masks = [xpm.packbits(xp, m) for m in masks]
        else:
            masks = self._pack_windows(masks, boxes)
        labels = [xp.ascontiguousarray(l.reshape(-1)[k]).astype(xp.int32) for l, k in zip(labels, kept)]
        pasted = [xp.zeros(k.shape[0], dtype=xp.uint8) for k in kept]
        return masks, boxes, labels, pasted


class CopyPasteStage:
    """Draws the pairing and selection, then runs copy-paste: ``copy_paste_packed`` on the CPU, the
    dense batched form (``dense``) on the GPU; both are tested to give the same result.

    The random stream of batch k is ``default_rng([seed, k])``, not one long stream: a resumed run
    (DALI restores its own readers and random operators from a checkpoint) only has to tell the stage
    which batch comes next (``start_batch``) to continue exactly where it stopped."""
    _warned_single = False

    def __init__(self, cfg: CopyPaste, seed: int = 0, start_batch: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.batch = start_batch
        self._arena, self._written = None, []  # reused output buffer (DALI copies outputs on return)

    def _buffer(self, b: int, n: int, h: int, wb: int):
        a = self._arena
        for i, j, win in self._written:  # re-zero what the last batch wrote
            a[i, j][win] = 0
        self._written = []
        if a is None or a.shape[0] != b or a.shape[1] < n or a.shape[2:] != (h, wb):
            self._arena = np.zeros((b, max(n, 64), h, wb), np.uint8)
        return self._arena

    @timed("copy_paste")
    def __call__(self, images, masks, boxes, labels, pasted):
        if len(images) < 2 and not CopyPasteStage._warned_single:
            log.warning("copy-paste needs at least 2 samples per batch; a batch of 1 passes through unchanged")
            CopyPasteStage._warned_single = True
        rng = np.random.default_rng([self.seed, self.batch])
        self.batch += 1
        labels = [l.reshape(-1) for l in labels]
        choices = draw_choices(rng, [len(l) for l in labels], self.cfg)
        xp = xpm.get_xp(*images)
        del pasted  # objects are pasted once per batch; nothing upstream has pasted anything
        if xp is np:
            cap = sum(len(lab) for lab in labels)  # enough for any destination's kept + pasted
            out = self._buffer(len(images), cap, *masks[0].shape[1:]) if len(images) else None
            return copy_paste_packed(images, masks, boxes, labels, choices, self.cfg, out, self._written)
        return self.dense(images, masks, boxes, labels, choices, self.cfg, xp)

    @staticmethod
    def dense(images, masks, boxes, labels, choices, cfg, xp):
        """The GPU form: dense and batched, a fixed handful of kernels per batch whatever its size
        (bandwidth is plentiful there). Packed masks in and out, like the CPU path."""
        dense = xpm.unpackbits(xp, xp.stack(masks))
        sel = xp.asarray(choices_to_selection(choices, dense.shape[1]))
        img, m, b, lab, p, n = copy_paste_batched(
            xp.stack(images), dense, xp.asarray([len(l) for l in labels]), stack_padded(boxes, xp),
            stack_padded(labels, xp), xp.asarray(choices.src), sel, cfg, xp)
        n = xpm.to_numpy(n)
        return (list(img), list(xpm.packbits(xp, m)), [b[i, : n[i]] for i in range(len(n))],
                [lab[i, : n[i]] for i in range(len(n))], [p[i, : n[i]] for i in range(len(n))])
