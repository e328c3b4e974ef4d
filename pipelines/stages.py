"""Callables that DALI's ``fn.python_function`` runs on whole batches (NumPy on the CPU, CuPy on the
GPU). They hold the only state of the custom stages: output size, recipe parameters, the copy-paste
random generator (seeded, so the same seed gives the same batches) and each stage's own timer
(``seconds``, ``calls``: two pipelines in one process never mix their timings)."""
from __future__ import annotations

import functools
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dali_scp import xp as xpm
from dali_scp.copy_paste import copy_paste_packed, copy_paste_packed_batched, draw_choices
from dali_scp.presets import CopyPaste
from dali_scp.raster import rasterize_packed_batch
from dali_scp.resample import Resampler, Window

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A custom stage raised inside the DALI pipeline; raised again in the caller's thread by
    ``raise_if_failed`` (the PyTorch iterator and the profiler call it after every batch)."""


# Exceptions caught inside stages since the last ``raise_if_failed`` (first one wins).
_FAILURES: list = []


def raise_if_failed() -> None:
    if _FAILURES:
        name, batch, exc, tb = _FAILURES[0]
        _FAILURES.clear()
        first = (str(exc).splitlines() or [""])[0]
        err = StageFailed(f"the {name} stage failed on batch {batch}: {type(exc).__name__}: {first}")
        err.stage_traceback = tb
        raise err from exc


def guarded(empty):
    """No exception may leave a stage into DALI: raised inside a GPU ``python_function``, DALI 2.4 ended
    the whole process with a segmentation fault (seen on an H100, in ``share_outputs``), and on the CPU
    the message arrives wrapped in DALI's own text. So the stage keeps the exception, hands DALI
    well-formed empty outputs for that batch (``empty(stage, *inputs)``), and the iterator raises it,
    naming the stage (its ``name``) and the batch.
    Also times the stage: ``stage.seconds`` and ``stage.calls`` (read by pipelines.profile). On the GPU
    that is the Python + launch time; the profiler synchronises separately to get device time."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args):
            t = time.perf_counter()
            calls = self.calls
            self.calls = calls + 1
            try:
                return fn(self, *args)
            except Exception as e:  # noqa: BLE001 - handed to raise_if_failed, never swallowed
                log.debug("%s stage failed", self.name, exc_info=True)
                _FAILURES.append((self.name, calls, e, traceback.format_exc()))
                self.forget_buffers()  # a write cut short leaves the reused buffer dirty
                return empty(self, *args)
            finally:
                self.seconds += time.perf_counter() - t
        return wrapper
    return deco


