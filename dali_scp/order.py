"""The order training reads images in: a fresh seeded permutation of the whole dataset every epoch, split
across processes (each image read once per epoch by exactly one process), optionally with repeat-factor
sampling for long-tailed datasets (LVIS).

Why our own order rather than DALI's shuffling: measured at COCO size, the reader's ``random_shuffle`` is
one start-up permutation that ignores the seed plus a 1,024-sample shuffle buffer, so runs with
different ``--seed`` read the same order and consecutive epochs are nearly the same sequence (Spearman
rho 0.59), pairing the same neighbours for copy-paste again. DALI's ``shuffle_after_epoch`` would give a
seeded global permutation per epoch, but it cannot express repeat factors, and what we resume from would
be DALI's internal epoch state. Here the order is a pure function of ``(seed, epoch)``, as in
torch's ``DistributedSampler`` (the permutation is the same on every process; process ``rank`` reads
entries ``rank, rank + world, ...``) and detectron2's ``RepeatFactorTrainingSampler``. The reader is
given the file names of one window of this stream at a time (its ``images`` argument keeps order and
repeats; ``pipelines.iterator.CocoLoader``), so a resume is the window index plus DALI's checkpoint
inside it, exact at any batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A window (one reader pipeline) holds at least this many images: rebuilding the pipeline at a window's
# end costs a fraction of a second, and a window of one epoch of COCO is 118k names (a list for a whole
# 270k-iteration run would be 2.2M names per process: 7.5 s and 1.1 GB to hand to DALI, measured).
MIN_WINDOW_IMAGES = 4096


@dataclass(frozen=True, eq=False)
class TrainingOrder:
    num_images: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    repeat_factors: np.ndarray | None = None  # r(I) >= 1 per image (``repeat_factors``), None: each once

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError("the training order needs at least one image")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")
        if self.world > self.num_images:
            raise ValueError(f"{self.world} processes cannot split {self.num_images} images "
                             "(pipelines.iterator.CocoLoader lets processes share images instead)")

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([int(self.seed) & 0xFFFFFFFF, int(epoch)]))

    def global_epoch(self, epoch: int) -> np.ndarray:
        """Every process's images of ``epoch`` (indices into the index's images), before the split."""
        rng, n = self._rng(epoch), self.num_images
        if self.repeat_factors is None:
            return rng.permutation(n)
        r = self.repeat_factors
        whole = np.floor(r)
        reps = whole.astype(np.int64) + (rng.random(n) < (r - whole))
        idx = np.repeat(np.arange(n), reps)
        return idx[rng.permutation(len(idx))]

    def epoch(self, epoch: int) -> np.ndarray:
        """This process's images of ``epoch``, in reading order."""
        return self.global_epoch(epoch)[self.rank::self.world]

    def _epoch_len(self, epoch: int) -> int:
        if self.repeat_factors is None:
            return len(range(self.rank, self.num_images, self.world))
        return len(self.epoch(epoch))

    def stream(self, start: int, count: int) -> np.ndarray:
        """Entries ``[start, start + count)`` of this process's endless stream: its epochs one after the
        other, so a batch can hold the end of one epoch and the start of the next."""
        out, pos, e = [], 0, 0
        while count > 0:
            n = self._epoch_len(e)
            if pos + n > start:
                ep = self.epoch(e)
                lo = max(start - pos, 0)
                take = ep[lo:lo + count]
                out.append(take)
                count -= len(take)
                start += len(take)
            pos += n
            e += 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def window_batches(self, batch_size: int) -> int:
        """Batches per window: at least one epoch of this process and ``MIN_WINDOW_IMAGES`` images."""
        return max(1, math.ceil(max(self._epoch_len(0), MIN_WINDOW_IMAGES) / batch_size))


def repeat_factors(image_cat_ptr: np.ndarray, image_cats: np.ndarray, threshold: float) -> np.ndarray:
    """LVIS's repeat-factor sampling (Gupta et al. 2019; detectron2's ``RepeatFactorTrainingSampler``):
    f(c) = fraction of the images that contain category c, r(c) = max(1, sqrt(t / f(c))), and an image
    repeats r(I) = max over its categories (1 for an image without objects). Per epoch, image I appears
    floor(r(I)) times plus once more with probability frac(r(I)), drawn anew each epoch
    (``TrainingOrder.global_epoch``), as detectron2 does; mmdetection's ``ClassBalancedDataset`` instead
    rounds r(I) up once for the whole run, which over-samples and cannot vary between epochs."""
    n = len(image_cat_ptr) - 1
    if threshold <= 0 or n == 0:
        return np.ones(n)
    counts = np.diff(image_cat_ptr)
    img_of = np.repeat(np.arange(n), counts)
    cats, inverse = np.unique(image_cats, return_inverse=True)
    freq = np.bincount(inverse, minlength=len(cats)) / n  # image_cats are distinct per image
    r_cat = np.maximum(1.0, np.sqrt(threshold / freq))
    r = np.ones(n)
    np.maximum.at(r, img_of, r_cat[inverse])
    return r
