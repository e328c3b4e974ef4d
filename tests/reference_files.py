"""The reference files scripts/*_reference.py write from the side venv: arrays plus one JSON ``info`` entry."""
import functools
import importlib.util
import json
from pathlib import Path

import numpy as np


def load_reference(path: Path) -> dict:
    """Every array of the ``.npz`` and its ``info`` parsed."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files} | {"info": json.loads(str(z["info"]))}


@functools.cache
def reference_script(name: str):
    """``scripts/<name>.py`` as a module, for the definitions a test rebuilds its inputs from (seeded weights,
    the synthetic set's arguments) without the side venv: only its top level runs, which imports no mmdetection."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def seeded_mmdet_checkpoint(info: dict, path: Path, meta: dict | None = None) -> Path:
    """The checkpoint a reference script seeded in the side venv (``info``: its key spec, seed and digest),
    rebuilt here bit for bit - the digest says so - and saved as mmdetection saves one."""
    import torch
    ref = reference_script("mmdet_reference")
    sd = ref.seeded_state_dict(info["spec"], info["seed"])
    assert ref.state_dict_digest(sd) == info["digest"], "the seeded weights differ from the reference's"
    torch.save(dict(meta=meta or {}, state_dict=sd), path)
    return path
