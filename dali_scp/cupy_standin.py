"""A NumPy-backed stand-in for CuPy that counts what the GPU would pay: kernels, host syncs, device bytes.

Why: the GPU is rarely available, but the cost of a GPU stage is mostly decided by its *shape* - how many
array operations it launches per batch, how often it waits for the device to hand a value back to the
host, and how much memory it holds at once. Those three numbers depend only on the code path, so the
very code the GPU runs (written against ``xp``) can run here on NumPy and CI can hold them to a budget.

What counts (CuPy's behaviour, read from its sources):
- ``kernels``: every array operation that produces or writes device data (ufuncs, reductions, scans,
  sorts, gathers/scatters, copies, fills, concatenation of any number of arrays), one per call. Pure
  views (basic slicing, reshape of contiguous data, ``broadcast_to``, ``view``) and ``empty`` cost none.
  A fused kernel (``fused``: a ReductionKernel/ElementwiseKernel with a NumPy reference) counts one, and
  so does a raw kernel (``launch``: ``dali_scp.xp.RawKernel``, run as its NumPy twin), plus one upload per
  table of sample pointers it reads.
- ``host_syncs``: every blocking device->host transfer: ``int()/float()/bool()`` of a device array,
  ``.item()``, ``.tolist()``, ``.get()``, ``asnumpy``, and operations whose output size depends on the
  data (``nonzero``, ``flatnonzero``, ``argwhere``, ``unique``, boolean-mask indexing).
- ``h2d``: host->device uploads (``asarray`` of host data); not blocking for the host, reported apart.
- ``peak_bytes``: the peak of live device bytes allocated since ``reset`` (inputs created before the
  reset are excluded, outputs still alive at the end are included). Temporaries *inside* a fused kernel
  do not exist on the GPU and are not counted.

It also refuses what CuPy refuses, so CI catches it: implicit conversion to NumPy (``np.asarray(d)``),
host arrays mixed into device operations, ``cupyx.scatter_min/max`` on 64-bit integers (CuPy < 14.1);
for raw kernels, host arrays and unsupported argument types (``cupy/cuda/function.pyx``) and launch
configurations CUDA rejects (an empty grid, more than 1024 threads a block) - and, stricter than CuPy,
which would let the kernel misread silently, arguments that do not match the declared parameters and a
twin that writes a ``const`` input. ``empty`` returns poisoned memory (0xA5 bytes), so code that relies
on fresh device memory being zero fails here as it would on the GPU.
"""
from __future__ import annotations

import weakref
from collections import Counter

import numpy as np

# np functions that return views (no kernel) when the result shares memory with an input
_VIEW_FUNCS = {"reshape", "broadcast_to", "expand_dims", "squeeze", "moveaxis", "transpose", "swapaxes",
               "ascontiguousarray", "atleast_1d", "atleast_2d", "ravel", "asarray"}
# data-dependent output size: the host must wait for the device to learn it
_SYNC_FUNCS = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract", "asnumpy"}
# kernels CuPy launches per call where it is more than one (its sources: scan = astype copy + scan kernel,
# plus a block-sum pass over 512 elements; searchsorted = zero fill + search; sort = copy + CUB sort)
_COST = {"cumsum": 2, "searchsorted": 2, "sort": 2, "argsort": 2}
POISON = 0xA5  # the byte ``empty`` fills new arrays with
_SCATTER_DTYPES = {"add": {np.int32, np.uint32, np.uint64, np.float16, np.float32, np.float64},
                   "min": {np.int32, np.uint32, np.float32, np.float64},  # CuPy < 14.1: no 64-bit ints
                   "max": {np.int32, np.uint32, np.float32, np.float64}}


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class Meter:
    """The counters; ``reset`` starts a measurement (live bytes at that moment become the baseline)."""

    def __init__(self):
        self.live = 0
        self._known: dict[int, int] = {}
        self.reset()

    def reset(self):
        self.kernels = self.host_syncs = self.h2d = 0
        self.ops: Counter = Counter()
        self.baseline = self.peak = self.live

    def kernel(self, name: str, n: int = 1):
        self.kernels += n
        self.ops[name] += n

    def sync(self, name: str):
        self.host_syncs += 1
        self.ops["sync:" + name] += 1

    def track(self, a: np.ndarray):
        r = _root(a)
        key = id(r)
        if key in self._known:
            return
        self._known[key] = r.nbytes
        self.live += r.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(r, self._free, key)

    def _free(self, key):
        self.live -= self._known.pop(key, 0)

    @property
    def peak_bytes(self) -> int:
        return self.peak - self.baseline

    def summary(self) -> dict:
        return {"host_syncs": self.host_syncs, "kernels": self.kernels, "h2d": self.h2d,
                "peak_bytes": self.peak_bytes}


