"""An emulated device for the raw CUDA kernels: each kernel's exact source, compiled as C++ by the system
compiler with ``emulated_device.h`` (CUDA's vocabulary on CPU threads) and launched with the launch's
real grid and block, beside its NumPy twin; every output byte compared.

Why: CI has no GPU, and the NumPy twins are what CI runs otherwise, so without this the kernels - the
code the GPU path actually executes - would run only when a GPU is lent. The kernels keep to plain CUDA
C (grid-stride loops, ``__shared__``, ``__syncthreads``, atomics, rounding intrinsics), which compiles as
C++ once ``threadIdx``/``blockIdx``, the barrier, shared storage and atomics have CPU definitions.

Inside ``emulate()``, every ``xp.launch`` on NumPy or through the CuPy stand-in (the GPU path's arguments,
``gather_samples`` included) runs the kernel once per launch configuration on copies of its arguments,
then the twin on the originals, and compares every output byte. The copies sit at the originals' address
modulo 64, so the kernel takes the word or byte path it would take on the device, and each ends at the
last byte of its own allocation (a trailing canary is checked after the launch; under AddressSanitizer
the allocation's end is the check). Modes: ``plain`` (threads one after another, in forward or reverse
order; a kernel with ``__syncthreads`` runs its block's threads as fibers switching at the barrier; a
misaligned word access is an error of the launch), ``address`` (AddressSanitizer + UndefinedBehaviorSanitizer)
and ``thread`` (ThreadSanitizer, every thread of a block an OS thread, all at once). The sanitizer modes
need their runtime preloaded into Python: ``sanitizer_env`` (tests/kernel_runs.py runs them in a
subprocess).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_scp import xp as xpm
from dali_scp.files import cache_dir

HEADER = Path(__file__).with_name("emulated_device.h")
MODES = ("plain", "address", "thread")
_FLAGS = {  # -ffp-contract=off: a + b * c rounds twice, as in the twins and as NVRTC with --fmad=false
    "common": ["-std=c++17", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden",
               "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0", "-Wall", "-Wno-unused-function",
               "-Wno-unused-variable"],
    "plain": ["-O2", "-DDALI_EMU_ALIGN=1", "-fsanitize=alignment", "-fsanitize-recover=alignment"],
    "address": ["-O1", "-g", "-DDALI_EMU_ASAN=1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer"],
    "thread": ["-O1", "-g", "-DDALI_EMU_THREADS=1", "-fsanitize=thread"],
}
RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}  # preloaded into Python for those modes
ALIGN = 64       # copies keep the original's address modulo this
CANARY = 64      # bytes after each copy (plain mode), checked after the launch; each copy's differ, so a
                 # byte read past one array and written past another is still seen


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"the emulated device compiles kernels with a C++ compiler: {cxx!r} is not on PATH "
                           "(install g++, or set CXX)")
    return path


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, env=_clean_env()).stdout.split("\n")[0]


def _clean_env() -> dict:
    """The compiler must not run with a sanitizer runtime preloaded (it is meant for Python only)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def sanitizer_env(mode: str) -> dict:
    """Environment for a Python subprocess that loads ``mode``'s kernels: the sanitizer runtime of the
    compiler that built them preloaded (Python itself is not instrumented), reports fatal."""
    env = _clean_env()
    if mode == "plain":
        return env
    lib = subprocess.run([compiler(), f"-print-file-name={RUNTIMES[mode]}"], capture_output=True, text=True,
                         env=env).stdout.strip()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        raise RuntimeError(f"{RUNTIMES[mode]} not found by {compiler()} (the sanitizer runtimes come with gcc: "
                           "libasan8 / libtsan2 on Debian and Ubuntu)")
    env["LD_PRELOAD"] = lib
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=87"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=88:report_signal_unsafe=0"
    return env


def _declarations(k) -> list[str]:
    """The C type of each parameter as the source spells it (``__restrict__`` dropped)."""
    m = xpm._SIGNATURE.search(k.source)
    decls = [d.strip() for d in m.group(2).split(",") if d.strip()]
    return [" ".join(w for w in d.replace("*", " * ").split()[:-1] if w != "__restrict__").replace(" *", "*")
            for d in decls]


def _program(k, mode: str) -> str:
    """Header, the kernel's exact source (its own line numbers in reports), and the entry that unpacks the
    launch's arguments."""
    call = ", ".join(f"*({t}*)a[{i}]" for i, t in enumerate(_declarations(k)))
    fibers = "__syncthreads" in k.source and mode != "thread"
    return (f'#define DALI_EMU_FIBERS {int(fibers)}\n#line 1 "{HEADER}"\n' + HEADER.read_text()
            + f'\n#line 1 "/raw-kernel/{k.name}.cu"\n'
            + k.source + f'\n#line 1 "/raw-kernel/{k.name}.entry"\n'
            + f"static void dali_emu_entry(void* const* a) {{ {k.name}({call}); }}\n")


