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


def require_cupy():
    try:
        import cupy
    except ImportError as e:
        raise MissingDependency(f"the GPU path needs CuPy, which is not importable ({e}); {INSTALL_HINT}") from e
    return cupy


def gpu_available() -> bool:
    """True when a CUDA device is usable by CuPy (the GPU operators) - not merely installed."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
