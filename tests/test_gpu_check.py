"""scripts/gpu_check.sh's verdict without a GPU: the one screen a short GPU lend returns first must say
PASS only when every check of the proof passed and its numbers are there, and name what failed otherwise
(fed with the files an H100 run wrote, benchmarks/gpu_h100/)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H100 = ROOT / "benchmarks" / "gpu_h100"
STEPS = ["install the wheels", "versions", "the GPU path can run here", "proof tests",
         "synthetic dataset (256 train, 32 val)", "throughput", "training step"]


def _work(tmp_path, status=None, tests="5 passed in 40.1s\n", metrics=True):
    work, res = tmp_path / "work", tmp_path / "res"
    (work / "train_step").mkdir(parents=True)
    res.mkdir()
    status = status or {}
    (work / "steps.tsv").write_text("".join(f"{s}\t{status.get(s, 'PASS')}\t7\t1\n" for s in STEPS))
    (work / "proof_tests.log").write_text(tests)
    shutil.copy(H100 / "profile_gpu_b32.json", work / "profile_quick.json")
    if metrics:
        (work / "train_step" / "metrics.jsonl").write_text((H100 / "train_gpu.jsonl").read_text().splitlines()[0] + "\n")
    (work / "versions.txt").write_text("NVIDIA H100 80GB HBM3, DALI 2.4.0, CuPy 14.2.0, torch 2.11.0+cu130")
    return work, res


def _verdict(work, res):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_verdict.py"), "verdict", str(work), str(res)],
                       capture_output=True, text=True, cwd=ROOT)
    text = (res / "verdict.txt").read_text()
    return p, text, " ".join(text.split())  # (lines are wrapped)


def test_the_verdict_passes_with_its_numbers_on_one_screen(tmp_path):
    p, text, flat = _verdict(*_work(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "VERDICT: the GPU path works" in flat and "FAIL" not in flat
    assert "ssj_scp 766 img/s, decode-only 5674 img/s" in flat  # the H100's figures, read from the profile
    assert "5 of 5 tests passed" in flat and "all 12 kernels" in flat and "loss 2.775 (finite)" in flat
    lines = text.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 110
    assert json.loads((tmp_path / "res" / "proof.json").read_text())["profile"]["results"]


def test_the_verdict_names_what_failed(tmp_path):
    failing = "FAILED tests/test_gpu.py::test_gpu_pipeline_matches_cpu_pipeline[ssj_scp] - AssertionError\n" \
              "1 failed, 4 passed in 50.0s\n"
    p, _, flat = _verdict(*_work(tmp_path, {"proof tests": "FAIL"}, failing, metrics=False))
    assert p.returncode == 1
    assert "4 of 5 tests passed; failed: tests/test_gpu.py::test_gpu_pipeline_matches_cpu_pipeline[ssj_scp]" in flat
    assert "FAIL AMP training step: no metrics written" in flat  # the step exited 0 but wrote nothing
    assert "VERDICT: FAILED (proof tests, training step)" in flat


def test_fewer_proof_tests_than_the_proof_has_is_no_pass(tmp_path):
    """pytest exits 0 when a renamed test no longer matches the selection: 3 passed is not the proof."""
    p, _, flat = _verdict(*_work(tmp_path, tests="3 passed in 30.0s\n"))
    assert p.returncode == 1
    assert "3 of 5 tests passed" in flat and "VERDICT: FAILED (proof tests)" in flat


def test_gpu_check_counts_a_failed_verdict():
    """The verdict's own checks (numbers missing, loss not finite) fail the whole run, not only its screen."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    line = next(x for x in text.splitlines() if "gpu_verdict.py verdict" in x)
    assert "|| failed+=" in line  # the pipeline's status is the verdict's, not tee's, under the script's pipefail:
    assert re.search(r"^set -\w*o pipefail", text, re.M)


def test_gpu_check_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
