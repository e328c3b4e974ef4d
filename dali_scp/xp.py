"""The array-module seam: every operator is written once against ``xp`` (NumPy, CuPy, or the counting
CuPy stand-in ``dali_scp.cupy_standin``).

Why a seam at all: the same code must run in CI (no GPU) and on the GPU, and the CPU twin is the
reference the GPU path is tested against. The few calls that differ between the libraries are wrapped
here and nowhere else, and so is the machinery of the raw CUDA kernels (``RawKernel``: source, declared
parameters, NumPy twin; ``launch`` runs the twin on NumPy and through the stand-in, the kernel on CuPy,
and the kernel's source on CPU threads beside the twin inside ``emulated_device.emulate()``).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

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


# --- raw CUDA kernels, each with its NumPy twin ---------------------------------------------------------
#
# Why raw kernels: a stage written as array calls launches one kernel per call, each a Python-level call
# under the GIL (and DALI's operator lock) in the training process; hundreds per batch added up on the
# H100. A raw kernel does one stage step in one launch. Its NumPy twin has the same arguments and the same
# semantics: NumPy runs the twin, the CuPy stand-in runs it and counts one launch, and on a GPU
# ``shadow_twins`` runs both on the same inputs and compares (tests/test_gpu.py). Rules every kernel keeps:
# grid-stride loops (correct for any grid), integer results or float arithmetic written with explicit
# round-to-nearest intrinsics (compiled without fused multiply-add: rounds as NumPy does), no headers,
# and outputs that do not depend on the order threads run in (atomics only for min/max/or).

# A table of per-sample device pointers: DALI hands a batch over as one array per sample, and a kernel can
# read them in place through such a table instead of a gathered copy. Passed as a list of arrays.
PRELUDE = r"""typedef unsigned long long u8_samples;   /* device pointers to uint8 samples */
typedef unsigned long long any_samples;  /* device pointers to samples of any one dtype */
"""
# CuPy adds -arch, -ftz=true and --std=c++17 itself (cupy/cuda/compiler.py, cupy/_core/core.pyx)
COMPILE_OPTIONS = ("--fmad=false",)
CUPY_ADDS = ("--std=c++17", "-ftz=true")

_C_DTYPES = {"unsigned char": np.uint8, "int": np.int32, "unsigned int": np.uint32, "long long": np.int64,
             "unsigned long long": np.uint64, "float": np.float32, "double": np.float64}
_SAMPLE_TABLES = {"u8_samples": np.uint8, "any_samples": None}
_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


class Param(NamedTuple):
    """One kernel parameter as the source declares it."""
    name: str
    dtype: np.dtype | None  # None: a sample table of any (single) dtype
    pointer: bool
    const: bool             # a const pointer: an input the kernel (and its twin) must not write
    samples: bool           # a sample table: passed as a list of arrays


def _parse_param(decl: str) -> Param:
    words = decl.replace("*", " * ").split()
    name, words = words[-1], [w for w in words[:-1] if w != "__restrict__"]
    pointer, const = "*" in words, "const" in words
    base = " ".join(w for w in words if w not in ("*", "const"))
    if base in _SAMPLE_TABLES:
        if not pointer:
            raise ValueError(f"{decl}: a sample table is a pointer")
        dt = _SAMPLE_TABLES[base]
        return Param(name, None if dt is None else np.dtype(dt), True, const, True)
    if base not in _C_DTYPES:
        raise ValueError(f"{decl}: unknown parameter type {base!r}")
    return Param(name, np.dtype(_C_DTYPES[base]), pointer, const, False)


@dataclass(frozen=True)
class RawKernel:
    """One ``extern "C" __global__`` function, the parameters its source declares, and its NumPy twin."""
    name: str
    params: tuple
    source: str
    twin: Callable

    def __call__(self, xp, grid, block, *args):
        launch(xp, self, grid, block, *args)


KERNELS: dict[str, RawKernel] = {}  # every raw kernel of the project (the compile test walks it)


def raw_kernel(body: str, register: bool = True):
    """Decorator: the CUDA source of one kernel, put on its NumPy twin (which takes the same arguments:
    arrays for pointers, a list of arrays for a sample table, NumPy scalars of the declared type).
    ``register``: list it in ``KERNELS`` (the project's kernels; tests define their own apart)."""
    m = _SIGNATURE.search(body)
    if m is None or len(_SIGNATURE.findall(body)) != 1:
        raise ValueError("a raw kernel's source holds exactly one extern \"C\" __global__ function")
    params = tuple(_parse_param(p) for p in m.group(2).split(",") if p.strip())

    def deco(twin):
        k = RawKernel(m.group(1), params, PRELUDE + body, twin)
        if register:
            KERNELS[k.name] = k
        return k
    return deco


def check_args(k: RawKernel, args, array_type) -> None:
    """Arguments against the declared parameters: dtype, C-contiguity (a raw kernel reads the data
    pointer, whatever the strides), NumPy scalars of exactly the declared type (CuPy would pass a Python
    int as 8 bytes whatever the parameter). CuPy itself checks none of this and would misread silently."""
    if len(args) != len(k.params):
        raise TypeError(f"{k.name}: {len(args)} arguments for {len(k.params)} parameters")
    for p, a in zip(k.params, args):
        where = f"{k.name}({p.name})"
        if p.samples:
            if not isinstance(a, (list, tuple)) or not all(isinstance(x, array_type) for x in a):
                raise TypeError(f"{where}: a sample table takes a list of device arrays")
            dts = {np.dtype(x.dtype) for x in a}
            if len(dts) > 1 or (p.dtype is not None and dts - {p.dtype}):
                raise TypeError(f"{where}: samples of dtype {sorted(map(str, dts))}, expected {p.dtype or 'one'}")
            if not all(x.flags.c_contiguous for x in a):
                raise TypeError(f"{where}: every sample must be C-contiguous")
        elif p.pointer:
            if not isinstance(a, array_type):
                raise TypeError(f"{where}: expected a device array, got {type(a).__name__}")
            if np.dtype(a.dtype) != p.dtype:
                raise TypeError(f"{where}: dtype {a.dtype}, the kernel reads {p.dtype}")
            if not a.flags.c_contiguous:
                raise TypeError(f"{where}: not C-contiguous")
        elif not (isinstance(a, np.generic) and a.dtype == p.dtype):
            raise TypeError(f"{where}: expected a numpy.{p.dtype} scalar, got {type(a).__name__}")


class Samples(list):
    """The arrays of a sample table that several kernels read: its device table of pointers is uploaded
    once (a plain list is uploaded at every launch)."""
    table = None


def _table(xp, a):
    if isinstance(a, Samples):
        if a.table is None:
            a.table = xp.asarray(np.array([x.data.ptr for x in a], np.uint64))
        return a.table
    return xp.asarray(np.array([x.data.ptr for x in a], np.uint64))


def blocks(n: int, threads: int = 256, cap: int = 65535) -> int:
    """Blocks for ``n`` work items in a grid-stride kernel: at least one (an empty grid is an error)."""
    return int(min(max((int(n) + threads - 1) // threads, 1), cap))


_COMPILED: dict = {}
_SHADOW: list | None = None
_EMULATOR = None  # dali_scp.emulated_device.emulate(): the kernel's source also runs, on the CPU


def launch(xp, k: RawKernel, grid, block, *args) -> None:
    """Run kernel ``k``: its twin on NumPy, counted through the stand-in, compiled and launched on CuPy;
    inside ``emulated_device.emulate()`` the kernel's own source also runs (on NumPy and the stand-in)."""
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (int(grid),)
    block = tuple(block) if isinstance(block, (tuple, list)) else (int(block),)
    if xp is np:
        check_args(k, args, np.ndarray)
        if _EMULATOR is not None:
            _EMULATOR.launch(k, grid, block, args, lambda: k.twin(*args))
        else:
            k.twin(*args)
        return
    if is_standin(xp):
        if _EMULATOR is not None:
            xp.check_launch(k, grid, block, args)
            _EMULATOR.launch(k, grid, block, args, lambda: xp.launch(k, grid, block, args))
        else:
            xp.launch(k, grid, block, args)
        return
    check_args(k, args, xp.ndarray)
    host = _shadow_inputs(k, args) if _SHADOW is not None else None
    dev = [_table(xp, a) if p.samples else a for p, a in zip(k.params, args)]
    key = (k.name, k.source)  # by source too: two kernels of one name must never share a binary
    if key not in _COMPILED:
        _COMPILED[key] = xp.RawKernel(k.source, k.name, options=COMPILE_OPTIONS)
    _COMPILED[key](grid, block, tuple(dev))
    if host is not None:
        _shadow_compare(k, args, host)


def _shadow_inputs(k, args):
    """Host copies of every argument before the launch (an output's prior contents too, so what the
    kernel leaves unwritten is the same on both sides)."""
    return [[x.get() for x in a] if p.samples else (a.get() if p.pointer else a) for p, a in zip(k.params, args)]


def _shadow_compare(k, args, host):
    k.twin(*host)  # the twin writes its outputs into the host copies
    for p, a, h in zip(k.params, args, host):
        if p.pointer and not p.const and not p.samples:
            got = a.get()
            if not np.array_equal(got.view(np.uint8), h.view(np.uint8)):
                bad = np.flatnonzero(got.reshape(-1) != h.reshape(-1))
                raise AssertionError(f"{k.name}: output {p.name} differs from the NumPy twin at "
                                     f"{bad.size} elements (first: index {bad[:1].tolist()}: "
                                     f"kernel {got.reshape(-1)[bad[:1]].tolist()} twin {h.reshape(-1)[bad[:1]].tolist()})")
    _SHADOW.append(k.name)


@contextmanager
def shadow_twins():
    """On a GPU: every raw kernel launched inside also runs its NumPy twin on host copies of the same
    arguments (outputs' prior contents included), and every output is compared byte for byte; yields
    the list of kernels checked. Blocking syncs on every launch: tests only."""
    global _SHADOW
    _SHADOW, prev = [], _SHADOW
    try:
        yield _SHADOW
    finally:
        _SHADOW = prev


@raw_kernel(r"""
extern "C" __global__ void dali_scp_gather_samples(const any_samples* src, const long long* dst_off,
                                                   const long long* nbytes, int n_samples, unsigned char* dst) {
    const long long step = (long long)gridDim.x * blockDim.x;
    for (int b = blockIdx.y; b < n_samples; b += gridDim.y) {
        const unsigned char* s = (const unsigned char*)src[b];
        unsigned char* d = dst + dst_off[b];
        const long long n = nbytes[b];
        const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if ((((unsigned long long)s | (unsigned long long)d) & 15) == 0) {  /* 16-byte words, then the tail */
            const long long n16 = n / 16;
            for (long long j = i; j < n16; j += step) ((uint4*)d)[j] = ((const uint4*)s)[j];
            for (long long j = n16 * 16 + i; j < n; j += step) d[j] = s[j];
        } else {
            for (long long j = i; j < n; j += step) d[j] = s[j];
        }
    }
}
""")
def GATHER_SAMPLES(src, dst_off, nbytes, n_samples, dst):
    for b in range(int(n_samples)):
        dst[dst_off[b]:dst_off[b] + nbytes[b]] = src[b].reshape(-1).view(np.uint8)


def gather_samples(xp, arrays, shape_tail=None):
    """Concatenate per-sample arrays (DALI hands a batch over as one array per sample) along axis 0 in
    ONE kernel whatever the batch size: CuPy's own ``concatenate`` launches one copy per array for
    arrays over 2 MiB, so a batch of B 1024^2 images would cost B kernels."""
    dtype = np.dtype(arrays[0].dtype) if arrays else np.dtype(np.uint8)
    tail = tuple(shape_tail if shape_tail is not None else (arrays[0].shape[1:] if arrays else ()))
    rows = [int(a.shape[0]) if a.ndim else 1 for a in arrays]
    if xp is np:
        return (np.concatenate([a.reshape((r,) + tail) for a, r in zip(arrays, rows)]) if arrays
                else np.zeros((0,) + tail, dtype))
    row_bytes = int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
    per_row = row_bytes // dtype.itemsize
    for b, (a, r) in enumerate(zip(arrays, rows)):  # host-side shapes: the kernel must never read past a sample
        if a.size != r * per_row:
            raise ValueError(f"gather_samples: sample {b} has shape {tuple(a.shape)}, not {r} rows of {tail}")
    out = xp.empty(sum(rows) * row_bytes, xp.uint8)
    if out.size:
        # DALI's samples are dense and uniform; anything else (the list API) is made so first
        arrays = [a if a.dtype == dtype and a.flags.c_contiguous else xp.ascontiguousarray(a, dtype=dtype)
                  for a in arrays]
        nbytes = np.array(rows, np.int64) * row_bytes
        table = xp.asarray(np.concatenate([np.cumsum(nbytes) - nbytes, nbytes]))
        GATHER_SAMPLES(xp, (blocks(int(nbytes.max()) // 16, 256, 1024), min(len(arrays), 65535)), (256,),
                               list(arrays), table[:len(arrays)], table[len(arrays):], np.int32(len(arrays)), out)
    return out.view(dtype).reshape((sum(rows),) + tail)

