"""Checkpoints that survive a kill at any instant: written to a temp file, fsynced, then renamed.

Why: a 90k-iteration run killed while saving must still find its previous checkpoint intact, and a
resumed run must continue bit-for-bit where it stopped (model, optimiser, scheduler, AMP scaler, RNG
states, DALI data-stream state, iteration)."""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from dali_scp.files import atomic_write

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^ckpt_(\d{8})\.pth$")


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


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from e


def rng_state() -> dict:
    """This process's random generators (torch, CUDA, NumPy, Python), for an exact resume."""
    s = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