def _unwrap(x, name="op"):
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, np.ndarray) and x.ndim > 0:
        raise TypeError(f"{name}: a host (NumPy) array was passed to a device operation; CuPy refuses this")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, name) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, name) for k, v in x.items()}
    return x


class DeviceArray:
    """A device array: the NumPy array inside stands for GPU memory and is only reachable through a sync."""
    __slots__ = ("_a", "_xp", "__weakref__")

    def __init__(self, a: np.ndarray, xp: "StandIn"):
        self._a, self._xp = a, xp

    # host-side metadata: free, as in CuPy
    shape = property(lambda s: s._a.shape)
    dtype = property(lambda s: s._a.dtype)
    ndim = property(lambda s: s._a.ndim)
    size = property(lambda s: s._a.size)
    nbytes = property(lambda s: s._a.nbytes)
    strides = property(lambda s: s._a.strides)
    flags = property(lambda s: s._a.flags)

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    # the ways data comes back to the host
    def get(self):
        self._xp.meter.sync("get")
        return self._a.copy()

    def item(self):
        self._xp.meter.sync("item")
        return self._a.item()

    def tolist(self):
        self._xp.meter.sync("tolist")
        return self._a.tolist()

    def __int__(self):
        self._xp.meter.sync("int")
        return int(self._a)

    def __index__(self):
        self._xp.meter.sync("index")
        return int(self._a)

    def __float__(self):
        self._xp.meter.sync("float")
        return float(self._a)

    def __bool__(self):
        self._xp.meter.sync("bool")
        return bool(self._a)

    def __array__(self, *a, **k):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (CuPy): use .get() or xp.asnumpy")

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        return self._xp._call(f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__,
                              getattr(ufunc, method), inputs, kw)

    def __array_function__(self, func, types, args, kwargs):
        return getattr(self._xp, func.__name__)(*args, **kwargs)

    # views
    @property
    def T(self):
        return self._xp._wrap(self._a.T)

    def view(self, dtype):
        return self._xp._wrap(self._a.view(dtype))

    def reshape(self, *shape):
        return self._xp.reshape(self, shape[0] if len(shape) == 1 else shape)

    def ravel(self):
        return self._xp.ravel(self)

    def __getitem__(self, key):
        k = _unwrap(key if isinstance(key, tuple) else (key,), "getitem")
        adv = [v for v in k if isinstance(v, (np.ndarray, list))]
        if not adv:
            return self._xp._wrap(self._a[key if not isinstance(key, DeviceArray) else key._a])
        if any(np.asarray(v).dtype == bool for v in adv):
            self._xp.meter.sync("boolean-index")
        self._xp.meter.kernel("gather")
        return self._xp._wrap(self._a[k if isinstance(key, tuple) else k[0]])

    def __setitem__(self, key, value):
        k = _unwrap(key if isinstance(key, tuple) else (key,), "setitem")
        if any(isinstance(v, np.ndarray) and v.dtype == bool for v in k):
            self._xp.meter.sync("boolean-setitem")
        self._xp.meter.kernel("scatter" if any(isinstance(v, np.ndarray) for v in k) else "copy")
        self._a[k if isinstance(key, tuple) else k[0]] = _unwrap(value, "setitem")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # copies and reductions: one kernel each
    def astype(self, dtype, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self._xp._call("astype", lambda a: a.astype(dtype), (self,), {})

    def copy(self):
        return self._xp._call("copy", np.copy, (self,), {})


def _method(name):
    def m(self, *args, **kw):
        return self._xp._call(name, getattr(np.ndarray, name), (self,) + args, kw)
    m.__name__ = name
    return m


for _name in ("sum", "any", "all", "max", "min", "argmax", "argmin", "mean", "cumsum", "prod", "nonzero"):
    setattr(DeviceArray, _name, _method(_name) if _name != "nonzero" else (lambda s: s._xp.nonzero(s)))

_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
           "floordiv": np.floor_divide, "mod": np.remainder, "and": np.bitwise_and, "or": np.bitwise_or,
           "xor": np.bitwise_xor, "lshift": np.left_shift, "rshift": np.right_shift, "pow": np.power}
