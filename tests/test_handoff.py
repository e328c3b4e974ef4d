"""The DALI -> PyTorch hand-off (``pipelines.iterator.to_targets``) on batches shaped as the pipeline's
outputs: per-image targets equal to the plain per-image reading, and a fixed number of tensor
operations per batch whatever its size (on the GPU each is a device call in the training process)."""
import functools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines import iterator
from pipelines.outputs import Geometry


def batch(b: int, seed: int = 0, m: int = 5, s: int = 24):
    """One iterator batch as DALIGenericIterator hands it over: padded outputs, CPU counts/ids/geometry."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, m + 1, b)
    counts[0] = m
    packed = rng.integers(0, 256, (b, m, s, s // 8), dtype=np.uint8)
    cat_ids = rng.integers(1, 6, (b, m)).astype(np.int32)
    pasted = rng.integers(0, 2, (b, m)).astype(np.uint8)
    for i, n in enumerate(counts):  # padding as the pipeline writes it
        packed[i, n:] = 0
        cat_ids[i, n:] = -1
        pasted[i, n:] = 0
    return dict(images=torch.from_numpy(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)),
                masks=torch.from_numpy(packed), boxes=torch.from_numpy(rng.random((b, m, 4), np.float32)),
                cat_ids=torch.from_numpy(cat_ids), pasted=torch.from_numpy(pasted),
                counts=torch.from_numpy(counts.astype(np.int32).reshape(b, 1)),
                image_ids=torch.arange(100, 100 + b, dtype=torch.int32).reshape(b, 1),
                geometry=torch.from_numpy(rng.random((b, 4), np.float32)))


LUT = torch.tensor([0, 1, 3, 5, 7, 9], dtype=torch.int64)  # category id -> label


@pytest.mark.parametrize("batched", [False, True])
def test_targets_equal_the_plain_per_image_reading(batched, monkeypatch):
    monkeypatch.setattr(iterator, "unpack_masks", functools.partial(iterator.unpack_masks, batched=batched))
    d = batch(6)
    images, targets = iterator.to_targets(d, LUT)
    assert images is d["images"] and len(targets) == 6
    for i, t in enumerate(targets):
        n = int(d["counts"][i])
        ids = d["cat_ids"][i, :n].long()
        torch.testing.assert_close(t["boxes"], d["boxes"][i, :n])
        assert torch.equal(t["labels"], LUT[ids]) and t["labels"].dtype == torch.int64
        assert torch.equal(t["cat_ids"], ids)
        assert torch.equal(t["masks"], torch.from_numpy(np.unpackbits(d["masks"][i, :n].numpy(), axis=-1)))
        assert t["masks"].shape == (n, 24, 24) and t["masks"].dtype == torch.uint8
        assert torch.equal(t["pasted"], d["pasted"][i, :n].bool())
        assert t["image_id"] == 100 + i
        assert t["geometry"] == Geometry.from_row(d["geometry"][i])


class _Ops(TorchDispatchMode):
    """Counts tensor operations that compute something (views and in-place views are free)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        if not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_fixed_number_of_tensor_operations_per_batch_whatever_its_size(monkeypatch):
    """The GPU form (batched), counted on CPU tensors: the same operations for 2 images as for 32, so
    nothing runs image by image. Before, each image cost a label gather, a bool cast and a mask unpack."""
    monkeypatch.setattr(iterator, "unpack_masks", functools.partial(iterator.unpack_masks, batched=True))
    iterator.to_targets(batch(2), LUT)  # warm-up: the unpack's shift table is made once per device
    counted = {}
    for b in (2, 32):
        d = batch(b, seed=b)
        with _Ops() as ops:
            iterator.to_targets(d, LUT)
        counted[b] = ops.ops
    assert counted[2] == counted[32], counted
    assert len(counted[32]) <= 7 and "_local_scalar_dense.default" not in counted[32], counted[32]
