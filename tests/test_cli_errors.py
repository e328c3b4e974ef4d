"""Bad input to any CLI: one line on stderr naming the file and what is wrong, a non-zero exit, no
traceback; --debug (or DALI_SCP_DEBUG=1) shows the traceback."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dali_scp import check, synthetic
from pipelines import profile, visualize
from trainer import evaluate, run

REPO = Path(__file__).resolve().parents[1]


def _run_matrix():
    spec = importlib.util.spec_from_file_location("run_matrix", REPO / "benchmarks" / "run_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def bad_root(tmp_path):
    """COCO layout whose annotation files are not JSON."""
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"instances_{split}.json").write_text('{"images": [')
    return tmp_path


CASES = {
    "dali_scp.check": lambda r, t: (check.main, ["--coco-root", str(r)]),
    "dali_scp.synthetic": lambda r, t: (synthetic.main, ["--out", str(r / "annotations" / "instances_train2017.json")]),
    "trainer.run": lambda r, t: (run.main, ["--coco-root", str(r), "--out", str(t / "run")]),
    "trainer.evaluate": lambda r, t: (evaluate.main, ["--results", str(t / "r.json"), "--coco-root", str(r)]),
    "pipelines.visualize": lambda r, t: (visualize.main, ["--coco-root", str(r), "--out", str(t / "g.png")]),
    "pipelines.profile": lambda r, t: (profile.main, ["--coco-root", str(r)]),
    "benchmarks/run_matrix.py": lambda r, t: (_run_matrix().main, ["--coco-root", str(r), "--out", str(t)]),
}


@pytest.mark.parametrize("cli", list(CASES))
def test_bad_input_is_one_line_naming_the_file(cli, bad_root, tmp_path, capsys):
    main, argv = CASES[cli](bad_root, tmp_path)
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert str(bad_root / "annotations" / "instances_") in err[0], err
    if cli != "dali_scp.check":  # the check reports a malformed file (it is what it checks for)
        with pytest.raises(Exception):
            main(argv + ["--debug"])


def test_a_malformed_annotation_file_in_evaluate_prints_no_traceback(bad_root, tmp_path):
    cmd = [sys.executable, "-m", "trainer.evaluate", "--results", str(tmp_path / "r.json"),
           "--coco-root", str(bad_root)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DALI_SCP_DEBUG", None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "instances_val2017.json: not a COCO instances file" in lines[0]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, DALI_SCP_DEBUG="1"), cwd=REPO)
    assert p.returncode != 0 and "Traceback" in p.stderr