_LOCK, _RUN_LOCK = threading.Lock(), threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}
_VERSION: dict[str, str] = {}


def _build(k, mode: str) -> Path:
    cxx = compiler()
    if cxx not in _VERSION:
        _VERSION[cxx] = _compiler_version(cxx)
    src = _program(k, mode)
    flags = _FLAGS["common"] + _FLAGS[mode]
    key = hashlib.sha256("\0".join([src, " ".join(flags), _VERSION[cxx]]).encode()).hexdigest()[:20]
    out = cache_dir() / "emulated_device" / f"{k.name}-{mode}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cpp, obj, so = Path(tmp) / f"{k.name}.cpp", Path(tmp) / f"{k.name}.o", Path(tmp) / "k.so"
        cpp.write_text(src)
        # plain: compiled with -fsanitize=alignment but linked without UBSan's runtime (the header holds the
        # one handler it calls); the sanitizer modes link their runtimes
        steps = [[cxx, *flags, "-c", str(cpp), "-o", str(obj)],
                 [cxx, "-shared", *(flags if mode != "plain" else []), str(obj), "-o", str(so)]]
        for cmd in steps:
            p = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
            if p.returncode:
                raise RuntimeError(f"{k.name}: the C++ compiler refused the kernel ({mode} mode):\n"
                                   f"{' '.join(cmd)}\n{p.stderr[-4000:]}")
        os.replace(so, out)
    return out


def load(k, mode: str = "plain") -> ctypes.CDLL:
    """The kernel's shared library for ``mode``: compiled once per source (cached under the project's
    cache folder, keyed by source, flags and compiler), loaded once per process."""
    path = str(_build(k, mode))
    with _LOCK:
        if path not in _LIBS:
            lib = ctypes.CDLL(path)
            lib.dali_emu_launch.restype = ctypes.c_char_p
            lib.dali_emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                            ctypes.c_int]
            _LIBS[path] = lib
        return _LIBS[path]


def prepare(kernels, mode: str = "plain", workers: int = 2) -> None:
    """Compile kernels ahead of their first launch, two at a time."""
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda k: _build(k, mode), kernels))


# --- launch configurations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """How one emulated run reshapes the launch: ``real`` as launched; ``capped`` at most ``cap`` blocks
    per grid dimension, blocks and threads in reverse order; ``odd`` one block of ``odd`` threads. Every
    kernel must give the same bytes under each (grid-stride loops, no dependence on thread order)."""
    name: str
    cap: int = 0
    odd: int = 0
    reverse: bool = False
    poison: int = 0xA5  # the byte __shared__ memory holds at the start of every block

    def shape(self, grid, block):
        if self.odd:
            return (1, 1, 1), (self.odd, block[1], block[2])
        if self.cap:
            return tuple(min(g, self.cap) for g in grid), block
        return grid, block


CONFIGS = (Config("real"), Config("capped", cap=3, reverse=True, poison=0x5A), Config("odd", odd=37, poison=0xFF))
# ThreadSanitizer: an OS thread per thread, blocks one after another, so one block of the real size shows
# every race among a block's threads (and costs a fraction of a 3 x 3 grid's thread wake-ups)
THREAD_CONFIGS = (Config("one-block", cap=1), Config("odd", odd=37))


def _dim3(x) -> tuple:
    x = tuple(int(v) for v in x)
    return x + (1,) * (3 - len(x))


# --- placing copies ----------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None)  # with a sanitizer runtime preloaded, its allocator (AddressSanitizer sees the copies)
_libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


class _Copy:
    """A copy of one array in its own allocation, at the original's address modulo ALIGN, ending at the
    allocation's last byte (plus CANARY checked bytes when ``canary``)."""

    def __init__(self, a: np.ndarray, canary: bool):
        a = np.ascontiguousarray(a)
        self.n, self.tail = a.nbytes, CANARY if canary else 0
        self.off = a.ctypes.data % ALIGN
        p = ctypes.c_void_p()
        if _libc.posix_memalign(ctypes.byref(p), ALIGN, max(self.off + self.n + self.tail, 1)):
            raise MemoryError("posix_memalign")
        self.base = p.value
        self.ptr = self.base + self.off
        self.buf = np.ctypeslib.as_array((ctypes.c_uint8 * (self.n + self.tail)).from_address(self.ptr))
        self.buf[:self.n] = a.reshape(-1).view(np.uint8)
        _Copy.made += 1
        self.canary = ((np.arange(self.tail) * 29 + _Copy.made * 113 + 0x5B) % 256).astype(np.uint8)
        self.buf[self.n:] = self.canary

    made = 0

    def data(self) -> np.ndarray:
        return self.buf[:self.n].copy()

    def overran(self) -> bool:
        return bool(self.tail) and not np.array_equal(self.buf[self.n:], self.canary)

    def free(self):
        _libc.free(self.base)
        self.buf = None


def _host(a) -> np.ndarray:
    return a._a if hasattr(a, "_a") else a  # a stand-in DeviceArray: its NumPy memory stands for the device's


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


