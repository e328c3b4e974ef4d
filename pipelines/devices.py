"""The two device vocabularies and where they meet: pipelines say "cpu"/"gpu" (DALI's words), the
trainer "cpu"/"cuda" (torch's). Every translation between them is here, so a caller never spells one.
No DALI import: the trainer translates without building a pipeline."""
from __future__ import annotations


def pipeline_device(torch_device: str) -> str:
    """The pipelines' name for a torch device name ("cuda" -> "gpu", "cpu" -> "cpu")."""
    return "gpu" if torch_device == "cuda" else "cpu"


def dali_device_id(device: str, device_id: int | None = None) -> int | None:
    """DALI's ``device_id`` for a pipeline on ``device`` ("cpu"/"gpu"): None for a CPU pipeline, so it
    never touches CUDA (a CPU run on a machine without a GPU, or beside a training process that owns
    it); ``device_id`` for a GPU pipeline, GPU 0 unless told."""
    if device != "gpu":
        return None
    return 0 if device_id is None else device_id
