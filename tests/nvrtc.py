"""NVRTC, NVIDIA's runtime CUDA compiler (the one CuPy compiles raw kernels with), called through ctypes.

Why in CI: compiling needs no GPU, so every raw kernel's CUDA source is compiled here with the options
CuPy would add, and a kernel that would not compile, or that takes other parameters than its Python
side declares, fails on a machine without a GPU. The library comes from the ``nvidia-cuda-nvrtc`` wheel
(the ``test`` extra; the CUDA build of torch depends on it as well).
"""
from __future__ import annotations

import ctypes
import importlib.metadata as md
import os
import re
from typing import NamedTuple

WHEELS = ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12")


class Compiled(NamedTuple):
    ok: bool
    log: str
    ptx: str


def _find() -> tuple[str, str] | None:
    for wheel in WHEELS:
        try:
            files = md.distribution(wheel).files or []
        except md.PackageNotFoundError:
            continue
        libs = [str(f.locate()) for f in files if re.search(r"/libnvrtc\.so\.\d+$", str(f))]
        builtins = [str(f.locate()) for f in files if re.search(r"/libnvrtc-builtins\.so\.[\d.]+$", str(f))]
        if libs and builtins:
            return libs[0], builtins[0]
    return None


_LIB = None


def load():
    """The NVRTC library, or a RuntimeError naming the wheel to install."""
    global _LIB
    if _LIB is None:
        found = _find()
        if found is None:
            raise RuntimeError(f"NVRTC not found: install one of {WHEELS} (`pip install -e .[test]`)")
        lib, builtins = found
        # NVRTC dlopens its builtins by soname: load them first, globally, from the same wheel
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        _LIB = ctypes.CDLL(lib)
    return _LIB


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    load().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_ptx(source: str, name: str, options: tuple) -> Compiled:
    lib = load()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None):
        raise RuntimeError(f"nvrtcCreateProgram failed for {name}")
    try:
        opts = [o.encode() for o in options]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        ptx = b""
        if rc == 0:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
            buf = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetPTX(prog, buf)
            ptx = buf.value
        return Compiled(rc == 0, log.value.decode(errors="replace").strip(), ptx.decode(errors="replace"))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def entry_params(ptx: str, name: str) -> list[str] | None:
    """The PTX types of the parameters of ``.entry name`` (None when there is no such entry)."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        return None
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


if __name__ == "__main__":  # pragma: no cover - `python tests/nvrtc.py [compute_XX]`: compile every kernel
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dali_scp import copy_paste, raster  # noqa: F401 - registers their kernels
    from dali_scp.xp import COMPILE_OPTIONS, CUPY_ADDS, KERNELS
    print("NVRTC %d.%d" % version())
    bad = 0
    for k in KERNELS.values():
        c = compile_ptx(k.source, k.name, CUPY_ADDS + COMPILE_OPTIONS + ("-arch=" + (sys.argv[1:] or ["compute_90"])[0],))
        bad += not c.ok
        print(f"{k.name:32s} {'ok' if c.ok else 'FAILED'} {c.log}")
    sys.exit(1 if bad else 0)
