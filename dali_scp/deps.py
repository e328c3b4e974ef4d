"""Optional heavy dependencies, imported late with a message that says what to install.

Why: DALI and CuPy come in one wheel per CUDA major version (and two DALI wheels must never be
installed side by side), so an ImportError deep in a stack is the most common first experience of
a wrong install. These helpers turn it into one sentence with the command that fixes it.
"""
from __future__ import annotations

INSTALL_HINT = (
    "install the project with the extra matching your CUDA: `pip install -e .[cuda12]` "
    "(nvidia-dali-cuda120 + cupy-cuda12x), `pip install -e .[cuda13]` (nvidia-dali-cuda130 + "
    "cupy-cuda13x) or, on a machine without a GPU, `pip install -e .[cpu]` (DALI only). "
    "Never install two nvidia-dali-* wheels side by side."
)


class MissingDependency(ImportError):
    pass


def require_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        raise MissingDependency(f"NVIDIA DALI is not importable ({e}); {INSTALL_HINT}") from e
    return dali


# CuPy 14.1: sorts that do not synchronise the stream (13.x's Thrust sort blocks the host on every call)
# and 64-bit integer atomics.
MIN_CUPY = (14, 1)


def require_cupy():
    try:
        import cupy
    except ImportError as e:
        raise MissingDependency(f"the GPU path needs CuPy, which is not importable ({e}); {INSTALL_HINT}") from e
    version = tuple(int(p) for p in cupy.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_CUPY:
        raise MissingDependency(f"the GPU path needs CuPy >= {MIN_CUPY[0]}.{MIN_CUPY[1]} (found {cupy.__version__}): "
                                f"upgrade it with `pip install -U cupy-cuda12x` or `cupy-cuda13x`")
    return cupy


def gpu_problem() -> str | None:
    """Why the GPU path cannot run here (None when it can): CuPy, its version, a device, DALI for CUDA."""
    try:
        cupy = require_cupy()
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as e:  # noqa: BLE001 - any failure means 'not usable', and the message says which
        return str(e).splitlines()[0]
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        if GetCUDADeviceCount() < 1:
            return "DALI sees no CUDA device (is the nvidia-dali wheel built for this CUDA?)"
    except Exception as e:  # noqa: BLE001
        return f"DALI cannot use CUDA here: {str(e).splitlines()[0]}"
    return None


def gpu_available() -> bool:
    """True when the GPU path can run: CuPy >= 14.1 with a CUDA device, and DALI for CUDA."""
    return gpu_problem() is None
