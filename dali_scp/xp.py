"""The array-module seam: every operator is written once against ``xp`` (NumPy, CuPy, or the counting
CuPy stand-in ``dali_scp.cupy_standin``).

Why a seam at all: the same code must run in CI (no GPU) and on the GPU, and the CPU twin is the
reference the GPU path is tested against. The few calls that differ between the libraries are wrapped
here and nowhere else, and so are the two custom CUDA kernels (each with its NumPy reference, which is
what NumPy and the stand-in run).
"""
from __future__ import annotations

import numpy as np

from dali_scp.cupy_standin import DeviceArray, is_standin
from dali_scp.deps import require_cupy


def get_xp(*arrays):
    """NumPy unless an argument is a CuPy (or stand-in) array; decided by type, so CPU code never
    imports CuPy."""
    for a in arrays:
        if isinstance(a, DeviceArray):
            return a._xp
        if type(a).__module__.startswith("cupy"):
            return require_cupy()
    return np


def to_numpy(a):
    """The one way device data reaches the host (a blocking sync on the GPU)."""
    if isinstance(a, DeviceArray) or type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def _scatter(kind, xp, out, idx, vals):
    if is_standin(xp):
        xp.scatter(kind, out, idx, vals)
    else:  # ufunc.at: NumPy, and CuPy >= 14.1 (cupyx.scatter_* are deprecated there)
        getattr({"add": xp.add, "min": xp.minimum, "max": xp.maximum}[kind], "at")(out, idx, vals)


def scatter_add(xp, out, idx, vals):
    """Unbuffered ``out[idx] += vals`` (int32/uint32/float: CuPy < 14.1 has no 64-bit integer atomics)."""
    _scatter("add", xp, out, idx, vals)


def scatter_min(xp, out, idx, vals):
    _scatter("min", xp, out, idx, vals)


def scatter_max(xp, out, idx, vals):
    _scatter("max", xp, out, idx, vals)


def gaussian_filter(xp, a, sigma):
    if xp is np or is_standin(xp):
        from scipy.ndimage import gaussian_filter as gf
        if is_standin(xp):
            return xp.fused("gaussian_filter", lambda x: gf(x, sigma), a)
    else:
        from cupyx.scipy.ndimage import gaussian_filter as gf
    return gf(a, sigma)


