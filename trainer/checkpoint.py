"""Checkpoints that survive a kill at any instant: written to a temp file, fsynced, then renamed.

Why: a 90k-iteration run killed while saving must still find its previous checkpoint intact, and a
resumed run must continue bit-for-bit where it stopped (model, optimiser, scheduler, AMP scaler, RNG
states, DALI data-stream state, iteration).

Checkpoints are read by ``trainer.checkpoint_reader``: as data (tensors, numbers, strings, lists,
dicts), never importing or calling anything the file names, so a ``.pth`` whose pickle asks for
``os.system`` or a class from some module is refused (or, for classes, kept inert) before any of it runs.
Everything here is stored in those forms (the NumPy RNG state as a tensor and numbers, the data
stream's as numbers and DALI's string)."""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dali_scp.files import atomic_write
from dali_scp.presets import Recipe
from trainer.checkpoint_reader import CheckpointError, inert_summary, printable, read

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^ckpt_(\d{8})\.pth$")
BEST = "best.pth"


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


def load(path: Path) -> dict:
    """A checkpoint written by this project (``trainer.run``, ``trainer.import_weights``): plain data only.
    A file that holds objects of other classes (an mmdetection ``iter_N.pth`` with its message hub, ...) is
    refused in one line pointing at ``trainer.import_weights``; its objects were kept inert, never run."""
    got = read(path)
    if got.inert:
        raise CheckpointError(
            f"{path}: not a dali-scp checkpoint: it holds objects of classes no dali-scp checkpoint has "
            f"({inert_summary(got.inert)}; read as inert data, nothing ran); convert an mmdetection or "
            "torchvision checkpoint with python -m trainer.import_weights")
    return got.obj


MAX_CLASSES = 100_000  # with background; LVIS has 1204


class Trained(NamedTuple):
    state: dict       # the whole checkpoint
    recipe: Recipe
    num_classes: int  # background included
    model: dict       # its model's tensors, by name


def load_trained(path: Path, num_classes: int | None = None) -> Trained:
    """A checkpoint with a model this project trained or imported (``trainer.evaluate``, ``export_weights``):
    its recipe read and its class count range-checked, as each becomes a model's size further on."""
    state = load(Path(path))
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise CheckpointError(f"{path}: not a dali-scp checkpoint (expected keys 'model' and 'recipe'); convert "
                              "an mmdetection or torchvision checkpoint with python -m trainer.import_weights")
    try:
        recipe = Recipe.from_dict(state["recipe"])
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: its recipe is not one this version reads ({printable(e, 200)})") from None
    n, tensors = state.get("num_classes", num_classes), state["model"]
    if type(n) is not int or not 2 <= n <= MAX_CLASSES or not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: its class count {printable(n)} is not an integer in [2, {MAX_CLASSES}] "
                              "(background included), or its model is not a dict of tensors")
    return Trained(state, recipe, n, tensors)


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
        if not torch.is_tensor(n["key"]) or n["key"].shape != (624,):  # MT19937's key
            raise CheckpointError("NumPy's RNG key in the checkpoint is not 624 numbers")
        n = (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # else: the tuple of a checkpoint of the previous format
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def check_optimizer_state(state: dict, params: list, path) -> None:
    """Before ``optimizer.load_state_dict`` (which converts every state tensor to its parameter's dtype and
    walks any container it finds): each parameter's state is a flat dict of numbers and tensors no larger
    than the parameter, so a crafted file cannot make that conversion allocate more than the model."""
    refused = CheckpointError(f"{path}: its optimizer state is not one this trainer writes (per parameter: "
                              "numbers and tensors no larger than the parameter)")
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        raise refused
    ids = [i for g in state["param_groups"] if isinstance(g, dict) and isinstance(g.get("params"), list)
           for i in g["params"]]
    sizes = dict(zip(ids, (p.numel() for p in params)))
    for i, entry in state["state"].items():
        if not isinstance(entry, dict) or not all(
                v is None or type(v) in (int, float, bool) or torch.is_tensor(v) and v.numel() <= sizes.get(i, 1)
                for v in entry.values()):
            raise refused
