"""One dataset check per job under torchrun: the others wait and read the cached result, on a shared
cache (one check) and on node-local caches (one per node); a failed check fails every process; the
CLI's check is the cache entry the training run then starts from."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dali_scp import check as check_mod
from dali_scp.check import main

PROBE = Path(__file__).with_name("check_probe.py")
REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, probe_args: list, cache: Path, nnodes=1, node_rank=0, nproc=2, port=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", DALI_SCP_CACHE=str(cache))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port or _port()),
           str(PROBE), str(out), *probe_args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(out: Path, n: int) -> list:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def _finish(*procs):
    for p in procs:
        text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, text[-4000:]


def test_two_training_processes_run_one_check_and_read_the_same_copy(small_root, tmp_path):
    root = small_root(5)
    out = tmp_path / "out"
    out.mkdir()
    _finish(_torchrun(out, ["train", "--preset", "demo", "--coco-root", str(root), "--max-iters", "1",
                            "--batch-size", "1", "--no-eval", "--threads", "1", "--out", str(tmp_path / "run")],
                      tmp_path / "cache"))
    r0, r1 = _records(out, 2)
    assert (r0["checks"], r1["checks"]) == (1, 0)
    assert r0["read"] == r1["read"] and r0["read"]["path"].startswith(str(tmp_path / "cache"))


def test_node_local_caches_one_check_per_node_and_a_failure_reaches_everyone(small_root, tmp_path):
    """Two 'nodes' of two processes on this machine, each with its own cache folder."""
    root = small_root(3)
    ann, img = root / "annotations" / "instances_train2017.json", root / "train2017"
    out = tmp_path / "out"
    out.mkdir()
    port = _port()
    nodes = [_torchrun(out, ["check", str(ann), str(img)], tmp_path / f"cache{n}", nnodes=2, node_rank=n, port=port)
             for n in (0, 1)]
    _finish(*nodes)
    recs = _records(out, 4)
    assert [r["checks"] for r in recs] == [1, 0, 1, 0]  # global rank 0; then local rank 0 of the other node
    for r in recs:
        assert r["error"] is None and r["read"]["path"].startswith(str(tmp_path / f"cache{r['rank'] // 2}"))
    assert len({r["read"]["sha1"] for r in recs}) == 1

    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "train2017").mkdir()
    (bad / "annotations" / "instances_train2017.json").write_text("{not json")
    shutil.rmtree(out)
    out.mkdir()
    _finish(_torchrun(out, ["check", str(bad / "annotations" / "instances_train2017.json"), str(bad / "train2017")],
                      tmp_path / "cache_bad"))
    r0, r1 = _records(out, 2)
    assert (r0["checks"], r1["checks"]) == (1, 0)
    assert "malformed-json" in r0["error"] and "malformed-json" in r1["error"] and "global rank 0" in r1["error"]


def test_the_cli_fills_the_cache_the_loader_starts_from(small_root, tmp_path, monkeypatch):
    """`python -m dali_scp.check` (here with a relative --coco-root), then a loader: the loader neither
    checks again nor parses the original JSON (its categories come from the cache too)."""
    from dali_scp.dataset import resolve
    from dali_scp.presets import pipeline_preset
    from pipelines.iterator import CocoLoader
    monkeypatch.setenv("DALI_SCP_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "coco"
    shutil.copytree(small_root(3), root)
    monkeypatch.chdir(tmp_path)
    assert main(["--coco-root", "coco", "--workers", "2"]) == 0
    monkeypatch.chdir(REPO)

    def no_check(*a, **kw):
        raise AssertionError("the dataset was checked again")
    monkeypatch.setattr(check_mod, "check", no_check)
    reads = []
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **kw: reads.append(self.resolve()) or real_read(self, *a, **kw))
    split = resolve(root)
    loader = CocoLoader(pipeline_preset("none", out_size=64), split, batch_size=2, shuffle=False)
    assert loader.check_report.kept_images == 3 and str(tmp_path / "cache") in loader.check_report.filtered
    assert split.annotations.resolve() not in reads
    assert len([t for _, targets in loader for t in targets]) == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_find_the_same_as_one(small_root, tmp_path, workers):
    """The image pass in worker processes reports what the inline pass reports."""
    root = tmp_path / "coco"
    shutil.copytree(small_root(5), root)
    ann, img = root / "annotations" / "instances_train2017.json", root / "train2017"
    (img / sorted(os.listdir(img))[0]).write_bytes(b"not a jpeg")
    rep, filtered = check_mod.check(ann, img, workers=workers, progress=False)
    assert [d.kind for d in rep.defects] == ["corrupt-image"] and rep.kept_images == 4
