"""Checkpoint files read as data: tensors, plain Python values, NumPy values rebuilt from their bytes, and
inert placeholders for everything else. Nothing named in the file is ever imported or called.

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
  bytes). Names from modules that exist to run code (``os``, ``subprocess``, ``builtins.eval``, ``importlib``,
  ...: ``_REFUSED``) refuse the file. Every other name becomes an ``InertGlobal`` - a string.
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
attribute lookup on a real object, or to a method of an object the file chose. Sizes are checked against
the file before anything is allocated. Every refusal is one plain line (names from the file are shown
escaped, so a crafted name cannot carry a newline or a terminal escape code).
"""
from __future__ import annotations

import _compat_pickle
import io
import mmap
import pickle
import re
import struct
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def _show(s: Any, limit: int = 120) -> str:
    """A name from the file, safe to print on one line (control characters and escapes shown escaped)."""
    s = ascii(str(s))[1:-1]
    return s if len(s) <= limit else s[:limit] + "..."


# ------------------------------------------------------------------ stand-ins
class _StandIn:
    """A function of this module that a pickle may call in place of the name it gives. Only ``find_class``
    makes these; the unpickler calls nothing else."""
    __slots__ = ("name", "fn", "marker")

    def __init__(self, name: str, fn=None, marker=None):
        self.name, self.fn, self.marker = name, fn, marker

    def __repr__(self):
        return f"<stand-in for {self.name}>"


def _ints(v, what: str, nonneg: bool = True) -> tuple:
    if not isinstance(v, (tuple, list)) or not all(type(x) is int and (x >= 0 or not nonneg) for x in v):
        raise Refused(f"{what} must be a tuple of non-negative integers, got {_show(type(v).__name__)}")
    return tuple(v)


class _Storage:
    """A storage read from the file: a flat tensor of its dtype (tensors are views of it)."""
    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


def _rebuild_tensor(u, storage, offset, size, stride, *rest, dtype=None):
    if not isinstance(storage, _Storage):
        raise Refused(f"a tensor's storage is a {_show(type(storage).__name__)}, not a storage record")
    if type(offset) is not int or offset < 0:
        raise Refused("a tensor's storage offset is not a non-negative integer")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(size) != len(stride):
        raise Refused("a tensor's size and stride differ in length")
    data = storage.data
    if dtype is not None and dtype != data.dtype:
        if not isinstance(dtype, torch.dtype) or data.dtype != torch.uint8 or data.numel() % dtype.itemsize:
            raise Refused(f"a tensor of {_show(dtype)} over a storage of {data.dtype}")
        data = data.view(dtype)
    try:
        return torch.as_strided(data, size, stride, offset)  # torch checks the view stays inside the storage
    except RuntimeError as e:
        raise Refused(f"a tensor reaches outside its storage ({_show(str(e).splitlines()[0])})") from None


