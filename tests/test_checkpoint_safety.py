"""Checkpoints are read as data (trainer.checkpoint_reader): a crafted .pth whose pickle runs a command is
refused with one line naming the file, through every command that reads checkpoints, and the command never
runs; checkpoints of the previous format (NumPy's RNG state pickled as NumPy objects) still load and
restore that state exactly. More crafted files and real mmdetection ones: tests/test_checkpoint_reader.py."""
import os
import random

import numpy as np
import pytest
import torch

from messages import one_plain_line
from trainer import checkpoint as ckpt


class _Payload:
    """What an attacker ships: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path, marker):
    torch.save(dict(model=_Payload(marker), recipe={}, iteration=1, ranks=[]), path)
    assert not marker.exists()
    return path


def test_load_refuses_a_pickle_that_runs_code(tmp_path):
    f = _crafted(tmp_path / "evil.pth", tmp_path / "marker")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(f)
    assert not (tmp_path / "marker").exists(), "the payload ran"
    assert str(f) in str(e.value) and "system" in str(e.value) and "\n" not in str(e.value)


def test_evaluate_cli_refuses_it_in_one_line(syn_root, tmp_path, capsys):
    from trainer import evaluate as ev
    f = _crafted(tmp_path / "evil.pth", tmp_path / "marker")
    assert ev.main(["--checkpoint", str(f), "--coco-root", str(syn_root)]) == 2
    err = one_plain_line(capsys.readouterr().err)
    assert not (tmp_path / "marker").exists()
    assert str(f) in err and "refused" in err


def test_resume_refuses_it_in_one_line(syn_root, tmp_path, capsys):
    from trainer import run as run_mod
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    f = _crafted(run_dir / "ckpt_00000002.pth", tmp_path / "marker")
    rc = run_mod.main(["--preset", "demo", "--coco-root", str(syn_root), "--no-eval", "--threads", "1",
                       "--out", str(run_dir), "--batch-size", "2", "--max-iters", "3", "--resume"])
    err = one_plain_line(capsys.readouterr().err)
    assert rc == 2 and not (tmp_path / "marker").exists()
    assert str(f) in err


def test_previous_format_still_loads_and_restores_numpy_rng_exactly(tmp_path):
    """The previous code stored np.random.get_state() as is (an ndarray inside a tuple)."""
    np.random.seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of the state
    old = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    torch.save(dict(iteration=7, ranks=[dict(rng=old, data="dali state")]), tmp_path / "ckpt_00000007.pth")
    expected = np.random.standard_normal(5), random.random(), torch.rand(3)
    np.random.seed(99)
    state = ckpt.load(tmp_path / "ckpt_00000007.pth")
    ckpt.set_rng_state(state["ranks"][0]["rng"])
    np.testing.assert_array_equal(np.random.standard_normal(5), expected[0])
    assert random.random() == expected[1] and torch.equal(torch.rand(3), expected[2])


def test_new_rng_state_is_plain_data_and_round_trips(tmp_path):
    np.random.seed(5)
    np.random.standard_normal()
    torch.save(dict(rng=ckpt.rng_state()), tmp_path / "c.pth")
    expected = np.random.standard_normal(5)
    torch.load(tmp_path / "c.pth", weights_only=True)  # no allowance needed
    np.random.seed(0)
    ckpt.set_rng_state(ckpt.load(tmp_path / "c.pth")["rng"])
    np.testing.assert_array_equal(np.random.standard_normal(5), expected)
