"""DALI -> PyTorch hand-off: ``DALIGenericIterator`` batches become ``(images, targets)`` in the format
torchvision's detection models take (``CocoLoader``, training), or named evaluation batches
(``EvalLoader``).

Why a thin adapter: the pipeline pads ragged outputs (DALI's PyTorch iterator wants one dense tensor per
output) and keeps dataset category ids; here the padding is cut away again (views, no copies) and ids
are mapped to contiguous labels, and the bit-packed masks are unpacked (only the real rows). Everything
stays on the pipeline's device.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

from dali_scp.check import checked_annotations
from dali_scp.dataset import CocoSplit
from dali_scp.image_index import image_index
from dali_scp.order import TrainingOrder, repeat_factors
from dali_scp.deps import require_dali
from dali_scp.presets import EvalResize
from pipelines import coco, stages
from pipelines.opencv_resize import resize_linear
from pipelines.outputs import EVAL_OUTPUTS, OUTPUTS, Geometry

require_dali()
from nvidia.dali.plugin.base_iterator import LastBatchPolicy  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

log = logging.getLogger(__name__)


class CocoLoader:
    """Iterable of ``(images uint8 [B, S, S, 3], targets)``; ``targets[i]`` holds ``boxes`` [n, 4] float32
    xyxy, ``labels`` [n] int64 (contiguous, 1..C), ``masks`` [n, S, S] uint8, ``image_id`` int and
    ``pasted`` [n] bool, ``geometry`` (a ``pipelines.outputs.Geometry``).

    ``shuffle=True`` (training) reads in ``dali_scp.order``'s order: a fresh permutation every epoch of the
    images that have annotations (crowd regions count; images without any are skipped, as mmdetection's
    ``filter_empty_gt`` does), drawn from ``seed`` and the epoch, this process's share of it (``shard_id``
    of ``num_shards``), repeat factors when ``repeat_threshold`` > 0. ``infinite=True`` (the trainer, the
    profiler) is one endless stream, as mmdetection's infinite sampler: epochs follow each other inside a batch, so a
    dataset smaller than a batch still fills batches and no batch is ever run and then dropped. The
    stream is read in windows of ``window_batches`` batches, one reader pipeline each (its ``images``
    list); ``state()`` is the window, the batches taken from it and DALI's checkpoint of its pipeline,
    which is all a resume (``checkpoint=``) needs to continue bit for bit. Otherwise one epoch: shuffled
    with the partial last batch dropped, or in file order with it kept (``shuffle=False``, every image of
    the shard exactly once). ``resampler``: who resamples the jittered images (``pipelines.coco.build``)."""

    def __init__(self, pipeline: str, split: CocoSplit, batch_size: int = 8, device: str = "cpu",
                 num_threads: int = 2, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 shuffle: bool = True, out_size: int | None = None, device_id: int | None = None,
                 annotations: str | None = None, infinite: bool = False, check: bool = True,
                 checkpoint: dict | None = None, repeat_threshold: float = 0.0, window_batches: int | None = None,
                 resampler: str | None = None):
        self.split = split
        self.check_report = None
        if annotations is None and check:
            # a broken file must not end a long run: read the checked, filtered copy (cached)
            annotations, self.check_report = checked_annotations(split.annotations, split.images_dir)
        annotations = str(annotations or split.annotations)
        index = image_index(annotations)
        n_images = len(index)
        if n_images == 0:
            raise ValueError(f"{split.annotations}: no image left to read (see `python -m dali_scp.check`)")
        if shuffle:  # training reads only images with annotations, as mmdetection's filter_empty_gt
            trained = np.flatnonzero(index.image_anns > 0)
            if len(trained) == 0:
                raise ValueError(f"{split.annotations}: no image has an annotation; nothing to train on")
            if len(trained) < n_images:
                log.info("training on the %d of %d images that have annotations (mmdetection's filter_empty_gt)",
                         len(trained), n_images)
            n_images = len(trained)
        stream = shard_id
        if num_shards > n_images:
            # every process needs an image: processes share them, each with its own random stream
            log.warning("%d processes share %d images: process %d of %d reads the same images as another "
                        "process (its own augmentation)", num_shards, n_images, shard_id, num_shards)
            shard_id, num_shards = shard_id % n_images, n_images
        self.stages: list = []  # the custom stages of this loader's pipelines (their timers)
        self._build = dict(pipeline=pipeline, split=split, batch_size=batch_size, device=device,
                           num_threads=num_threads, seed=seed, out_size=out_size, device_id=device_id,
                           annotations=annotations, stream_id=stream, stages=self.stages, resampler=resampler)
        self.order = None
        if shuffle:
            rf = repeat_factors(index.image_cat_ptr, index.image_cats, repeat_threshold)[trained] \
                if repeat_threshold > 0 else None
            self.order = TrainingOrder(n_images, seed, shard_id, num_shards, rf)
            self._names = index.file_names[trained]
        else:
            self._build.update(shard_id=shard_id, num_shards=num_shards, shuffle=False)
        self.infinite = infinite
        self._lut = torch.as_tensor(split.cat_to_label_table())
        self.batch_size = batch_size
        self.window = self.taken = 0
        if not infinite:
            self.window_batches = None
            self.pipe = self._pipeline(0)
            try:
                self.it = DALIGenericIterator(
                    [self.pipe], list(OUTPUTS), reader_name=coco.blocks.READER_NAME, auto_reset=True,
                    last_batch_policy=LastBatchPolicy.DROP if shuffle else LastBatchPolicy.PARTIAL)
            except RuntimeError as e:
                if "no data in the pipeline" not in str(e):
                    raise
                raise ValueError(f"{split.annotations}: the shard has fewer images than one batch of {batch_size}; "
                                 "iterate with infinite=True (images repeat) or a smaller batch") from None
            return
        self.window_batches = (window_batches or self.order.window_batches(batch_size)) if self.order else None
        dali_state = None
        if checkpoint is not None:
            self.window, self.taken, dali_state = _parse_state(checkpoint)
            if self.window_batches is not None and self.taken >= self.window_batches:
                self.window, self.taken, dali_state = self.window + 1, 0, None
        self._open(dali_state)

    def _pipeline(self, window: int, dali_state=None, start_batch: int = 0):
        kw = dict(self._build)
        if self.order is not None:
            b = self.batch_size
            if self.infinite:
                idx = self.order.stream(window * self.window_batches * b, self.window_batches * b)
            else:
                idx = self.order.epoch(0)
            kw["images"] = self._names[idx].tolist()
        return coco.build(**kw, window=window, checkpoint=dali_state, start_batch=start_batch)

    def _open(self, dali_state=None) -> None:
        self.pipe = self._pipeline(self.window, dali_state, self.taken)
        self.it = DALIGenericIterator([self.pipe], list(OUTPUTS), size=-1, auto_reset=False)

    def state(self) -> dict:
        """Where the data stream stands after the last batch taken: the window, the batches taken from it
        and DALI's checkpoint of its pipeline (readers, random operators); plain data, as a checkpoint
        loaded with ``weights_only=True`` accepts it."""
        return dict(window=self.window, taken=self.taken, dali=self.it.checkpoints()[0])

    def __len__(self):
        if self.infinite:
            raise TypeError("an infinite CocoLoader has no length")
        return len(self.it)

    def __iter__(self):
        if not self.infinite:
            for data in self.it:
                stages.raise_if_failed()
                yield to_targets(data[0], self._lut)
            return
        while True:
            data = next(self.it)
            stages.raise_if_failed()
            self.taken += 1
            yield to_targets(data[0], self._lut)
            if self.window_batches is not None and self.taken == self.window_batches:
                self.window, self.taken = self.window + 1, 0
                del self.it, self.pipe
                self._open()


def _parse_state(state: dict) -> tuple[int, int, str | bytes]:
    try:
        return int(state["window"]), int(state["taken"]), state["dali"]
    except (ValueError, TypeError, KeyError, IndexError):
        raise ValueError("the data-stream state in this checkpoint was written by an older dali-scp (before "
                         "per-epoch shuffling) and cannot be resumed exactly; start a new run, or use "
                         "--init-from to keep its weights") from None


class EvalBatch(NamedTuple):
    """One evaluation batch. ``images`` [n, H, W, 3] uint8 on the pipeline's device, padded to the
    batch's largest image: ``geometry[i]`` says which top-left part is image ``i``; ``orig_sizes[i]`` is
    its stored (h, w), the size predictions are pasted back at."""
    images: torch.Tensor
    image_ids: list[int]
    geometry: list[Geometry]
    orig_sizes: list[tuple[int, int]]


class EvalLoader:
    """Iterable of ``EvalBatch``: every image of the shard exactly once, in order, the last batch
    partial, no augmentation (``pipelines.coco.evaluation_pipeline``). The training loader's epochs,
    shuffling and resume state have no place here, so it is a class of its own."""

    def __init__(self, split: CocoSplit, resize: EvalResize, batch_size: int = 4, device: str = "cpu",
                 shard_id: int = 0, num_shards: int = 1, device_id: int | None = None,
                 annotations: str | None = None):
        self.resize = resize
        self.pipe = coco.build_eval(split, resize, batch_size, device, shard_id=shard_id, num_shards=num_shards,
                                    device_id=device_id, annotations=annotations)
        self.it = DALIGenericIterator([self.pipe], list(EVAL_OUTPUTS), reader_name=coco.blocks.READER_NAME,
                                      last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def __len__(self):
        return len(self.it)

    def __iter__(self):
        for data in self.it:
            d = data[0]
            geometry = [Geometry.from_row(g) for g in d["geometry"].cpu()]
            orig_sizes = [(int(h), int(w)) for h, w in d["orig_size"].cpu().tolist()]
            images = d["images"]
            if self.resize.method == "opencv":  # the pipeline decoded; resize as OpenCV does, on its device
                images = opencv_resized(images, orig_sizes, geometry, self.resize.pad_divisor)
            yield EvalBatch(images=images, image_ids=[int(i.reshape(-1)[0]) for i in d["image_ids"]],
                            geometry=geometry, orig_sizes=orig_sizes)


def opencv_resized(decoded: torch.Tensor, orig_sizes: list, geometry: list, pad_divisor: int) -> torch.Tensor:
    """The batch of decoded images (each padded to the batch's largest) resized to their ``geometry``'s
    valid size as OpenCV resizes (``pipelines.opencv_resize``), padded as the pipeline pads (batch
    maximum rounded up to ``pad_divisor``, zeros)."""
    h, w = (-(-max(getattr(g, k) for g in geometry) // pad_divisor) * pad_divisor for k in ("valid_h", "valid_w"))
    out = decoded.new_zeros((len(geometry), h, w, decoded.shape[-1]))
    for i, ((oh, ow), g) in enumerate(zip(orig_sizes, geometry)):
        out[i, : g.valid_h, : g.valid_w] = resize_linear(decoded[i, :oh, :ow], g.valid_h, g.valid_w)
    return out


_SHIFTS: dict = {}     # device -> [7..0] uint8, made once per device (not an operation per batch)
_LUTS: dict = {}       # (id(lut), device) -> (lut, the same table on that device)


def _on_device(lut: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The label table on the batch's device, copied there once: a blocking copy per batch would wait
    for the whole stream (the training step's work included)."""
    if lut.device == device:
        return lut
    key = (id(lut), str(device))
    if key not in _LUTS or _LUTS[key][0] is not lut:
        _LUTS[key] = (lut, lut.to(device))
    return _LUTS[key][1]


def unpack_masks(packed: torch.Tensor, counts: list[int], batched: bool | None = None) -> list[torch.Tensor]:
    """The pipeline's padded [B, M, H, W/8] bit-packed masks (first pixel in the high bit), ``counts[i]``
    real rows for image i -> per-image [n_i, H, W] uint8 0/1. Batched (the default on the GPU): the real
    rows are gathered by one ``cat`` of views and unpacked in one go, three device operations per batch,
    none per image, no host sync; each image's masks are a view of the one result. Otherwise image by
    image with NumPy's unpackbits (the CPU: no gathered copy)."""
    if not (packed.is_cuda if batched is None else batched):
        return [torch.from_numpy(np.unpackbits(packed[i, :n].numpy(), axis=-1)) for i, n in enumerate(counts)]
    real = torch.cat([packed[i, :n] for i, n in enumerate(counts)])
    if packed.device not in _SHIFTS:
        _SHIFTS[packed.device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (real.unsqueeze(-1) >> _SHIFTS[packed.device]).bitwise_and_(1).flatten(-2)
    return list(torch.split(bits, counts))


def to_targets(d: dict, lut: torch.Tensor):
    """One iterator batch -> ``(images, targets)``: a fixed number of device operations for the whole
    batch (category ids to labels, pasted flags to bool, the masks unpacked), per-image views of them, and
    no device->host sync (counts, image ids and geometry are CPU outputs of the pipeline)."""
    images = d["images"]
    counts = d["counts"].reshape(-1).tolist()
    b = len(counts)
    cat_ids = d["cat_ids"].long()
    labels = _on_device(lut, cat_ids.device)[cat_ids]  # padding (-1) maps somewhere; it is cut off below
    pasted = d["pasted"].bool()
    masks = unpack_masks(d["masks"], counts)
    image_ids = d["image_ids"].reshape(b, -1)[:, 0].tolist()
    geometry = d["geometry"].reshape(b, -1).tolist()
    targets = [dict(boxes=d["boxes"][i, :n], labels=labels[i, :n], masks=masks[i], cat_ids=cat_ids[i, :n],
                    pasted=pasted[i, :n], image_id=int(image_ids[i]), geometry=Geometry.from_row(geometry[i]))
               for i, n in enumerate(counts)]
    return images, targets
