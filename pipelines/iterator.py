"""DALI -> PyTorch hand-off: ``DALIGenericIterator`` batches become ``(images, targets)`` in the format
torchvision's detection models take.

Why a thin adapter: the pipeline pads ragged outputs (DALI's PyTorch iterator wants one dense tensor per
output) and keeps dataset category ids; here the padding is cut away again (views, no copies) and ids
are mapped to contiguous labels, and the bit-packed masks are unpacked (only the real rows). Everything
stays on the pipeline's device.
"""
from __future__ import annotations

import numpy as np
import torch

from dali_scp.check import checked_annotations
from dali_scp.dataset import CocoSplit
from dali_scp.deps import require_dali
from pipelines import coco

require_dali()
from nvidia.dali.plugin.base_iterator import LastBatchPolicy  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402


class CocoLoader:
    """Iterable of ``(images uint8 [B, S, S, 3], targets)``; ``targets[i]`` holds ``boxes`` [n, 4] float32
    xyxy, ``labels`` [n] int64 (contiguous, 1..C), ``masks`` [n, S, S] uint8, ``image_id`` int and
    ``pasted`` [n] bool, ``geometry`` (scale, valid h, valid w, flipped). ``epoch_size`` images per epoch of this shard."""

    def __init__(self, pipeline: str, split: CocoSplit, batch_size: int = 8, device: str = "cpu",
                 num_threads: int = 2, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 shuffle: bool = True, out_size: int | None = None, device_id: int | None = None,
                 annotations: str | None = None, infinite: bool = False, check: bool = True,
                 checkpoint: str | None = None, start_batch: int = 0):
        self.split = split
        if annotations is None and check:
            # a broken file must not end a long run: read the checked, filtered copy (cached)
            annotations, self.check_report = checked_annotations(split.annotations, split.images_dir)
        self.pipe = coco.build(pipeline, split, batch_size, device, num_threads, shard_id, num_shards, seed,
                               shuffle, out_size, device_id, annotations=annotations, checkpoint=checkpoint,
                               start_batch=start_batch)
        self.it = DALIGenericIterator(
            [self.pipe], list(coco.OUTPUTS), reader_name=coco.blocks.READER_NAME, auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if shuffle else LastBatchPolicy.PARTIAL)
        self.infinite = infinite
        self._lut = torch.as_tensor(split.cat_to_label_table())
        self.batch_size = batch_size

    def state(self) -> str:
        """DALI's checkpoint of the data stream (readers, random operators) after the last batch taken."""
        return self.it.checkpoints()[0]

    def __len__(self):
        return len(self.it)

    def __iter__(self):
        while True:
            for data in self.it:
                yield to_targets(data[0], self._lut)
            if not self.infinite:
                return


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
            geometry=d["geometry"][i]))
    return images, targets
