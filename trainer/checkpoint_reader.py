"""Checkpoint files read as data: tensors, plain Python values, NumPy values rebuilt from their bytes, and
inert placeholders for everything else. Nothing named in the file is ever imported or called, and a file
cannot make the read take more memory or time than a small multiple of its own size.

Why not ``torch.load``: with ``weights_only=True`` it refuses every file that holds more than tensors and
containers, and the checkpoints users bring hold more - mmengine's ``iter_N.pth`` has ``HistoryBuffer``
objects (with bound methods pickled through ``builtins.getattr``) and NumPy scalars and arrays in its
``message_hub``, mmcv 1.x files carry their runner's meta; torch's way out (``add_safe_globals`` or
``weights_only=False``) imports those classes and runs their code. A pickle is a program: the only safe
reading is one that decides itself what each instruction may build.

How: a subclass of Python's own pure-Python unpickler (``pickle._Unpickler``) with its own dispatch table,
in the way of torch's ``_weights_only_unpickler`` (which interprets the opcodes itself too), but with the
unknown kept instead of refused:

- ``find_class`` never imports. A name it knows maps to a stand-in written here (``_STAND_INS``: torch's
  tensor rebuild functions, ``OrderedDict``, NumPy's scalar / array / dtype reconstructors, ``_codecs.encode``
  for protocol-2 bytes, a few builtin types), each of which checks its arguments' types and builds its value
  from plain data only (``torch.as_strided`` over storage bytes; ``np.frombuffer`` over a NumPy value's
  bytes). Names that exist to run code (``os``, ``subprocess``, ``builtins.eval``, ``importlib``, ...:
  ``_REFUSED``) refuse the file. Every other name becomes an ``InertGlobal`` - a string.
- The opcodes that call (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ) call only stand-ins; applied to an
  ``InertGlobal`` they make an ``Inert`` object recording the arguments. BUILD stores the state in an
  ``Inert`` (or finishes a NumPy value, or sets ``_metadata`` on a state dict); it never calls
  ``__setstate__``, so no object's own code runs. APPEND / SETITEM / ADDITEMS write only into lists, dicts,
  sets and ``Inert`` objects. ``getattr`` is a stand-in that answers only for inert objects (another
  ``InertGlobal``: mmengine's bound methods), so no attribute of a real object is ever reached. Extension
  codes (EXT1/2/4, a process-wide registry) are refused.
- Tensors: the pickle's persistent ids name storages; their bytes are read as raw records (torch's zip
  format: ``<dir>/data/<key>``, the key a plain name, the size checked against the id) or from the stream
  after the pickles (torch's legacy format, which mmdetection's ``publish_model`` writes), never unpickled.

Why this is safe: the only callables the unpickler can ever reach are the stand-ins (all defined in this
module, each validating its arguments) - there is no path from the file's bytes to an import, to an
attribute lookup on a real object, or to a method of an object the file chose.

Why it cannot be made to exhaust memory or time (a pickle can name one object many times through its memo
for two bytes each; a small file can describe a huge value):

- Budget (``_Budget``): storages' bytes at most the file's size (they are in it: every zip record stored,
  its sizes consistent and inside the file; legacy storages counted against the file too); everything the
  stand-ins create or copy - NumPy arrays, bytes, converted tensors, the copy of a tensor whose strides
  overlap (an ``expand``ed tensor: stored as one element, it would be billions to whoever converts it),
  containers built from other containers - at most twice the file's size plus 1 MiB. The pickle machine's
  own objects are at most one per opcode, as in every unpickler.
- Nesting at most ``MAX_DEPTH`` containers deep; names at most ``MAX_NAME`` characters; tensors and
  NumPy arrays at most ``MAX_DIMS`` dimensions.
- Dict keys and set items are text, bytes, numbers, ``None`` or small flat tuples of those (and at most
  ``MAX_COMPOSITE_KEYS`` keys whose hash a file could choose to collide): hashing a key never recurses
  (a 300k-deep tuple key crashes CPython's hash) nor repeats a large computation.
- Messages show values from the file only as bounded, escaped text or numbers, and anything else by its
  type (``printable``): ``str()`` of a list that shares itself ten times a level is exponentially long. Every
  refusal is one plain line; a crafted name cannot carry a newline or a terminal escape code.
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import mmap
import pickle
import re
import struct
import sys
import zipfile
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAX_DEPTH = 100              # containers inside containers (real checkpoints: < 20)
MAX_NAME = 256               # characters of a dotted class or function name (real: < 80)
MAX_DIMS = 64                # dimensions of a tensor or NumPy array (NumPy's own limit)
MAX_KEY_TUPLE = 16           # items of a tuple used as a dict key or set item
MAX_COMPOSITE_KEYS = 4096    # tuple / frozenset / complex / range keys in one file (their hashes can be made equal)
BUDGET_FACTOR, BUDGET_SLACK = 2, 1 << 20
ITEM_BYTES = 32              # what one item of a container built by a stand-in is charged


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that this code did not write (or wrote for another model):
    bad input the user can fix by naming another file, told apart from other failures by its type."""


class Refused(CheckpointError):
    """The file asks for something no checkpoint needs (running code); nothing in it ran."""


# ------------------------------------------------------------------ what unknown names become
@dataclass(frozen=True)
class InertGlobal:
    """A class or function named in the file, never imported: only its dotted name."""
    name: str

    def __repr__(self):
        return f"<inert {self.name}>"


