"""Files every tool writes the same way: atomically, and under one cache folder.

Why one place: a run killed at any instant must leave either the old file or the new one, never half
of one (a resumed run reads its checkpoint, the dataset check its cached filtered copy), and every tool
that caches must agree on where, so ``DALI_SCP_CACHE`` (the tests' private cache) moves all of it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

CACHE_ENV = "DALI_SCP_CACHE"


def cache_dir() -> Path:
    """``$DALI_SCP_CACHE``, else ``~/.cache/dali_scp``: generated datasets and checked annotations."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dali_scp"))


def atomic_write(path, data: str | bytes | Callable[[BinaryIO], None], durable: bool = False) -> Path:
    """Write ``data`` (text, bytes, or a function that writes into the open binary file) to a temp file
    beside ``path``, then rename it over ``path``: a reader never sees half a file, a crash never
    leaves one. ``durable`` also fsyncs the file and the rename (checkpoints: the previous one must
    survive a power cut while the next is written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
    return path
