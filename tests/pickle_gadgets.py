"""Live payloads for tests/test_checkpoint_reader.py: each creates its marker file when a plain pickle load
imports this module and runs it (the tests check that it does, then that the checkpoint reader never does)."""
from pathlib import Path


def touch(path):
    Path(path).touch()


class Touch:
    """``__reduce__`` to this module's ``touch``: a pickle load calls it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return touch, (self.marker,)


class SetStateGadget:
    """BUILD calls ``__setstate__``: a pickle load runs it with the file's state."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __getstate__(self):
        return {"marker": self.marker}

    def __setstate__(self, state):
        touch(state["marker"])