class Inert:
    """An object of a class this reader never imports: the class's name and the data it was built from
    (constructor arguments, BUILD state, appended items, set items) - data, never run."""
    __slots__ = ("of", "args", "kwargs", "state", "items", "dictitems")

    def __init__(self, of: str, args: tuple = (), kwargs: dict | None = None):
        self.of, self.args, self.kwargs = of, args, kwargs or {}
        self.state, self.items, self.dictitems = None, [], {}

    def __repr__(self):
        return f"<inert {self.of} object>"


@dataclass
class Read:
    """What ``read`` returns: the object, and how many times each inert name was met (empty for files that
    hold only tensors and plain data)."""
    obj: Any
    inert: Counter = field(default_factory=Counter)
    format: str = "zip"


def printable(v: Any, limit: int = 120) -> str:
    """A value from the file, safe to print on one line and quick to make: text and bytes escaped and cut,
    integers (up to 64 bits) as numbers, names of inert and known things, anything else as its type. Never
    ``str()`` of an object the file built - a list sharing itself through the memo prints exponentially long."""
    if isinstance(v, (InertGlobal, _StandIn)):
        v = v.name
    elif isinstance(v, Inert):
        v = v.of
    elif isinstance(v, (torch.dtype, torch.device)):
        v = str(v)
    elif isinstance(v, KeyError):  # str(KeyError(k)) is repr(k)
        v = "KeyError"
    elif isinstance(v, BaseException):
        v = str(v)
        v = v[: v.find("\n")] if "\n" in v else v
    if isinstance(v, (str, bytes)):
        s = ascii(v[: limit + 1])
        s = s[1:-1] if isinstance(v, str) else s[2:-1]
    elif type(v) in (int, bool):
        s = str(v) if v.bit_length() <= 64 else f"an integer of {v.bit_length()} bits"
    else:
        s = f"a {type(v).__name__}"
    return s if len(s) <= limit else s[:limit] + "..."


class _Budget:
    """What one read may still create (see the module's docstring): storage bytes, other bytes, and keys
    whose hash a file could choose."""

    def __init__(self, file_size: int):
        self.storage = file_size
        self.made = BUDGET_FACTOR * file_size + BUDGET_SLACK
        self.composite_keys = MAX_COMPOSITE_KEYS

    def storage_bytes(self, n: int) -> None:
        self.storage -= n
        if self.storage < 0:
            raise CheckpointError("its storages are larger than the file")

    def make(self, n: int, what: str) -> None:
        self.made -= n
        if self.made < 0:
            raise CheckpointError(f"{what} would make the read create more than {BUDGET_FACTOR}x the file's "
                                  "size (a crafted or damaged file: real checkpoints hold what they describe)")


# ------------------------------------------------------------------ stand-ins
class _StandIn:
    """A function of this module that a pickle may call in place of the name it gives. Only ``find_class``
    makes these; the unpickler calls nothing else. ``marker``: what the name stands for as an argument
    (a storage's dtype, a builtin type as a defaultdict's factory); without ``fn`` it cannot be called."""
    __slots__ = ("name", "fn", "marker")

    def __init__(self, name: str, fn=None, marker=None):
        self.name, self.fn, self.marker = name, fn, marker

    def __repr__(self):
        return f"<stand-in for {self.name}>"


def _ints(v, what: str, nonneg: bool = True, most: int = MAX_DIMS) -> tuple:
    if (not isinstance(v, (tuple, list)) or len(v) > most
            or not all(type(x) is int and (x >= 0 or not nonneg) and -2 ** 63 < x < 2 ** 63 for x in v)):
        raise Refused(f"{what} must be a tuple of at most {most} non-negative 64-bit integers, got {printable(v)}")
    return tuple(v)


_KEY_ATOMS = (str, bytes, int, float, bool, type(None))


def _key(u, k) -> None:
    """A dict key or set item whose hash is quick and cannot recurse (CPython's tuple hash has no depth
    guard: a tuple 300k deep crashes the process) nor be made to collide without bound."""
    t = type(k)
    if t is int and k.bit_length() > 64:
        raise Refused(f"a dict key or set item that is an integer of {k.bit_length()} bits")
    if t in _KEY_ATOMS or t in (InertGlobal, Inert, torch.dtype, torch.device) or torch.is_tensor(k):
        return
    if isinstance(k, np.generic) and not isinstance(k, (np.void, np.complexfloating)):
        return
    if t is tuple and len(k) <= MAX_KEY_TUPLE and all(type(x) in _KEY_ATOMS and (type(x) is not int or
                                                      x.bit_length() <= 64) for x in k) \
            or t in (frozenset, complex, range) or isinstance(k, np.complexfloating):
        u.budget.composite_keys -= 1
        if u.budget.composite_keys < 0:
            raise Refused(f"more than {MAX_COMPOSITE_KEYS} dict keys or set items that are tuples, frozensets or "
                          "complex numbers")
        return
    raise Refused(f"a dict key or set item of type {printable(t.__name__)} (keys are text, numbers or small flat "
                  "tuples of those)")


def _keys(u, items, what: str) -> None:
    """Items about to become keys of a new container built from ``items``: the copy charged, each key checked."""
    u.budget.make(ITEM_BYTES * len(items), what)
    for k in items:
        _key(u, k)


def _pairs(u, items, what: str) -> list:
    """(key, value) pairs from a dict or a sequence of pairs, keys checked, the copy charged."""
    if not isinstance(items, (dict, list, tuple)):
        raise Refused(f"{what} of a {printable(type(items).__name__)}, not key-value pairs")
    u.budget.make(ITEM_BYTES * len(items), what)
    if isinstance(items, dict):
        pairs = list(items.items())
    elif all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        pairs = [tuple(p) for p in items]
    else:
        raise Refused(f"{what} of other than key-value pairs")
    for k, _ in pairs:
        _key(u, k)
    return pairs