class EmulatedDevice:
    """Runs every launch's kernel source beside its twin; counts what ran (``ran``: launches per kernel)."""

    def __init__(self, mode: str = "plain", configs=None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        self.mode = mode
        self.configs = configs or (THREAD_CONFIGS if mode == "thread" else CONFIGS)
        self.ran: Counter = Counter()
        self.runs = 0  # emulated runs (launches x configurations)

    def launch(self, k, grid, block, args, run_twin) -> None:
        host = [[_host(x) for x in a] if p.samples else (_host(a) if p.pointer else a) for p, a in zip(k.params, args)]
        _refuse_aliased_outputs(k, host)
        lib = load(k, self.mode)
        grid, block = _dim3(grid), _dim3(block)
        got = [self._run(k, lib, cfg, *cfg.shape(grid, block), host) for cfg in self.configs]
        run_twin()
        for cfg, (g, b, outs) in zip(self.configs, got):
            for i, out in outs.items():
                want = _bytes(host[i])
                if not np.array_equal(out, want):
                    p = k.params[i]
                    bad = np.flatnonzero(out.view(host[i].dtype) != want.view(host[i].dtype))
                    bad = bad if bad.size else np.flatnonzero(out != want)  # e.g. NaN payloads
                    first = int(bad[0])
                    raise AssertionError(
                        f"{k.name} [{cfg.name}: grid {g} block {b}]: output {p.name} differs from the NumPy twin at "
                        f"{bad.size} elements (first: index {first}: kernel "
                        f"{out.view(host[i].dtype).reshape(-1)[first:first + 1].tolist()} twin "
                        f"{want.view(host[i].dtype).reshape(-1)[first:first + 1].tolist()})")
        self.ran[k.name] += 1

    def _run(self, k, lib, cfg: Config, grid, block, host):
        canary = self.mode == "plain"
        copies, values = [], np.zeros(max(len(host), 1), np.uint64)
        try:
            for i, (p, a) in enumerate(zip(k.params, host)):
                if p.samples:
                    samples = [_Copy(x, canary) for x in a]
                    table = _Copy(np.array([c.ptr for c in samples], np.uint64), canary)
                    copies.append((i, samples + [table]))
                    values[i] = table.ptr
                elif p.pointer:
                    c = _Copy(a, canary)
                    copies.append((i, [c]))
                    values[i] = c.ptr
                else:
                    values[i:i + 1].view(np.uint8)[:a.nbytes] = np.frombuffer(a.tobytes(), np.uint8)
            argv = (ctypes.c_void_p * max(len(host), 1))(*[values.ctypes.data + 8 * i for i in range(len(host))])
            g3, b3 = (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block)
            with _RUN_LOCK:  # a library's launch state is global: one launch at a time
                err = lib.dali_emu_launch(argv, g3, b3, int(cfg.reverse), cfg.poison)
            self.runs += 1
            where = f"{k.name} [{cfg.name}: grid {grid} block {block}]"
            if err:
                raise AssertionError(f"{where}: {err.decode()}")
            outs = {}
            for i, cs in copies:
                p = k.params[i]
                for j, c in enumerate(cs):
                    if c.overran():
                        what = p.name if not p.samples else f"{p.name}[{j}]" if j < len(cs) - 1 else f"{p.name} (table)"
                        raise AssertionError(f"{where}: wrote past the end of {what}")
                if p.const:
                    for j, (c, x) in enumerate(zip(cs, host[i] if p.samples else [host[i]])):
                        if not np.array_equal(c.data(), _bytes(x)):
                            raise AssertionError(f"{where}: wrote its const input {p.name}" + (f"[{j}]" if p.samples else ""))
                elif p.samples:
                    raise ValueError(f"{where}: a sample table must be const")
                else:
                    outs[i] = cs[0].data()
            return grid, block, outs
        finally:
            for _, cs in copies:
                for c in cs:
                    c.free()


def _refuse_aliased_outputs(k, host) -> None:
    """Each argument is copied on its own, so an output that shares memory with another argument would
    not be seen through it: refused (no kernel of the project does this)."""
    flat = [(p.name, x) for p, a in zip(k.params, host) if p.pointer for x in (a if p.samples else [a])]
    for p, a in zip(k.params, host):
        if p.pointer and not p.const and not p.samples:
            for name, x in flat:
                if name != p.name and np.shares_memory(a, x):
                    raise ValueError(f"{k.name}: output {p.name} overlaps argument {name}")


@contextmanager
def emulate(mode: str = "plain", configs=None):
    """Inside: every raw-kernel launch on NumPy or the stand-in also runs the kernel's source on the
    emulated device and compares; yields the ``EmulatedDevice`` (``ran``: launches per kernel)."""
    dev = EmulatedDevice(mode, configs)
    prepare(list(xpm.KERNELS.values()), mode)
    prev, xpm._EMULATOR = xpm._EMULATOR, dev
    try:
        yield dev
    finally:
        xpm._EMULATOR = prev
