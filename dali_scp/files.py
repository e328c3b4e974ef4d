"""Files every tool writes the same way: atomically, and under one cache folder.

Why one place: a run killed at any instant must leave either the old file or the new one, never half
of one (a resumed run reads its checkpoint, the dataset check its cached filtered copy), and every tool
that caches must agree on where, so ``DALI_SCP_CACHE`` (the tests' private cache) moves all of it.
"""
from __future__ import annotations

import json
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


def write_json(path, doc: dict, chunk: int = 20000) -> Path:
    """``json.dumps(doc)``'s exact text, written atomically with the long top-level lists encoded
    ``chunk`` items at a time: a COCO-sized file (~500 MB) never exists as one string (twice: text and
    bytes), and the C encoder keeps its speed (``json.dump`` would switch to the pure-Python one)."""
    def writer(f):
        for i, (k, v) in enumerate(doc.items()):
            f.write(((", " if i else "{") + json.dumps(k) + ": ").encode())
            if not isinstance(v, list) or len(v) <= chunk:
                f.write(json.dumps(v).encode())
                continue
            f.write(b"[")
            for j in range(0, len(v), chunk):
                f.write(((", " if j else "") + json.dumps(v[j:j + chunk])[1:-1]).encode())
            f.write(b"]")
        f.write(b"}" if doc else b"{}")
    return atomic_write(path, writer)