class _Storage:
    """A storage read from the file: a flat tensor of its dtype over its own memory (tensors are views
    of it; offsets and bounds are relative to it), and whether its bytes are in it yet."""
    __slots__ = ("data", "filled")

    def __init__(self, data: torch.Tensor, filled: bool):
        self.data, self.filled = data, filled


def _rebuild_tensor(u, storage, offset, size, stride, requires_grad=False, dtype=None):
    if not isinstance(storage, _Storage):
        raise Refused(f"a tensor's storage is a {printable(type(storage).__name__)}, not a storage record")
    if type(offset) is not int or not 0 <= offset < 2 ** 63:
        raise Refused("a tensor's storage offset is not a non-negative 64-bit integer")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(size) != len(stride):
        raise Refused("a tensor's size and stride differ in length")
    if type(requires_grad) is not bool:
        raise Refused("a tensor's requires_grad is not a boolean")
    data = storage.data
    if dtype is not None and dtype != data.dtype:
        if not isinstance(dtype, torch.dtype) or data.dtype != torch.uint8 or data.numel() % dtype.itemsize:
            raise Refused(f"a tensor of {printable(dtype)} over a storage of {data.dtype}")
        data = data.view(dtype)
    n = math.prod(size)
    if n > data.numel():  # overlapping strides (an expanded tensor): a copy, within the budget, so that no
        u.budget.make(n * data.element_size(), "an expanded tensor")  # consumer ever converts 1 element into n
    try:
        t = torch.as_strided(data, size, stride, offset)  # torch checks the view stays inside the storage
    except RuntimeError as e:
        raise Refused(f"a tensor reaches outside its storage ({printable(e)})") from None
    if n > data.numel() and storage.filled:
        t = t.contiguous()
    elif n > data.numel():  # a legacy file's storages get their bytes after the pickle: copied then
        view, t = t, torch.zeros(size, dtype=data.dtype)
        u.copies.append((t, view))
    if requires_grad and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


