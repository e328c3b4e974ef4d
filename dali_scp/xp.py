"""The array-module seam: every operator is written once against ``xp`` (NumPy or CuPy).

Why a seam at all: the same code must run in CI (no GPU) and on the GPU, and the CPU twin is the
reference the GPU path is tested against. The few calls that differ between the two libraries are
wrapped here and nowhere else.
"""
from __future__ import annotations

import numpy as np

from dali_scp.deps import require_cupy


def get_xp(*arrays):
    """NumPy unless an argument is a CuPy array (decided by type, so CPU code never imports CuPy)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return require_cupy()
    return np


def to_numpy(a):
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def scatter_min(xp, out, idx, vals):
    if xp is np:
        np.minimum.at(out, idx, vals)
    else:
        import cupyx
        cupyx.scatter_min(out, idx, vals)


def scatter_max(xp, out, idx, vals):
    if xp is np:
        np.maximum.at(out, idx, vals)
    else:
        import cupyx
        cupyx.scatter_max(out, idx, vals)


def gaussian_filter(xp, a, sigma):
    if xp is np:
        from scipy.ndimage import gaussian_filter as gf
    else:
        from cupyx.scipy.ndimage import gaussian_filter as gf
    return gf(a, sigma)


def repeat(xp, values, counts):
    """``np.repeat(values, counts)``; CuPy's repeat takes no array of counts, so it gets a sorted search."""
    if xp is np:
        return np.repeat(values, counts)
    ends = xp.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    owner = xp.searchsorted(ends, xp.arange(total, dtype=ends.dtype), side="right")
    return values[owner]


def ranks_within(xp, counts):
    """For counts [2, 3] -> [0, 1, 0, 1, 2]: the position of each expanded element in its group."""
    starts = xp.cumsum(counts) - counts
    total = int(counts.sum())
    return xp.arange(total, dtype=counts.dtype) - repeat(xp, starts, counts)


def packbits(xp, masks):
    """[..., W] 0/1 uint8 -> [..., W/8] bytes, first pixel in the high bit (NumPy's default order)."""
    if xp is np:
        return np.packbits(masks, axis=-1)
    shifts = xp.arange(7, -1, -1, dtype=xp.uint8)
    m = masks.reshape(masks.shape[:-1] + (masks.shape[-1] // 8, 8))
    return (m << shifts).sum(axis=-1, dtype=xp.uint8)


def unpackbits(xp, packed):
    if xp is np:
        return np.unpackbits(packed, axis=-1)
    shifts = xp.arange(7, -1, -1, dtype=xp.uint8)
    return ((packed[..., None] >> shifts) & 1).reshape(packed.shape[:-1] + (packed.shape[-1] * 8,))
