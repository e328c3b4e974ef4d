"""Checkpoints that survive a kill at any instant: written to a temp file, fsynced, then renamed.

Why: a 90k-iteration run killed while saving must still find its previous checkpoint intact, and a
resumed run must continue bit-for-bit where it stopped (model, optimiser, scheduler, AMP scaler, RNG
states, DALI data-stream state, iteration).

Checkpoints are read with ``weights_only=True``: a checkpoint is data (tensors, numbers, strings, lists,
dicts), so everything here is stored in those forms (the NumPy RNG state as a tensor and numbers, the
data stream's as numbers and DALI's string), and a ``.pth`` whose pickle asks for anything else (``os.system``, a class from
some module) is refused before any of it runs."""
from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from dali_scp.files import atomic_write

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^ckpt_(\d{8})\.pth$")
BEST = "best.pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that this code did not write (or wrote for another model):
    bad input the user can fix by naming another file, told apart from other failures by its type."""


def checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if PATTERN.match(p.name))


def latest(run_dir: Path) -> Path | None:
    c = checkpoints(run_dir)
    return c[-1] if c else None


def save(run_dir: Path, iteration: int, state: dict, keep: int) -> Path:
    path = Path(run_dir) / f"ckpt_{iteration:08d}.pth"
    atomic_write(path, lambda f: torch.save(state, f), durable=True)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    log.info("saved checkpoint %s", path)
    return path


def save_best(run_dir: Path, state: dict) -> Path:
    """``best.pth``: the weights with the best validation AP so far (``trainer.evaluate --checkpoint``
    reads it). Its name is not a ``ckpt_*.pth``: ``latest`` and --resume never take it."""
    path = Path(run_dir) / BEST
    atomic_write(path, lambda f: torch.save(state, f), durable=True)
    return path


# What checkpoints of the previous format hold besides plain data: NumPy's RNG state as pickled NumPy
# objects (a uint32 ndarray, the MT19937 key). These only build that array from the pickle's own bytes
# (``_reconstruct`` an empty array of an allowed type - only ndarray -, ``dtype`` a data type from its
# name, the uint32 dtype's and the array's state from raw data); none imports or calls anything else,
# so allowing them, for this load only, keeps a run started before the change resumable without
# opening the door weights_only closes. (Name under NumPy 1.x: numpy.core.multiarray._reconstruct.)
_reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
_LEGACY_NUMPY = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
                 (_reconstruct, "numpy.core.multiarray._reconstruct")]


def load(path: Path) -> dict:
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(e))
        what = (what.group(1) or what.group(2)) if what else "objects other than data"
        raise CheckpointError(
            f"{path}: refused: its pickle asks for {what}, "
            "which no checkpoint holds (read with weights_only=True, so nothing in it ran); load only "
            "checkpoints written by trainer.run") from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint ({first})") from e


def rng_state() -> dict:
    """This process's random generators (torch, CUDA, NumPy, Python), for an exact resume, as data
    ``weights_only`` loads: NumPy's MT19937 state as a tensor of its key and plain numbers."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    s = dict(torch=torch.get_rng_state(), python=random.getstate(),
             numpy=dict(kind=kind, key=torch.from_numpy(key.astype(np.int64)), pos=int(pos),
                        has_gauss=int(has_gauss), cached_gaussian=float(gauss)))
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # else: the tuple of a checkpoint of the previous format
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