def _tensor_v2(u, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _rebuild_tensor(u, storage, offset, size, stride, requires_grad)  # hooks and metadata not kept


def _tensor_v3(u, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild_tensor(u, storage, offset, size, stride, requires_grad, dtype=dtype)


def _parameter(u, data, requires_grad=True, hooks=None, state=None):
    if not torch.is_tensor(data):
        raise Refused("a parameter's data is not a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad) and data.is_floating_point())


def _from_type_v2(u, func, new_type, args, state):
    if not isinstance(func, _StandIn) or type(args) is not tuple:
        raise Refused("a tensor subclass rebuilt by something other than torch's tensor functions")
    return u.call(func, args)  # the subclass and its Python attributes are not kept: the tensor is


def _converted(u, t: torch.Tensor, dtype, what: str) -> torch.Tensor:
    if dtype == t.dtype:
        return t
    u.budget.make(t.numel() * dtype.itemsize, what)
    return t.to(dtype)


def _from_numpy(u, data, dtype, device, requires_grad):
    if not isinstance(data, np.ndarray) or data.dtype.hasobject or not isinstance(dtype, torch.dtype):
        raise Refused("a tensor rebuilt from something other than a numeric NumPy array")
    return _converted(u, torch.from_numpy(data), dtype, "a tensor converted from NumPy")  # shares, as torch's does


def _from_cpu_tensor(u, data, dtype, device, requires_grad):
    if not torch.is_tensor(data) or not isinstance(dtype, torch.dtype):
        raise Refused("a tensor rebuilt from something other than a tensor")
    return _converted(u, data, dtype, "a converted tensor")


def _torch_size(u, dims=()):
    return torch.Size(_ints(dims, "torch.Size"))


def _torch_device(u, kind, index=None):
    if type(kind) is not str or len(kind) > 64 or (index is not None and type(index) is not int):
        raise Refused("torch.device of other than a short name and an index")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _codecs_encode(u, text, encoding="utf-8"):
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode with {printable(encoding)} (pickles encode bytes as latin1)")
    u.budget.make(len(text), "bytes")
    return text.encode("latin-1")


def _plain(u, kind, *args):
    """builtins set, frozenset, bytes, bytearray, complex, slice, range - from plain values only."""
    if len(args) > 3 or not all(isinstance(a, (list, tuple, str, bytes, int, float, type(None))) for a in args):
        raise Refused(f"builtins.{kind.__name__} of {printable(args[0] if args else None)}")
    if not args:
        return kind()  # set(), bytes() ...; slice() and range() refuse as Python does
    first = args[0]
    if kind in (set, frozenset):
        if len(args) > 1 or not isinstance(first, (list, tuple, set, frozenset, str, bytes)):
            raise Refused(f"builtins.{kind.__name__} of {printable(first)}")
        _keys(u, first, f"a {kind.__name__}")
    elif kind in (bytes, bytearray):
        if not isinstance(first, (bytes, str, list)):
            raise Refused(f"builtins.{kind.__name__} of {printable(first)}")  # bytes(10**12) would allocate it
        if len(args) == 2 and args[1] not in ("latin1", "latin-1", "utf-8"):
            raise Refused(f"{kind.__name__} with encoding {printable(args[1])}")
        u.budget.make(len(first) * 4, "bytes")
    elif kind is complex:
        if not all(type(a) in (int, float) or type(a) is str and len(a) <= 64 for a in args):
            raise Refused("builtins.complex of other than numbers")
    elif kind is range and not all(type(a) is int for a in args):
        raise Refused("builtins.range of other than integers")
    return kind(*args)


def _getattr(u, obj, name):
    """Only for inert objects (mmengine pickles bound methods as getattr(HistoryBuffer, 'min')): another
    inert name. An attribute of a real object would be the first step of every pickle sandbox escape."""
    if type(name) is not str or not isinstance(obj, (InertGlobal, Inert)):
        raise Refused(f"its pickle asks for attribute {printable(name)} of a {printable(type(obj).__name__)} "
                      "(getattr on anything but an unknown class)")
    return u.inert_global(f"{obj.name if isinstance(obj, InertGlobal) else obj.of}.{name}")


def _ordered_dict(u, items=()):
    return OrderedDict(_pairs(u, items, "collections.OrderedDict"))


def _counter(u, items=()):
    return Counter(dict(_pairs(u, items, "collections.Counter")))


def _defaultdict(u, factory=None, items=()):
    """With its factory when that is a builtin type (``defaultdict(list)``: calling ``list`` later is
    harmless); a factory the reader does not import (its name is counted as inert) becomes None."""
    if isinstance(factory, _StandIn) and isinstance(factory.marker, type):
        factory = factory.marker
    elif not (factory is None or isinstance(factory, InertGlobal)):
        raise Refused(f"collections.defaultdict with a factory of type {printable(type(factory).__name__)}")
    return defaultdict(factory if isinstance(factory, type) else None, _pairs(u, items, "collections.defaultdict"))


def _reconstructor(u, cls, base, state):
    """copyreg._reconstructor (protocols 0 and 1): an object of ``cls`` built on ``base``."""
    return u.new(cls, () if state is None else (state,), {})


def _newobj(u, cls, *args):
    return u.new(cls, args, {})


def _newobj_ex(u, cls, args, kwargs):
    return u.new(cls, args, kwargs)


# NumPy: a dtype from its name and byte order, an array or a scalar from its bytes
_NUMPY_KINDS = re.compile(r"([biufcSUVO])(\d{1,10})")
_NATIVE = "<" if sys.byteorder == "little" else ">"


class _Pending:
    """A NumPy dtype or array between its constructor call and its BUILD (the state with its bytes)."""

    def finish(self, u, state):
        raise NotImplementedError


class _PendingDtype(_Pending):
    def __init__(self, name):
        if type(name) is not str or not _NUMPY_KINDS.fullmatch(name):
            raise Refused(f"NumPy dtype {printable(name)} (plain numeric, string and object dtypes only)")
        self.name = name

    def finish(self, u=None, state=None):
        kind, size = _NUMPY_KINDS.fullmatch(self.name).groups()
        order = "|"
        if state is not None:
            if (type(state) is not tuple or len(state) < 8 or state[0] not in (3, 4)
                    or state[1] not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5])):
                raise Refused(f"NumPy dtype {printable(self.name)} with fields, a subarray or an unknown state "
                              "(structured dtypes are not read)")
            order = state[1]
            if kind in "SUV" and type(state[5]) is int and 0 < state[5] < 2 ** 31:
                size = str(state[5] // (4 if kind == "U" else 1))
        d = np.dtype(kind + size if kind != "O" else "O")
        return d.newbyteorder(order) if order in "<>" and order != _NATIVE else d  # native: as NumPy shows it


def _dtype_of(d) -> np.dtype:
    if isinstance(d, _PendingDtype):
        return d.finish()
    if not isinstance(d, np.dtype):
        raise Refused(f"a NumPy value of dtype {printable(type(d).__name__)}")
    return d


class _PendingArray(_Pending):
    def finish(self, u, state):
        if type(state) is not tuple or len(state) != 5 or state[0] != 1:
            raise Refused("a NumPy array whose state is not (1, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, data = state
        return _array(u, _ints(shape, "a NumPy array's shape"), _dtype_of(dtype), "F" if fortran else "C", data)


def _array(u, shape: tuple, dtype: np.dtype, order: str, data, native: bool = True) -> np.ndarray:
    """A new array from the file's bytes (or items, for object arrays), as NumPy unpickles it: native byte
    order for ``ndarray.__reduce__``'s arrays, the stored one for protocol 5's ``_frombuffer``."""
    n = math.prod(shape)
    if dtype.hasobject:
        if type(data) is not list or len(data) != n:
            raise Refused(f"a NumPy object array of shape {printable(shape)} whose items are not a list of {n}")
        u.budget.make(8 * n, "a NumPy object array")
        out = np.empty(n, dtype=object)
        for i, x in enumerate(data):
            out[i] = x
        return out.reshape(shape, order=order)
    nbytes = n * dtype.itemsize
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != nbytes:
        raise Refused(f"a NumPy array of shape {printable(shape)} and dtype {dtype} whose data is not {nbytes} bytes")
    u.budget.make(nbytes, "a NumPy array")
    out = np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
    return out.astype(dtype.newbyteorder("="), order="K") if native and not dtype.isnative else out.copy(order="K")


def _np_reconstruct(u, subtype, shape, typecode):
    if not (isinstance(subtype, _StandIn) and subtype.name == "numpy.ndarray"):
        raise Refused(f"a NumPy array of subtype {printable(subtype)}")
    return _PendingArray()


def _np_scalar(u, dtype, data=None):
    dtype = _dtype_of(dtype)
    if dtype.hasobject:
        return data
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise Refused(f"a NumPy {dtype} scalar whose data is not {dtype.itemsize} bytes")
    u.budget.make(dtype.itemsize, "a NumPy scalar")
    return np.frombuffer(data, dtype=dtype)[0]


def _np_dtype(u, name, align=False, copy=False):
    return _PendingDtype(name)


def _np_frombuffer(u, buf, dtype, shape, order):
    if order not in ("C", "F"):
        raise Refused("a NumPy array of unknown order")
    return _array(u, _ints(shape, "a NumPy array's shape"), _dtype_of(dtype), order, buf, native=False)


def _layout(u, name):
    """torch.serialization._get_layout: a layout from its name ('torch.sparse_coo')."""
    if type(name) is not str or not isinstance(_DATA_GLOBALS.get(name), torch.layout):
        raise Refused(f"torch layout {printable(name)}")
    return _DATA_GLOBALS[name]


def _torch_dtypes() -> dict:
    return {f"torch.{n}": getattr(torch, n) for n in dir(torch)
            if isinstance(getattr(torch, n, None), (torch.dtype, torch.layout, torch.memory_format))}


_STORAGE_DTYPES = {name: d for d, name in torch.storage._dtype_to_storage_type_map().items()
                   if not name.startswith("Q")} | {"UntypedStorage": torch.uint8}
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")  # torch.storage.UntypedStorage: uint16/32/64, float8

_STAND_INS: dict[str, _StandIn] = {}
for _names, _fn in [
    (["torch._utils._rebuild_tensor"], _rebuild_tensor),
    (["torch._utils._rebuild_tensor_v2"], _tensor_v2),
    (["torch._utils._rebuild_tensor_v3"], _tensor_v3),
    (["torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"], _parameter),
    (["torch._tensor._rebuild_from_type_v2", "torch.tensor._rebuild_from_type_v2"], _from_type_v2),
    (["torch._utils._rebuild_device_tensor_from_numpy"], _from_numpy),
    (["torch._utils._rebuild_device_tensor_from_cpu_tensor"], _from_cpu_tensor),
    (["torch.Size"], _torch_size),
    (["torch.device"], _torch_device),
    (["torch.serialization._get_layout"], _layout),
    (["_codecs.encode"], _codecs_encode),
    (["builtins.getattr"], _getattr),
    (["collections.OrderedDict"], _ordered_dict),
    (["collections.Counter"], _counter),
    (["collections.defaultdict"], _defaultdict),
    (["copyreg._reconstructor"], _reconstructor),
    (["copyreg.__newobj__"], _newobj),
    (["copyreg.__newobj_ex__"], _newobj_ex),
    (["numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"], _np_scalar),
    (["numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"], _np_reconstruct),
    (["numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"], _np_frombuffer),
    (["numpy.dtype"], _np_dtype),
]:
    for _n in _names:
        _STAND_INS[_n] = _StandIn(_n, _fn)
for _kind in (set, frozenset, bytes, bytearray, complex, slice, range):
    _STAND_INS[f"builtins.{_kind.__name__}"] = _StandIn(f"builtins.{_kind.__name__}",
                                                        lambda u, *a, _k=_kind: _plain(u, _k, *a), marker=_kind)
for _kind in (list, dict, tuple, int, float, str, bool, object):  # defaultdict factories, copyreg bases: never called
    _STAND_INS[f"builtins.{_kind.__name__}"] = _StandIn(f"builtins.{_kind.__name__}", marker=_kind)
_STAND_INS["numpy.ndarray"] = _StandIn("numpy.ndarray")  # only ever an argument of the reconstructors above
_DATA_GLOBALS = _torch_dtypes()

# Names that exist to run code, reach the system or load more pickles: one of these refuses the file with a
# message naming it (an inert placeholder would be safe too; a checkpoint never has a reason to name them, so
# the file is treated as hostile). Other names - builtins such as ``max`` in a pickled ``functools.partial``,
# ``pathlib.PosixPath``, ``types.SimpleNamespace`` - become inert like any unknown class.
_REFUSED = {"os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "shutil", "socket", "pty", "ctypes",
            "pickle", "_pickle", "cPickle", "marshal", "code", "codeop", "operator", "_operator",
            "webbrowser", "multiprocessing", "asyncio", "pdb", "timeit", "tempfile", "io", "_io", "signal",
            "threading", "_thread", "platform", "commands", "popen2", "__builtin__",
            "_codecs", "codecs", "inspect", "gc", "posixpath", "ntpath", "glob", "dill", "cloudpickle",
            "joblib", "_posixsubprocess", "zipimport", "site", "sysconfig", "distutils", "setuptools", "pip"}
_REFUSED_NAMES = {f"builtins.{n}" for n in (
    "eval", "exec", "compile", "open", "__import__", "breakpoint", "input", "setattr", "delattr", "globals",
    "locals", "vars", "exit", "quit", "help", "__build_class__", "__loader__", "type")} | {
    f"types.{n}" for n in ("FunctionType", "LambdaType", "CodeType", "MethodType", "ModuleType")} | {
    f"functools.{n}" for n in ("reduce", "_lru_cache_wrapper", "lru_cache", "cache")}


# ------------------------------------------------------------------ the unpickler
class _Unpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storage_of, budget: _Budget):
        super().__init__(file, encoding="utf-8")
        self.storage_of, self.budget = storage_of, budget
        self.copies: list = []  # (tensor, the view it copies): expanded tensors of storages not yet filled
        self.inert: Counter = Counter()
        self.pending_memo: dict[int, list] = {}

    # names -----------------------------------------------------------------
    def find_class(self, module, name):
        if type(module) is not str or type(name) is not str:
            raise Refused("a global whose name is not a string")
        if len(module) + len(name) >= MAX_NAME:
            raise Refused(f"a global of more than {MAX_NAME} characters ({printable(module + '.' + name, 60)})")
        if self.proto < 3:  # Python 2 names, as pickle maps them (a table, no import)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch.tensor":  # torch's own rename (torch.serialization's load_module_mapping)
            module = "torch._tensor"
        full = f"{module}.{name}"
        if full in _STAND_INS:
            return _STAND_INS[full]
        if full in _DATA_GLOBALS:
            return _DATA_GLOBALS[full]
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return _StandIn(full, marker=_STORAGE_DTYPES[name])
        if module.split(".")[0] in _REFUSED or full in _REFUSED_NAMES:
            raise Refused(f"refused: its pickle calls {printable(full)}, which no checkpoint needs (nothing in the "
                          "file ran)")
        return self.inert_global(full)

    def inert_global(self, name: str) -> InertGlobal:
        if len(name) > MAX_NAME:  # getattr(getattr(X, a), b)...: names would grow with every step
            raise Refused(f"an attribute name of more than {MAX_NAME} characters ({printable(name, 60)})")
        self.inert[name] += 1
        return InertGlobal(name)

    # calls -----------------------------------------------------------------
    def call(self, func, args, kwargs=None):
        if type(args) is not tuple:
            raise Refused("a call whose arguments are not a tuple")
        if isinstance(func, InertGlobal):
            return Inert(func.name, args, kwargs)
        if isinstance(func, _StandIn) and func.fn is not None:
            self.budget.make(8 * len(args), "a call's arguments")  # *args copies them
            try:
                return func.fn(self, *args, **(kwargs or {}))
            except TypeError as e:  # wrong number of arguments for the stand-in's signature
                raise Refused(f"{func.name} called with unexpected arguments ({printable(e)})") from None
        raise Refused(f"its pickle calls {printable(func, 60)}, which is not a function this reader knows")

    def new(self, cls, args, kwargs):
        if type(args) not in (tuple, list) or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise Refused("an object built from arguments that are not a tuple and a dict of names")
        if type(args) is list:
            self.budget.make(8 * len(args), "a call's arguments")
        return self.call(cls, tuple(args), kwargs)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.new(cls, args, {}))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.new(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self.append(self.new(klass, args, {}))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Inert):
            inst.state = state
        elif isinstance(inst, _Pending):
            value = inst.finish(self, state)
            self.stack[-1] = value
            for i in self.pending_memo.pop(id(inst), ()):
                self.memo[i] = value
        elif type(inst) is OrderedDict and type(state) is dict and len(state) <= 1 and \
                all(k == "_metadata" for k in state):
            inst._metadata = state.get("_metadata")  # what torch's state_dict() attaches (module versions)
        else:
            raise Refused(f"its pickle sets the state of a {printable(type(inst).__name__)} (BUILD), which no "
                          "checkpoint needs")
    dispatch[pickle.BUILD[0]] = load_build

    # containers: every key checked before it is hashed -------------------------------------------
    def _target(self, kinds, what):
        obj = self.stack[-1]
        if type(obj) not in kinds and not isinstance(obj, Inert):
            raise Refused(f"its pickle {what} a {printable(type(obj).__name__)}")
        return obj

    def load_append(self):
        value = self.stack.pop()
        obj = self._target((list,), "appends to")
        (obj.items if isinstance(obj, Inert) else obj).append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        obj = self._target((list,), "appends to")
        (obj.items if isinstance(obj, Inert) else obj).extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def _set(self, target, keys, values):
        for k in keys:
            _key(self, k)
        for k, v in zip(keys, values):
            target[k] = v

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        obj = self._target((dict, OrderedDict, Counter, defaultdict), "sets items of")
        self._set(obj.dictitems if isinstance(obj, Inert) else obj, (key,), (value,))
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        obj = self._target((dict, OrderedDict, Counter, defaultdict), "sets items of")
        self._set(obj.dictitems if isinstance(obj, Inert) else obj, items[::2], items[1::2])
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):  # DICT (protocols 0 and 1)
        items = self.pop_mark()
        d = {}
        self._set(d, items[::2], items[1::2])
        self.append(d)
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        obj = self._target((set,), "adds to")
        if isinstance(obj, Inert):
            obj.items.extend(items)
            return
        for k in items:
            _key(self, k)
        obj.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        for k in items:
            _key(self, k)
        self.append(frozenset(items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_ext(self):
        raise Refused("its pickle uses extension codes (EXT1/2/4), which torch.save never writes")
    dispatch[pickle.EXT1[0]] = dispatch[pickle.EXT2[0]] = dispatch[pickle.EXT4[0]] = load_ext

    # memo: a NumPy value between its constructor and BUILD is replaced there too --------------------
    def _memo_put(self, i):
        top = self.stack[-1]
        if isinstance(top, _Pending):
            self.pending_memo.setdefault(id(top), []).append(i)
        self.memo[i] = top

    def load_binput(self):
        self._memo_put(self.read(1)[0])
    dispatch[pickle.BINPUT[0]] = load_binput

    def load_long_binput(self):
        i, = struct.unpack("<I", self.read(4))
        self._memo_put(i)
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

    def load_put(self):
        i = int(self.readline()[:-1])
        if i < 0:
            raise Refused("a negative memo index")
        self._memo_put(i)
    dispatch[pickle.PUT[0]] = load_put

    def load_memoize(self):
        self._memo_put(len(self.memo))
    dispatch[pickle.MEMOIZE[0]] = load_memoize

    def persistent_load(self, pid):
        return self.storage_of(pid)


def _children(o):
    """What a container holds (None for anything else)."""
    t = type(o)
    if t in (list, tuple, set, frozenset):
        return o
    if t in (dict, OrderedDict, Counter, defaultdict):
        return o.values()  # keys are flat (``_key``)
    if t is Inert:
        return (o.args, o.kwargs, o.state, o.items, o.dictitems)
    if t is np.ndarray and o.dtype.hasobject:
        return o.ravel()
    return None


def _check_depth(root) -> None:
    """At most MAX_DEPTH containers deep (every consumer that walks the value recursively - repr, ==, copy,
    torch.save - would otherwise fail or crash on it). Each object is walked once (the memo shares objects
    between containers: their heights are kept); a cycle is cut where it closes."""
    if _children(root) is None:
        return
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, iter(_children(root)), [0])]
    on_path.add(id(root))
    while stack:
        obj, it, best = stack[-1]
        child = next(it, stack)  # the stack itself: the end marker
        if child is stack:
            stack.pop()
            on_path.discard(id(obj))
            height[id(obj)] = h = best[0] + 1
            if stack:
                stack[-1][2][0] = max(stack[-1][2][0], h)
            continue
        kids = _children(child)
        if kids is None or id(child) in on_path:
            continue
        if id(child) in height:
            h = height[id(child)]
        else:
            if len(stack) >= MAX_DEPTH:
                raise Refused(f"its data nests more than {MAX_DEPTH} containers deep")
            on_path.add(id(child))
            stack.append((child, iter(kids), [0]))
            continue
        best[0] = max(best[0], h)
        if len(stack) + h > MAX_DEPTH:
            raise Refused(f"its data nests more than {MAX_DEPTH} containers deep")


