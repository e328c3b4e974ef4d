"""The reference files scripts/*_reference.py write from the side venv: arrays plus one JSON ``info`` entry."""
import json
from pathlib import Path

import numpy as np


def load_reference(path: Path) -> dict:
    """Every array of the ``.npz`` and its ``info`` parsed."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files} | {"info": json.loads(str(z["info"]))}
