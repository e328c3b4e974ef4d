"""Callables that DALI's ``fn.python_function`` runs on whole batches (NumPy on the CPU, CuPy on the
GPU). They hold the only state of the custom stages: output size, recipe parameters and the
copy-paste random generator (seeded, so the same seed gives the same batches)."""
from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np

from dali_scp import xp as xpm
from dali_scp.copy_paste import copy_paste, copy_paste_windowed, draw_choices, pad_masks
from dali_scp.presets import CopyPaste
from dali_scp.raster import rasterize_batch

log = logging.getLogger(__name__)

# Seconds spent inside each stage since the last reset (read by pipelines.profile). On the GPU this is
# the Python + launch time; the profiler synchronises separately to get device time.
STAGE_SECONDS: dict = defaultdict(float)


def timed(name):
    def deco(fn):
        def wrapper(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                STAGE_SECONDS[name] += time.perf_counter() - t
        return wrapper
    return deco


class RasterizeStage:
    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    @timed("masks")
    def __call__(self, polygons, vertices, labels):
        xp = xpm.get_xp(*vertices)
        counts = [int(l.shape[0]) for l in labels]
        masks, boxes, kept = rasterize_batch(polygons, vertices, counts, self.height, self.width, xp)
        labels = [xp.ascontiguousarray(l.reshape(-1)[k]).astype(xp.int32) for l, k in zip(labels, kept)]
        pasted = [xp.zeros(k.shape[0], dtype=xp.uint8) for k in kept]
        return masks, boxes, labels, pasted


class CopyPasteStage:
    """Draws the pairing and selection, then calls the pure ``copy_paste``.

    The random stream of batch k is ``default_rng([seed, k])``, not one long stream: a resumed run
    (DALI restores its own readers and random operators from a checkpoint) only has to tell the stage
    which batch comes next (``start_batch``) to continue exactly where it stopped."""
    _warned_single = False

    def __init__(self, cfg: CopyPaste, seed: int = 0, start_batch: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.batch = start_batch

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
            return copy_paste_windowed(images, masks, boxes, labels, choices, self.cfg)
        masks = [m[: len(l)] for m, l in zip(masks, labels)]  # drop the rasteriser's padding rows
        out = list(copy_paste(images, masks, boxes, labels, choices, self.cfg, xp))
        out[1] = pad_masks(out[1], xp)
        return tuple(out)
