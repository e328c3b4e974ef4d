"""DALI -> PyTorch hand-off: ``DALIGenericIterator`` batches become ``(images, targets)`` in the format
torchvision's detection models take (``CocoLoader``, training), or named evaluation batches
(``EvalLoader``).

Why a thin adapter: the pipeline pads ragged outputs (DALI's PyTorch iterator wants one dense tensor per
output) and keeps dataset category ids; here the padding is cut away again (views, no copies) and ids
are mapped to contiguous labels, and the bit-packed masks are unpacked (only the real rows). Everything
stays on the pipeline's device.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dali_scp.check import checked_annotations
from dali_scp.dataset import CocoSplit
from dali_scp.deps import require_dali
from dali_scp.presets import EvalResize
from pipelines import coco, stages
from pipelines.outputs import EVAL_OUTPUTS, OUTPUTS, Geometry

require_dali()
from nvidia.dali.plugin.base_iterator import LastBatchPolicy  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

log = logging.getLogger(__name__)


class CocoLoader:
    """Iterable of ``(images uint8 [B, S, S, 3], targets)``; ``targets[i]`` holds ``boxes`` [n, 4] float32
    xyxy, ``labels`` [n] int64 (contiguous, 1..C), ``masks`` [n, S, S] uint8, ``image_id`` int and
    ``pasted`` [n] bool, ``geometry`` (a ``pipelines.outputs.Geometry``).

    ``infinite=True`` (the trainer, the profiler) is one endless stream, as mmdetection's infinite
    sampler: the reader wraps into the next epoch inside a batch, so a dataset smaller than a batch
    still fills batches and no batch is ever run and then dropped. That makes the number of batches
    the pipeline has run equal to the number the caller took, which is what ``start_batch`` must be
    for a resume from ``state()`` to be exact. Otherwise one epoch: shuffled with the partial last
    batch dropped, or in order with it kept (``shuffle=False``, every image exactly once)."""

    def __init__(self, pipeline: str, split: CocoSplit, batch_size: int = 8, device: str = "cpu",
                 num_threads: int = 2, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 shuffle: bool = True, out_size: int | None = None, device_id: int | None = None,
                 annotations: str | None = None, infinite: bool = False, check: bool = True,
                 checkpoint: str | None = None, start_batch: int = 0):
        self.split = split
        self.check_report = None
        if annotations is None and check:
            # a broken file must not end a long run: read the checked, filtered copy (cached)
            annotations, self.check_report = checked_annotations(split.annotations, split.images_dir)
        n_images = self.check_report.kept_images if self.check_report else None
        if n_images is None and num_shards > 1:
            n_images = count_images(annotations or split.annotations)
        if n_images == 0:
            raise ValueError(f"{split.annotations}: no image left to read (see `python -m dali_scp.check`)")
        stream = shard_id
        if n_images is not None and num_shards > n_images:
            # DALI needs an image per shard: processes share shards, each with its own random stream
            log.warning("%d processes share %d images: shard %d of %d reads the same images as another "
                        "process (its own augmentation)", num_shards, n_images, shard_id, num_shards)
            shard_id, num_shards = shard_id % n_images, n_images
        self.stages: list = []  # the custom stages of this loader's pipeline (their timers)
        self.pipe = coco.build(pipeline, split, batch_size=batch_size, device=device, num_threads=num_threads,
                               shard_id=shard_id, num_shards=num_shards, seed=seed, shuffle=shuffle,
                               out_size=out_size, device_id=device_id, annotations=annotations,
                               checkpoint=checkpoint, start_batch=start_batch, stream_id=stream,
                               stages=self.stages)
        if infinite:
            self.it = DALIGenericIterator([self.pipe], list(OUTPUTS), size=-1, auto_reset=False)
        else:
            try:
                self.it = DALIGenericIterator(
                    [self.pipe], list(OUTPUTS), reader_name=coco.blocks.READER_NAME, auto_reset=True,
                    last_batch_policy=LastBatchPolicy.DROP if shuffle else LastBatchPolicy.PARTIAL)
            except RuntimeError as e:
                if "no data in the pipeline" not in str(e):
                    raise
                raise ValueError(f"{split.annotations}: the shard has fewer images than one batch of {batch_size}; "
                                 "iterate with infinite=True (images repeat) or a smaller batch") from None
        self.infinite = infinite
        self._lut = torch.as_tensor(split.cat_to_label_table())
        self.batch_size = batch_size

    def state(self) -> str:
        """DALI's checkpoint of the data stream (readers, random operators) after the last batch taken."""
        return self.it.checkpoints()[0]

    def __len__(self):
        if self.infinite:
            raise TypeError("an infinite CocoLoader has no length")
        return len(self.it)

    def __iter__(self):
        if self.infinite:
            while True:
                data = next(self.it)
                stages.raise_if_failed()
                yield to_targets(data[0], self._lut)
        for data in self.it:
            stages.raise_if_failed()
            yield to_targets(data[0], self._lut)


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
        self.pipe = coco.build_eval(split, resize, batch_size, device, shard_id=shard_id, num_shards=num_shards,
                                    device_id=device_id, annotations=annotations)
        self.it = DALIGenericIterator([self.pipe], list(EVAL_OUTPUTS), reader_name=coco.blocks.READER_NAME,
                                      last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def __len__(self):
        return len(self.it)

    def __iter__(self):
        for data in self.it:
            d = data[0]
            yield EvalBatch(images=d["images"],
                            image_ids=[int(i.reshape(-1)[0]) for i in d["image_ids"]],
                            geometry=[Geometry.from_row(g) for g in d["geometry"].cpu()],
                            orig_sizes=[(int(h), int(w)) for h, w in d["orig_size"].cpu().tolist()])


def count_images(annotations) -> int:
    return len(json.loads(Path(annotations).read_text())["images"])


def unpack_masks(packed: torch.Tensor) -> torch.Tensor:
    """[n, H, W/8] bit-packed (first pixel in the high bit) -> [n, H, W] uint8 of 0/1."""
    if packed.is_cuda:
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1))


def to_targets(d: dict, lut: torch.Tensor):
    images = d["images"]
    counts = d["counts"].reshape(-1).tolist()
    lut = lut.to(d["cat_ids"].device)
    cat_ids = d["cat_ids"].long()
    targets = []
    for i, n in enumerate(counts):
        ids = cat_ids[i, :n]
        targets.append(dict(
            boxes=d["boxes"][i, :n], labels=lut[ids], masks=unpack_masks(d["masks"][i, :n]), cat_ids=ids,
            pasted=d["pasted"][i, :n].bool(), image_id=int(d["image_ids"][i].reshape(-1)[0]),
            geometry=Geometry.from_row(d["geometry"][i])))
    return images, targets