def ranks_within(xp, counts):
    """For counts [2, 3] -> [0, 1, 0, 1, 2]: the position of each expanded element in its group (NumPy)."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=counts.dtype) - np.repeat(starts, counts)


def packbits(xp, masks):
    """[..., W] 0/1 uint8 -> [..., W/8] bytes, first pixel in the high bit (NumPy's default order)."""
    if xp is np:
        return np.packbits(masks, axis=-1)
    if masks.shape[-1] % 8:  # pad the row to whole bytes with zero pixels, as np.packbits does
        pad = xp.zeros(masks.shape[:-1] + (8 - masks.shape[-1] % 8,), masks.dtype)
        masks = xp.concatenate([masks, pad], axis=-1)
    masks = (masks != 0).astype(xp.uint8)  # any nonzero pixel is set, as np.packbits reads it
    shifts = xp.arange(7, -1, -1).astype(xp.uint8)
    m = masks.reshape(masks.shape[:-1] + (masks.shape[-1] // 8, 8))
    return (m << shifts).sum(axis=-1, dtype=xp.uint8)


def unpackbits(xp, packed):
    if xp is np:
        return np.unpackbits(packed, axis=-1)
    shifts = xp.arange(7, -1, -1).astype(xp.uint8)
    return ((packed[..., None] >> shifts) & 1).reshape(packed.shape[:-1] + (packed.shape[-1] * 8,))


# --- custom kernels: CUDA source + the NumPy reference NumPy and the stand-in run -------------------------

_GATHER_SRC = r"""
extern "C" __global__ void dali_scp_gather_samples(const unsigned long long* src, const long long* dst_off,
                                                   const long long* nbytes, unsigned char* dst) {
    const int b = blockIdx.y;
    const unsigned char* s = (const unsigned char*)src[b];
    unsigned char* d = dst + dst_off[b];
    const long long n = nbytes[b];
    const long long step = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if ((((unsigned long long)s | (unsigned long long)d) & 15) == 0) {  // 16-byte words, then the tail
        const long long n16 = n / 16;
        for (long long j = i; j < n16; j += step) ((uint4*)d)[j] = ((const uint4*)s)[j];
        for (long long j = n16 * 16 + i; j < n; j += step) d[j] = s[j];
    } else {
        for (long long j = i; j < n; j += step) d[j] = s[j];
    }
}
"""
_KERNELS: dict = {}


def _cupy_kernel(name, make):
    if name not in _KERNELS:
        _KERNELS[name] = make()
    return _KERNELS[name]


def gather_samples(xp, arrays, shape_tail=None):
    """Concatenate per-sample arrays (DALI hands a batch over as one array per sample) along axis 0 in
    ONE kernel whatever the batch size: CuPy's own ``concatenate`` launches one copy per array for
    arrays over 2 MiB, so a batch of B 1024^2 images would cost B kernels. The CUDA kernel reads a table
    of sample pointers; its reference is ``np.concatenate``."""
    dtype = np.dtype(arrays[0].dtype) if arrays else np.dtype(np.uint8)
    tail = tuple(shape_tail if shape_tail is not None else (arrays[0].shape[1:] if arrays else ()))
    rows = [int(a.shape[0]) if a.ndim else 1 for a in arrays]
    if xp is np or is_standin(xp):
        if not arrays:
            return xp.zeros((0,) + tail, dtype)
        flat = [a.reshape((r,) + tail) for a, r in zip(arrays, rows)]
        if xp is np:
            return np.concatenate(flat)
        xp.h2d_upload("gather_samples pointer table")
        return xp.fused("gather_samples", lambda *a: np.concatenate(a), *flat)
    cp = xp
    out = cp.empty((sum(rows),) + tail, dtype)
    if out.size == 0:
        return out
    row_bytes = int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
    # DALI's samples are dense and uniform; anything else (the list API) is made so first
    arrays = [a if a.dtype == dtype and a.flags.c_contiguous and a.shape[1:] == tail
              else cp.ascontiguousarray(a.reshape((r,) + tail), dtype=dtype) for a, r in zip(arrays, rows)]
    nbytes = np.array(rows, np.int64) * row_bytes
    table = np.stack([np.array([a.data.ptr for a in arrays], np.uint64).view(np.int64),
                      np.concatenate([[0], np.cumsum(nbytes)[:-1]]), nbytes])
    t = cp.asarray(table)
    k = _cupy_kernel("gather", lambda: cp.RawKernel(_GATHER_SRC, "dali_scp_gather_samples"))
    blocks = int(min(max((int(nbytes.max()) // 16 + 255) // 256, 1), 1024))
    k((blocks, len(arrays)), (256,), (t[0], t[1], t[2], out))
    return out


def _masked_or_reference(masks, sel):
    return np.bitwise_or.reduce(masks & (sel.astype(np.uint8) * np.uint8(255))[:, :, None, None], axis=1)


def masked_or(xp, masks, sel):
    """out[b] = bitwise OR of packed masks[b, n] over the n with sel[b, n]: [B, N, H, Wb] uint8 x [B, N]
    -> [B, H, Wb] uint8. On the GPU one reduction kernel, no [B, N, H, Wb] temporary."""
    if xp is np:
        return _masked_or_reference(masks, sel)
    if is_standin(xp):
        return xp.fused("masked_or", _masked_or_reference, masks, sel)
    k = _cupy_kernel("masked_or", lambda: xp.ReductionKernel(
        "uint8 m, uint8 s", "uint8 y", "m & s", "a | b", "y = a", "0", "dali_scp_masked_or"))
    s = (sel.astype(xp.uint8) * xp.uint8(255))[:, :, None, None]
    return k(masks, xp.broadcast_to(s, masks.shape), axis=1)