def _fill(copies: list) -> None:
    with torch.no_grad():
        for t, view in copies:
            t.copy_(view)


def _unpickle(file, storage_of, inert: Counter, budget: _Budget, copies: list | None = None):
    """The next pickle in ``file``; expanded tensors' copies go to ``copies`` (filled here if None)."""
    u = _Unpickler(file, storage_of, budget)
    try:
        obj = u.load()
        _check_depth(obj)
    except CheckpointError:
        raise
    except RecursionError:
        raise Refused("its pickle nests too deeply") from None
    except Exception as e:  # anything else a crafted stream provokes: a damaged file, in one line
        raise CheckpointError(f"its pickle is damaged or not one torch writes ({type(e).__name__}: "
                              f"{printable(e)})") from None
    inert.update(u.inert)
    if copies is None:
        _fill(u.copies)
    else:
        copies.extend(u.copies)
    return obj


def _storage_type(v):
    if not (isinstance(v, _StandIn) and isinstance(v.marker, torch.dtype)):
        raise Refused(f"a storage of type {printable(v)}, not one of torch's storage classes")
    return v.marker


def _pid(pid, n: int) -> tuple:
    if type(pid) is not tuple or len(pid) != n or pid[0] not in ("storage", b"storage"):
        kind = pid[0] if type(pid) is tuple and pid else pid
        raise Refused(f"a persistent id {printable(kind, 60)} that is not a storage (e.g. a pickled module's source)")
    return pid