def _empty_masks(self, polygons, vertices, cat_ids):
    xp = xpm.get_xp(*vertices) if len(vertices) else np
    b = len(cat_ids)
    return ([xp.zeros((0, self.height, self.width // 8), xp.uint8) for _ in range(b)],
            [xp.zeros((0, 4), xp.float32) for _ in range(b)], [xp.zeros((0,), xp.int32) for _ in range(b)])


def _empty_copy_paste(self, images, masks, boxes, cat_ids):
    xp = xpm.get_xp(*images) if len(images) else np
    return (list(images), [xp.zeros((0, *m.shape[1:]), xp.uint8) for m in masks],
            [xp.zeros((0, 4), xp.float32) for _ in images], [xp.zeros((0,), c.dtype) for c in cat_ids],
            [xp.zeros((0,), xp.uint8) for _ in images])


_POOLS: dict = {}  # threads -> ThreadPoolExecutor, one per size per process


def worker_pool(threads: int):
    """The CPU stages' helper threads (None for one thread). Shared by every stage and pipeline of the
    process: a training run opens a pipeline per window of its data stream, and threads per stage object
    would pile up; the stages of one pipeline run one after another anyway."""
    if threads <= 1:
        return None
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dali_scp_stage")
    return _POOLS[threads]


def _reused_zeros(arena, b: int, rows: int, plane: tuple, spare_rows: int):
    """``arena`` while it holds [b, >= rows, *plane], else a new all-zero uint8 array with room for at
    least ``spare_rows`` objects. Why the stages keep one: faulting in fresh pages for objects x 1024^2
    bytes costs more than the stage's own writes. The caller keeps it all-zero between batches by
    re-zeroing only the windows it wrote, which is what it alone knows."""
    if arena is None or arena.shape[0] != b or arena.shape[1] < rows or arena.shape[2:] != plane:
        return np.zeros((b, max(rows, spare_rows), *plane), np.uint8)
    return arena


def _reused_empty(arena, shape: tuple):
    """``arena`` while it has ``shape``, else a new uint8 array (contents undefined: the caller writes all of it)."""
    return arena if arena is not None and arena.shape == shape else np.empty(shape, np.uint8)


def _empty_canvases(self, images, windows):
    return [np.full((self.size, self.size, 3), self.pad_value, np.uint8) for _ in images]


class ResampleStage:
    """The CPU pipelines' resize + crop + flip + pad (``dali_scp.resample``; why not DALI's CPU resize:
    there). DALI runs a ``python_function`` after the operators before it, not beside them, so the
    samples are spread over ``threads`` threads (torch's kernel releases the GIL), as DALI spreads its
    own operators over the pipeline's threads. Writes into one reused batch array: DALI copies a stage's
    outputs on return, and a fresh array per batch would fault in its pages every time."""
    name = "resample"

    def __init__(self, size: int, pad_value: int = 0, threads: int = 1):
        self.size, self.pad_value, self.threads = size, pad_value, max(int(threads), 1)
        self._resamplers = [Resampler() for _ in range(self.threads)]  # a scratch buffer per thread
        self._arena = None
        self.seconds, self.calls = 0.0, 0

    def forget_buffers(self):
        self._arena = None

    def _share(self, k: int, images, windows):
        for i in range(k, len(images), self.threads):
            self._resamplers[k](images[i], Window.from_row(windows[i]), self._arena[i], self.pad_value)

    @guarded(_empty_canvases)
    def __call__(self, images, windows):
        b = len(images)
        self._arena = _reused_empty(self._arena, (b, self.size, self.size, 3))
        if self.threads == 1 or b == 1:
            for k in range(self.threads):
                self._share(k, images, windows)
        else:
            pool = worker_pool(self.threads)
            for f in [pool.submit(self._share, k, images, windows) for k in range(self.threads)]:
                f.result()
        return list(self._arena)


class RasterizeStage:
    """Masks leave bit-packed: 1/8 of the bytes through DALI and into PyTorch. They are rasterised
    straight into packed bits (``rasterize_packed_batch``): 20 kernels and two host syncs per batch on
    the GPU, their NumPy twins on the CPU, where writing the packed bytes of each span costs less than
    the dense writer's byte per pixel and packing (measured in the pipeline: 8-15 against 13-28 ms per
    batch of 8 at 1024^2; ``dali_scp.raster``'s tests hold both writers equal bit for bit)."""
    name = "masks"

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.seconds, self.calls = 0.0, 0

    def forget_buffers(self):
        pass

    @guarded(_empty_masks)
    def __call__(self, polygons, vertices, cat_ids):
        return rasterize_packed_batch(polygons, vertices, cat_ids, self.height, self.width, xpm.get_xp(*vertices))


class CopyPasteStage:
    """Draws the pairing and selection on the host, then runs copy-paste on bit-packed masks:
    ``copy_paste_packed`` (box windows) on the CPU, ``copy_paste_packed_batched`` (the whole batch in 8
    kernels, one host sync) on the GPU; both are tested equal to the reference bit for bit.

    The random stream of batch k is ``default_rng([seed, k])``, not one long stream: a resumed run
    (DALI restores its own readers and random operators from a checkpoint) only has to tell the stage
    which batch comes next (``start_batch``) to continue exactly where it stopped."""
    name = "copy_paste"
    _warned_single = False

    def __init__(self, cfg: CopyPaste, seed: int = 0, start_batch: int = 0, threads: int = 1):
        self.cfg = cfg
        self.seconds, self.calls = 0.0, 0
        self.threads = max(int(threads), 1)  # the CPU form composites images in ``worker_pool`` threads
        self.seed = seed
        self.batch = start_batch
        self._arena, self._written = None, []  # reused output buffers (DALI copies outputs on return)
        self._images = None

    def forget_buffers(self):
        self._arena, self._written, self._images = None, [], None

    def _buffer(self, b: int, n: int, h: int, wb: int):
        for i, j, win in self._written:  # re-zero what the last batch wrote
            self._arena[i, j][win] = 0
        self._written = []
        self._arena = _reused_zeros(self._arena, b, n, (h, wb), 64)
        return self._arena

    @guarded(_empty_copy_paste)
    def __call__(self, images, masks, boxes, cat_ids):
        if len(images) < 2 and not CopyPasteStage._warned_single:
            log.warning("copy-paste needs at least 2 samples per batch; a batch of 1 passes through unchanged")
            CopyPasteStage._warned_single = True
        rng = np.random.default_rng([self.seed, self.batch])
        self.batch += 1
        cat_ids = [c.reshape(-1) for c in cat_ids]
        choices = draw_choices(rng, [int(c.shape[0]) for c in cat_ids], self.cfg)
        xp = xpm.get_xp(*images)
        if xp is not np:
            return copy_paste_packed_batched(images, masks, boxes, cat_ids, choices, self.cfg, xp)
        cap = sum(len(c) for c in cat_ids)  # enough for any destination's kept + pasted
        out = self._buffer(len(images), cap, *masks[0].shape[1:]) if len(images) else None
        shape = (len(images), *images[0].shape) if len(images) else None
        if shape:
            self._images = _reused_empty(self._images, shape)
        return copy_paste_packed(images, masks, boxes, cat_ids, choices, self.cfg, out, self._written,
                                 worker_pool(self.threads), self._images)