def _tensor_v2(u, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _rebuild_tensor(u, storage, offset, size, stride)  # hooks and metadata are not kept


def _tensor_v3(u, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild_tensor(u, storage, offset, size, stride, dtype=dtype)


def _parameter(u, data, requires_grad=True, hooks=None, state=None):
    if not torch.is_tensor(data):
        raise Refused("a parameter's data is not a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad) and data.is_floating_point())


def _from_type_v2(u, func, new_type, args, state):
    if not isinstance(func, _StandIn) or type(args) is not tuple:
        raise Refused("a tensor subclass rebuilt by something other than torch's tensor functions")
    return u.call(func, args)  # the subclass and its Python attributes are not kept: the tensor is


def _from_numpy(u, data, dtype, device, requires_grad):
    if not isinstance(data, np.ndarray) or data.dtype.hasobject or not isinstance(dtype, torch.dtype):
        raise Refused("a tensor rebuilt from something other than a numeric NumPy array")
    return torch.from_numpy(np.array(data)).to(dtype)


def _from_cpu_tensor(u, data, dtype, device, requires_grad):
    if not torch.is_tensor(data) or not isinstance(dtype, torch.dtype):
        raise Refused("a tensor rebuilt from something other than a tensor")
    return data.to(dtype)


def _torch_size(u, dims=()):
    return torch.Size(_ints(dims, "torch.Size"))


def _torch_device(u, kind, index=None):
    if type(kind) is not str or (index is not None and type(index) is not int):
        raise Refused("torch.device of other than a name and an index")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _codecs_encode(u, text, encoding="utf-8"):
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode with {_show(encoding)} (pickles encode bytes as latin1)")
    return text.encode("latin-1")


def _plain(u, kind, *args):
    """builtins set, frozenset, bytes, bytearray, complex, slice, range - from plain values only."""
    if not all(isinstance(a, (list, tuple, set, frozenset, str, bytes, int, float, type(None))) for a in args):
        raise Refused(f"builtins.{kind.__name__} of a {_show(type(args[0]).__name__)}")
    if kind in (bytes, bytearray) and args and not isinstance(args[0], (bytes, str, list)):
        raise Refused(f"builtins.{kind.__name__} of a number")  # bytes(10**12) would allocate it
    if kind is bytearray and len(args) == 2 and args[1] not in ("latin1", "latin-1", "utf-8"):
        raise Refused(f"bytearray with encoding {_show(args[1])}")
    return kind(*args)


def _getattr(u, obj, name):
    """Only for inert objects (mmengine pickles bound methods as getattr(HistoryBuffer, 'min')): another
    inert name. An attribute of a real object would be the first step of every pickle sandbox escape."""
    if type(name) is not str or not isinstance(obj, (InertGlobal, Inert)):
        raise Refused(f"its pickle asks for attribute {_show(name)} of a {_show(type(obj).__name__)} "
                      "(getattr on anything but an unknown class)")
    return u.inert_global(f"{obj.name if isinstance(obj, InertGlobal) else obj.of}.{name}")


def _ordered_dict(u, items=()):
    if not isinstance(items, (list, tuple, dict)):
        raise Refused("collections.OrderedDict of other than pairs")
    return OrderedDict(items)


def _counter(u, items=()):
    if not isinstance(items, (list, tuple, dict)):
        raise Refused("collections.Counter of other than a dict")
    return Counter(dict(items))


def _defaultdict(u, factory=None, items=()):
    return dict(items)  # the factory is a class the reader does not import; the items are kept


def _reconstructor(u, cls, base, state):
    """copyreg._reconstructor (protocols 0 and 1): an object of ``cls`` built on ``base``."""
    return u.new(cls, () if state is None else (state,), {})


def _newobj(u, cls, *args):
    return u.new(cls, args, {})


def _newobj_ex(u, cls, args, kwargs):
    return u.new(cls, tuple(args), dict(kwargs))


# NumPy: a dtype from its name and byte order, an array or a scalar from its bytes
_NUMPY_KINDS = re.compile(r"([biufcSUVO])(\d+)")


class _Pending:
    """A NumPy dtype or array between its constructor call and its BUILD (the state with its bytes)."""

    def finish(self, state):
        raise NotImplementedError


class _PendingDtype(_Pending):
    def __init__(self, name):
        if type(name) is not str or not _NUMPY_KINDS.fullmatch(name):
            raise Refused(f"NumPy dtype {_show(name)} (plain numeric, string and object dtypes only)")
        self.name = name

    def finish(self, state=None):
        kind, size = _NUMPY_KINDS.fullmatch(self.name).groups()
        order = "|"
        if state is not None:
            if (type(state) is not tuple or len(state) < 8 or state[0] not in (3, 4)
                    or state[1] not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5])):
                raise Refused(f"NumPy dtype {_show(self.name)} with fields, a subarray or an unknown state "
                              "(structured dtypes are not read)")
            order = state[1]
            if kind in "SUV" and type(state[5]) is int and state[5] > 0:
                size = str(state[5] // (4 if kind == "U" else 1))
        d = np.dtype(kind + size if kind != "O" else "O")
        return d.newbyteorder(order) if order in "<>" else d


def _dtype_of(d) -> np.dtype:
    if isinstance(d, _PendingDtype):
        return d.finish()
    if not isinstance(d, np.dtype):
        raise Refused(f"a NumPy value of dtype {_show(type(d).__name__)}")
    return d


class _PendingArray(_Pending):
    def finish(self, state):
        if type(state) is not tuple or len(state) != 5 or state[0] != 1:
            raise Refused("a NumPy array whose state is not (1, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, data = state
        return _array(_ints(shape, "a NumPy array's shape"), _dtype_of(dtype), "F" if fortran else "C", data)


def _array(shape: tuple, dtype: np.dtype, order: str, data) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject:
        if type(data) is not list or len(data) != n:
            raise Refused(f"a NumPy object array of shape {shape} whose items are not a list of {n}")
        out = np.empty(n, dtype=object)
        for i, x in enumerate(data):
            out[i] = x
        return out.reshape(shape, order=order)
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if type(data) is not bytes or len(data) != n * dtype.itemsize:
        raise Refused(f"a NumPy array of shape {shape} and dtype {dtype} whose data is not {n * dtype.itemsize} bytes")
    out = np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
    return out.astype(dtype.newbyteorder("="), order="K") if not dtype.isnative else out.copy(order="K")  # as NumPy unpickles


def _np_reconstruct(u, subtype, shape, typecode):
    if not (isinstance(subtype, _StandIn) and subtype.name == "numpy.ndarray"):
        raise Refused(f"a NumPy array of subtype {_show(subtype)}")
    return _PendingArray()


def _np_scalar(u, dtype, data=None):
    dtype = _dtype_of(dtype)
    if dtype.hasobject:
        return data
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise Refused(f"a NumPy {dtype} scalar whose data is not {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _np_dtype(u, name, align=False, copy=False):
    return _PendingDtype(name)


def _np_frombuffer(u, buf, dtype, shape, order):
    if order not in ("C", "F"):
        raise Refused("a NumPy array of unknown order")
    return _array(_ints(shape, "a NumPy array's shape"), _dtype_of(dtype), order, buf)


def _torch_dtypes() -> dict:
    return {f"torch.{n}": getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}


_STORAGE_DTYPES = {name: d for d, name in torch.storage._dtype_to_storage_type_map().items()
                   if not name.startswith("Q")} | {"UntypedStorage": torch.uint8}

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
                                                        lambda u, *a, _k=_kind: _plain(u, _k, *a))
for _n in ("numpy.ndarray", "builtins.object"):  # only ever an argument of the reconstructors above
    _STAND_INS[_n] = _StandIn(_n)
_DATA_GLOBALS = _torch_dtypes() | {"torch.strided": torch.strided}

# Modules that exist to run code, reach the system or load more pickles: a name from one of these refuses
# the file with a message naming it (an inert placeholder would be safe too; a checkpoint never has a
# reason to name them, so the file is treated as hostile). Every builtin not stood in for above is refused.
_REFUSED = {"os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "shutil", "socket", "pty", "ctypes",
            "pickle", "_pickle", "cPickle", "marshal", "types", "code", "codeop", "operator", "functools",
            "webbrowser", "multiprocessing", "asyncio", "pdb", "timeit", "tempfile", "io", "_io", "signal",
            "threading", "_thread", "pathlib", "platform", "commands", "popen2", "builtins", "__builtin__",
            "_codecs", "codecs", "inspect", "gc", "posixpath", "ntpath", "glob", "dill", "cloudpickle",
            "joblib", "_posixsubprocess", "zipimport", "site", "sysconfig", "distutils", "setuptools", "pip"}


# ------------------------------------------------------------------ the unpickler
class _Unpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storage_of, where: str):
        super().__init__(file, encoding="utf-8")
        self.storage_of, self.where = storage_of, where
        self.inert: Counter = Counter()
        self.pending_memo: dict[int, list] = {}

    # names -----------------------------------------------------------------
    def find_class(self, module, name):
        if type(module) is not str or type(name) is not str:
            raise Refused("a global whose name is not a string")
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
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StandIn(full, marker=_STORAGE_DTYPES[name])
        if module.split(".")[0] in _REFUSED:
            raise Refused(f"refused: its pickle calls {_show(full)}, which no checkpoint needs (nothing in the "
                          "file ran)")
        return self.inert_global(full)

    def inert_global(self, name: str) -> InertGlobal:
        self.inert[name] += 1
        return InertGlobal(name)

    # calls -----------------------------------------------------------------
    def call(self, func, args, kwargs=None):
        if type(args) is not tuple:
            raise Refused("a call whose arguments are not a tuple")
        if isinstance(func, InertGlobal):
            return Inert(func.name, args, kwargs)
        if isinstance(func, _StandIn) and func.fn is not None:
            try:
                return func.fn(self, *args, **(kwargs or {}))
            except TypeError as e:  # wrong number of arguments for the stand-in's signature
                raise Refused(f"{func.name} called with unexpected arguments ({_show(e)})") from None
        raise Refused(f"its pickle calls a {_show(type(func).__name__)} ({_show(repr(func))[:60]}), "
                      "which is not a function this reader knows")

    def new(self, cls, args, kwargs):
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
        if type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise Refused("NEWOBJ_EX with keyword arguments that are not a dict of names")
        self.append(self.new(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self.append(self.call(klass, tuple(args)))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Inert):
            inst.state = state
        elif isinstance(inst, _Pending):
            value = inst.finish(state)
            self.stack[-1] = value
            for i in self.pending_memo.pop(id(inst), ()):
                self.memo[i] = value
        elif type(inst) is OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            inst._metadata = state.get("_metadata")  # what torch's state_dict() attaches (module versions)
        else:
            raise Refused(f"its pickle sets the state of a {_show(type(inst).__name__)} (BUILD), which no "
                          "checkpoint needs")
    dispatch[pickle.BUILD[0]] = load_build

    # containers ------------------------------------------------------------
    def _target(self, kinds, what):
        obj = self.stack[-1]
        if type(obj) not in kinds and not isinstance(obj, Inert):
            raise Refused(f"its pickle {what} a {_show(type(obj).__name__)}")
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

    def _set(self, pairs):
        obj = self._target((dict, OrderedDict, Counter), "sets items of")
        target = obj.dictitems if isinstance(obj, Inert) else obj
        try:
            for k, v in pairs:
                target[k] = v
        except TypeError as e:  # an unhashable key
            raise Refused(f"a dict key that cannot be one ({_show(e)})") from None

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set([(key, value)])
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._set(zip(items[::2], items[1::2]))
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        obj = self._target((set,), "adds to")
        try:
            (obj.items.extend if isinstance(obj, Inert) else obj.update)(items)
        except TypeError as e:
            raise Refused(f"a set item that cannot be one ({_show(e)})") from None
    dispatch[pickle.ADDITEMS[0]] = load_additems

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


def _unpickle(file, storage_of, where: str, inert: Counter):
    u = _Unpickler(file, storage_of, where)
    try:
        obj = u.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise Refused("its pickle nests too deeply") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            struct.error, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise CheckpointError(f"its pickle is damaged or not one torch writes ({type(e).__name__}: "
                              f"{_show(str(e).splitlines()[0] if str(e) else '')})") from None
    inert.update(u.inert)
    return obj


def _storage_type(v):
    if not (isinstance(v, _StandIn) and v.marker is not None):
        raise Refused(f"a storage of type {_show(v)}, not one of torch's storage classes")
    return v.marker


def _pid(pid, n: int) -> tuple:
    if type(pid) is not tuple or len(pid) != n or pid[0] not in ("storage", b"storage"):
        kind = pid[0] if type(pid) is tuple and pid else pid
        raise Refused(f"a persistent id {_show(kind)!s:.60} that is not a storage (e.g. a pickled module's source)")
    return pid


# ------------------------------------------------------------------ torch's zip format
_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")


def _read_zip(path: Path, inert: Counter):
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkls = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            what = "a TorchScript archive (torch.jit.save)" if any(n.endswith("/constants.pkl") for n in infos) \
                else "a zip file without torch's data.pkl"
            raise CheckpointError(f"{what}, not a checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        if infos[pkls[0]].compress_type != zipfile.ZIP_STORED:  # a zip bomb in place of torch's stored record
            raise CheckpointError("its data.pkl is compressed, which torch never writes")
        order = infos.get(prefix + "byteorder")
        swap = order is not None and zf.read(order).strip() == b"big"
        storages: dict[str, _Storage] = {}

        def storage_of(pid):
            _, stype, key, location, numel = _pid(pid, 5)
            dtype = _storage_type(stype)
            if type(key) is not str or not _KEY.fullmatch(key) or type(numel) is not int or numel < 0:
                raise Refused(f"a storage record name {_show(key)!s:.60} that is not a plain key")
            if key in storages:
                s = storages[key]
                if s.data.dtype != dtype and dtype != torch.uint8:
                    raise Refused(f"storage {key} read as two dtypes")
                return s
            info = infos.get(f"{prefix}data/{key}")
            nbytes = numel * dtype.itemsize
            if info is not None and info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"storage {key} is compressed, which torch never writes")
            if info is None or info.file_size != nbytes:
                raise CheckpointError(f"storage {key}: record {'missing' if info is None else f'of {info.file_size} bytes'}"
                                      f", its tensor needs {nbytes}")
            buf = bytearray(nbytes)
            with zf.open(info) as f:
                f.readinto(buf)
            if swap and dtype.itemsize > 1:
                buf = bytearray(np.frombuffer(buf, np.uint8).reshape(-1, dtype.itemsize)[:, ::-1].tobytes())
            storages[key] = _Storage(torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype))
            return storages[key]

        return _unpickle(io.BytesIO(zf.read(infos[pkls[0]])), storage_of, str(path), inert)


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


def _read_legacy(path: Path, inert: Counter):
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _MapReader(mm)
        if mm[257:262] == b"ustar":
            raise CheckpointError("torch's tar format of before 2018, which this reader does not read")
        if mm[:1] != pickle.PROTO:
            raise CheckpointError("not a PyTorch checkpoint (neither torch's zip format nor its legacy format)")

        def no_storage(pid):
            raise Refused("a storage in a legacy file's header")

        head = [_unpickle(r, no_storage, str(path), inert) for _ in range(3)]
        if head[0] != _MAGIC:
            raise CheckpointError("not a PyTorch checkpoint (neither torch's zip format nor its legacy format)")
        if head[1] != _LEGACY_PROTOCOL:
            raise CheckpointError(f"torch legacy format of protocol {_show(head[1])}, not {_LEGACY_PROTOCOL}")
        if isinstance(head[2], dict) and head[2].get("little_endian") is False:
            raise CheckpointError("written on a big-endian machine in torch's legacy format, which this reader does not read")
        roots: dict[str, _Storage] = {}
        views: dict[str, _Storage] = {}
        budget = [len(mm)]

        def storage_of(pid):
            _, stype, root_key, location, numel, view = _pid(pid, 6)
            dtype = _storage_type(stype)
            if type(root_key) is not str or not _KEY.fullmatch(root_key) or type(numel) is not int or numel < 0:
                raise Refused(f"a storage key {_show(root_key)!s:.60} that is not a plain key")
            if root_key not in roots:
                budget[0] -= numel * dtype.itemsize
                if budget[0] < 0:
                    raise CheckpointError("its storages are larger than the file")
                roots[root_key] = _Storage(torch.zeros(numel, dtype=dtype))
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
            return views.setdefault(view_key, _Storage(root.data[offset: offset + size]))

        obj = _unpickle(r, storage_of, str(path), inert)
        keys = _unpickle(r, no_storage, str(path), inert)
        if type(keys) is not list or sorted(keys, key=str) != sorted(roots):
            raise CheckpointError("its list of storages does not match its pickle")
        for key in keys:
            dest = roots[key].data
            count, = struct.unpack("<q", r.read(8).ljust(8, b"\0"))
            nbytes = dest.numel() * dest.element_size()
            if count != dest.numel() or r.pos + nbytes > len(mm):
                raise CheckpointError(f"storage {key} is truncated or of the wrong size")
            if nbytes:
                dest.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(r.read(nbytes)), dtype=torch.uint8))
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
        if path.stat().st_size == 0:
            raise CheckpointError("empty file")
        if zipfile.is_zipfile(path):
            return Read(_read_zip(path, inert), inert, "zip")
        return Read(_read_legacy(path, inert), inert, "legacy")
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, struct.error, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: "
                              f"{_show(str(e).splitlines()[0] if str(e) else '')})") from None


def inert_summary(inert: Counter, n: int = 3) -> str:
    return ", ".join(_show(k, 80) for k, _ in inert.most_common(n)) + (f" and {len(inert) - n} more" if len(inert) > n else "")