# ------------------------------------------------------------------ torch's zip format
_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")


def _record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, file_size: int, what: str) -> bytearray:
    """The bytes of a record torch wrote: stored (torch never compresses), its sizes in the directory equal
    to each other and to what the pickle says, inside the file; read completely (zipfile checks its CRC)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{what} is compressed, which torch never writes")
    if info.file_size != size or info.compress_size != size:
        raise CheckpointError(f"{what}: record of {printable(info.file_size)} bytes ({printable(info.compress_size)} stored), "
                              f"its tensor needs {printable(size)}")
    if info.header_offset + 30 + len(info.orig_filename) + size > file_size:
        raise CheckpointError(f"{what}: record of {printable(size)} bytes reaches past the end of the file")
    buf = bytearray(size)
    with zf.open(info) as f:
        got = f.readinto(buf)
    if got != size:
        raise CheckpointError(f"{what}: record truncated ({got} of {size} bytes)")
    return buf


def _swap(buf: bytearray, dtype: torch.dtype) -> None:
    """Big-endian to little, in place: each number (each half of a complex one) reversed."""
    k = dtype.itemsize // (2 if dtype.is_complex else 1)
    if k > 1 and buf:
        np.frombuffer(buf, dtype=f"u{k}").byteswap(inplace=True)


def _read_zip(path: Path, inert: Counter, budget: _Budget):
    file_size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkls = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            what = "a TorchScript archive (torch.jit.save)" if any(n.endswith("/constants.pkl") for n in infos) \
                else "a zip file without torch's data.pkl"
            raise CheckpointError(f"{what}, not a checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        order = infos.get(prefix + "byteorder")
        swap = False
        if order is not None:
            if order.file_size > 16:
                raise CheckpointError(f"its byteorder record is {printable(order.file_size)} bytes, not 'little' or 'big'")
            text = bytes(_record(zf, order, order.file_size, file_size, "its byteorder record")).strip()
            if text not in (b"little", b"big"):
                raise CheckpointError(f"its byteorder record says {printable(text)}, not 'little' or 'big'")
            swap = text == b"big"
        storages: dict[str, _Storage] = {}

        def storage_of(pid):
            _, stype, key, location, numel = _pid(pid, 5)
            dtype = _storage_type(stype)
            if type(key) is not str or not _KEY.fullmatch(key) or type(numel) is not int or not 0 <= numel < 2 ** 62:
                raise Refused(f"a storage record name {printable(key, 60)} that is not a plain key")
            if key in storages:
                s = storages[key]
                if s.data.dtype != dtype and dtype != torch.uint8:
                    raise Refused(f"storage {key} read as two dtypes")
                return s
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CheckpointError(f"storage {key}: record missing")
            nbytes = numel * dtype.itemsize
            budget.storage_bytes(nbytes)
            buf = _record(zf, info, nbytes, file_size, f"storage {key}")
            if swap:
                _swap(buf, dtype)
            storages[key] = _Storage(torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype), True)
            return storages[key]

        pkl = infos[pkls[0]]
        data = _record(zf, pkl, pkl.file_size, file_size, "its data.pkl")
        return _unpickle(io.BytesIO(data), storage_of, inert, budget)


# ------------------------------------------------------------------ torch's legacy format
_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _MapReader:
    """A read-only file over an mmap that never allocates more than the file holds."""

    def __init__(self, mm, pos=0):
        self.mm, self.pos = mm, pos

    def read(self, n=-1):
        end = len(self.mm) if n is None or n < 0 else min(len(self.mm), self.pos + n)
        data = self.mm[self.pos:end]
        self.pos = end
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readline(self):
        end = self.mm.find(b"\n", self.pos)
        return self.read((len(self.mm) if end < 0 else end + 1) - self.pos)


def _read_legacy(path: Path, inert: Counter, budget: _Budget):
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _MapReader(mm)
        if mm[257:262] == b"ustar":
            raise CheckpointError("torch's tar format of before 2018, which this reader does not read")
        if mm[:1] not in (pickle.PROTO, pickle.LONG):  # protocol 2+, or 1 (no PROTO opcode; its magic a text LONG)
            raise CheckpointError("not a PyTorch checkpoint (neither torch's zip format nor its legacy format)")

        def no_storage(pid):
            raise Refused("a storage in a legacy file's header")

        head = [_unpickle(r, no_storage, inert, budget) for _ in range(3)]
        if type(head[0]) is not int or head[0] != _MAGIC:
            raise CheckpointError("not a PyTorch checkpoint (neither torch's zip format nor its legacy format)")
        if head[1] != _LEGACY_PROTOCOL:
            raise CheckpointError(f"torch legacy format of protocol {printable(head[1])}, not {_LEGACY_PROTOCOL}")
        if isinstance(head[2], dict) and head[2].get("little_endian") is False:
            raise CheckpointError("written on a big-endian machine in torch's legacy format, which this reader does not read")
        roots: dict[str, _Storage] = {}
        views: dict[str, _Storage] = {}

        def storage_of(pid):
            _, stype, root_key, location, numel, view = _pid(pid, 6)
            dtype = _storage_type(stype)
            if type(root_key) is not str or not _KEY.fullmatch(root_key) or type(numel) is not int or numel < 0:
                raise Refused(f"a storage key {printable(root_key, 60)} that is not a plain key")
            if root_key not in roots:
                budget.storage_bytes(numel * dtype.itemsize)
                roots[root_key] = _Storage(torch.zeros(numel, dtype=dtype), False)
            root = roots[root_key]
            if root.data.dtype != dtype:
                raise Refused(f"storage {root_key} read as two dtypes")
            if view is None:
                return root
            if type(view) is not tuple or len(view) != 3:
                raise Refused("a storage view that is not (key, offset, size)")
            view_key, offset, size = view
            if (type(view_key) is not str or type(offset) is not int or type(size) is not int or offset < 0
                    or size < 0 or offset + size > root.data.numel()):
                raise Refused("a storage view outside its storage")
            if view_key not in views:  # its own storage over the root's elements [offset, offset + size), as
                k = dtype.itemsize     # torch's loader makes it: a tensor's offset and bounds are the view's
                sub = root.data.untyped_storage()[offset * k: (offset + size) * k]
                views[view_key] = _Storage(torch.empty(0, dtype=dtype).set_(sub, 0, (size,), (1,)), False)
            return views[view_key]

        copies: list = []
        obj = _unpickle(r, storage_of, inert, budget, copies)
        keys = _unpickle(r, no_storage, inert, budget)
        if type(keys) is not list or not all(type(k) is str for k in keys) or sorted(keys) != sorted(roots):
            raise CheckpointError("its list of storages does not match its pickle")
        for key in keys:
            dest = roots[key].data
            count, = struct.unpack("<q", r.read(8).ljust(8, b"\0"))
            nbytes = dest.numel() * dest.element_size()
            if count != dest.numel() or r.pos + nbytes > len(mm):
                raise CheckpointError(f"storage {key} is truncated or of the wrong size")
            if nbytes:
                src = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=r.pos)
                dest.view(torch.uint8).numpy()[:] = src
                del src  # the mmap closes only once no array holds it
                r.pos += nbytes
        _fill(copies)
        return obj


# ------------------------------------------------------------------ entry point
def read(path) -> Read:
    """The checkpoint at ``path`` as data (tensors on the CPU). Raises ``CheckpointError`` (one line,
    starting with the path) for anything it cannot or will not read; ``Refused`` when the file asks for
    something no checkpoint needs - in that case nothing in it ran."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'is a directory' if path.is_dir() else 'file not found'}")
    inert: Counter = Counter()
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError("empty file")
        budget = _Budget(size)
        if zipfile.is_zipfile(path):
            return Read(_read_zip(path, inert, budget), inert, "zip")
        return Read(_read_legacy(path, inert, budget), inert, "legacy")
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, struct.error, EOFError, BufferError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {printable(e)})") from None


def inert_summary(inert: Counter, n: int = 3) -> str:
    return ", ".join(printable(k, 80) for k, _ in inert.most_common(n)) + (f" and {len(inert) - n} more" if len(inert) > n else "")


def state_dict_of(obj) -> dict | None:
    """The tensors of a model's state dict as checkpoints of any origin hold them: ``obj['state_dict']``
    (mmdetection, mmcv, many ImageNet files) or ``obj`` itself (torchvision), ``module.`` (DDP) stripped;
    None when ``obj`` is not a dict."""
    if not isinstance(obj, dict):
        return None
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    return {k.removeprefix("module."): v for k, v in sd.items() if type(k) is str and torch.is_tensor(v)}