for _n, _u in _BINARY.items():
    setattr(DeviceArray, f"__{_n}__", (lambda u: lambda s, o: s._xp._call(u.__name__, u, (s, o), {}))(_u))
    setattr(DeviceArray, f"__r{_n}__", (lambda u: lambda s, o: s._xp._call(u.__name__, u, (o, s), {}))(_u))
    setattr(DeviceArray, f"__i{_n}__",
            (lambda u: lambda s, o: s._xp._call(u.__name__, u, (s, o), {"out": s}))(_u))
for _n, _u in {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
               "eq": np.equal, "ne": np.not_equal}.items():
    setattr(DeviceArray, f"__{_n}__", (lambda u: lambda s, o: s._xp._call(u.__name__, u, (s, o), {}))(_u))
for _n, _u in {"invert": np.invert, "neg": np.negative, "abs": np.absolute}.items():
    setattr(DeviceArray, f"__{_n}__", (lambda u: lambda s: s._xp._call(u.__name__, u, (s,), {}))(_u))


class StandIn:
    """The module object: ``xp.zeros(...)``, ``xp.cumsum(...)``... as NumPy, with a meter."""
    ndarray = DeviceArray

    def __init__(self, poison: int = POISON):
        self.meter = Meter()
        self.poison = poison  # the byte ``empty`` fills new arrays with
        self.__name__ = "dali_scp.cupy_standin"

    def _wrap(self, r):
        if isinstance(r, np.ndarray):
            self.meter.track(r)
            return DeviceArray(r, self)
        if isinstance(r, np.generic):  # CuPy reductions return 0-d device arrays, not host scalars
            return self._wrap(np.asarray(r))
        if isinstance(r, tuple):
            return tuple(self._wrap(v) for v in r)
        if isinstance(r, list):
            return [self._wrap(v) for v in r]
        return r

    def _call(self, name, fn, args, kw):
        a, k = _unwrap(args, name), _unwrap(kw, name)
        if "out" in kw:  # a tuple with one output, as NumPy's ufunc machinery passes it
            out = kw["out"]
            out = out[0] if isinstance(out, tuple) else out
            k["out"] = out._a
            self.meter.kernel(name)
            fn(*a, **k)
            return out
        r = fn(*a, **k)
        base = name.split(".")[0]
        if base in _SYNC_FUNCS or (base == "where" and len(a) == 1):
            self.meter.sync(base)
        ins = [x for x in _flat(a) if isinstance(x, np.ndarray)]
        if base in ("concatenate", "stack"):
            self._concatenate_cost(base, a[0] if a else k.get("arrays"))
            return self._wrap(r)
        if base == "cumsum":
            axis = k.get("axis", a[1] if len(a) > 1 else None)
            length = a[0].size if axis is None else a[0].shape[axis]
            if length > 512:
                self.meter.kernel("cumsum", 2)
        if not (base in _VIEW_FUNCS and isinstance(r, np.ndarray) and any(np.may_share_memory(r, x) for x in ins)):
            self.meter.kernel(base, _COST.get(base, 1))
        return self._wrap(r)

    def _concatenate_cost(self, name, arrays):
        """CuPy: one kernel (after uploading a pointer table) for more than 8 arrays of one dtype that
        are small on average (< 2 MiB each); otherwise one copy kernel per array."""
        arrays = list(arrays)
        n = len(arrays)
        small = sum(x.nbytes for x in arrays) < (2 << 20) * n
        if n > 8 and len({x.dtype for x in arrays}) == 1 and small:
            self.meter.kernel(name)
            self.h2d_upload(name + " pointer table")
        else:
            self.meter.kernel(name, n)

    # creation
    def empty(self, shape, dtype=float):
        a = np.empty(shape, dtype)
        a.view(np.uint8).fill(self.poison)  # CuPy's empty is uninitialised device memory, not zeros
        return self._wrap(a)

    def empty_like(self, a, dtype=None):
        return self.empty(a.shape, dtype or a.dtype)

    def asarray(self, x, dtype=None):
        if isinstance(x, DeviceArray):
            return x if dtype is None or np.dtype(dtype) == x.dtype else x.astype(dtype)
        self.h2d_upload("asarray")
        return self._wrap(np.array(x, dtype=dtype))

    array = asarray

    def arange(self, start, stop=None, step=1, dtype=None):
        """As CuPy: start and step are converted to ``dtype`` first, so ``arange(7, -1, -1,
        dtype=uint8)`` raises OverflowError (NumPy computes it in a wider type and accepts it)."""
        if dtype is not None:
            typ = np.dtype(dtype).type
            typ(start if stop is not None else 0), typ(step)
        return self._call("arange", np.arange, (start,) if stop is None else (start, stop, step),
                          {} if dtype is None else {"dtype": dtype})

    def h2d_upload(self, name):
        self.meter.h2d += 1
        self.meter.ops["h2d:" + name] += 1

    def asnumpy(self, x):
        if isinstance(x, DeviceArray):
            return x.get()
        return np.asarray(x)

    # cupyx.scatter_* (unbuffered, in place), with CuPy 13's dtype limits
    def scatter(self, kind: str, out: DeviceArray, idx, vals):
        if out.dtype.type not in _SCATTER_DTYPES[kind]:
            raise TypeError(f"cupyx.scatter_{kind} does not support {out.dtype} (CuPy 13)")
        self.meter.kernel("scatter_" + kind)
        getattr({"add": np.add, "min": np.minimum, "max": np.maximum}[kind], "at")(
            out._a, _unwrap(idx, "scatter"), _unwrap(vals, "scatter"))

    def check_launch(self, kernel, grid: tuple, block: tuple, args: tuple):
        """What CuPy and CUDA would refuse of a raw-kernel launch, and arguments against the declaration."""
        from dali_scp.xp import check_args
        if not (1 <= len(grid) <= 3 and 1 <= len(block) <= 3):
            raise ValueError(f"{kernel.name}: grid and block take 1 to 3 dimensions")
        g, b = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        if (min(g + b) < 1 or g[0] > 2**31 - 1 or max(g[1:]) > 65535 or b[0] * b[1] * b[2] > 1024
                or b[2] > 64):
            raise ValueError(f"{kernel.name}: invalid launch configuration grid={grid} block={block} "
                             "(cuLaunchKernel: CUDA_ERROR_INVALID_VALUE)")
        for a in args:  # what CuPy's _pointer() accepts
            if isinstance(a, np.ndarray) and a.size != 1:
                raise TypeError(f"{kernel.name}: You are trying to pass a numpy.ndarray of shape {a.shape} as a "
                                "kernel parameter (CuPy refuses host arrays)")
            if not isinstance(a, (DeviceArray, np.generic, int, float, bool, list, tuple, type(None))):
                raise TypeError(f"{kernel.name}: Unsupported type {type(a)}")
        check_args(kernel, args, DeviceArray)

    def launch(self, kernel, grid: tuple, block: tuple, args: tuple):
        """A raw CUDA kernel (``dali_scp.xp.RawKernel``): checked as CuPy and CUDA would check the launch,
        and against its declared parameters; counted as one kernel; run as its NumPy twin with the
        ``const`` inputs made read-only."""
        self.check_launch(kernel, grid, block, args)
        self.meter.kernel("raw:" + kernel.name)
        host, frozen = [], []
        for p, a in zip(kernel.params, args):
            if p.samples:
                if getattr(a, "table", None) is None:  # a plain list, or an xp.Samples not uploaded yet
                    self.h2d_upload(kernel.name + " sample table")
                    if hasattr(a, "table"):
                        a.table = True
                host.append([x._a for x in a])
                frozen += [x._a for x in a]
            elif p.pointer:
                host.append(a._a)
                if p.const:
                    frozen.append(a._a)
            else:
                host.append(a)
        flags = [(x, x.flags.writeable) for x in frozen]
        try:
            for x, _ in flags:
                x.flags.writeable = False
            kernel.twin(*host)
        finally:
            for x, w in flags:
                x.flags.writeable = w

    def fused(self, name: str, reference, *args):
        """A custom CuPy kernel, run here as its NumPy reference: one kernel, no temporaries."""
        self.meter.kernel("fused:" + name)
        return self._wrap(reference(*_unwrap(args, name)))

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, type) or isinstance(attr, np.dtype) or not callable(attr):
            return attr  # dtypes, constants
        f = (lambda *a, **k: self._call(name, attr, a, k))
        f.__name__ = name
        return f


def _flat(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flat(v)
    else:
        yield x


def is_standin(xp) -> bool:
    return isinstance(xp, StandIn)
