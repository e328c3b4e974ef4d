"""The GPU stages' cost per batch, held to the issue's budget through the counting CuPy stand-in, and the
stand-in's own bookkeeping checked against what CuPy does (so the budget means what it says)."""
import json

import numpy as np
import pytest

from dali_scp.cupy_standin import StandIn
from pipelines import gpu_budget

MiB = 1 << 20


@pytest.fixture(scope="module")
def budgets():
    out = {}
    for b, n in ((8, 30), (32, 90)):
        out[b, n] = gpu_budget.measure_standin(gpu_budget.coco_like_batch(b, n, 1024, seed=0), 1024)
    return out


# the budget: fused kernels, not hundreds of array calls (before: 208 and 103 kernels)
LIMITS = {"masks": dict(kernels=40, host_syncs=2), "copy_paste": dict(kernels=30, host_syncs=1)}


def test_kernels_and_host_syncs_within_budget(budgets):
    for size, stages in budgets.items():
        for name, s in stages.items():
            assert s["kernels"] <= LIMITS[name]["kernels"], (size, name, s)
            assert s["host_syncs"] <= LIMITS[name]["host_syncs"], (size, name, s)


def test_kernel_count_does_not_grow_with_batch_or_instances(budgets):
    for name in gpu_budget.STAGES:
        assert budgets[8, 30][name]["kernels"] == budgets[32, 90][name]["kernels"], name


def test_device_memory_peaks_within_budget(budgets):
    for name in gpu_budget.STAGES:
        assert budgets[8, 30][name]["peak_bytes"] <= 256 * MiB, (name, budgets[8, 30][name])
        assert budgets[32, 90][name]["peak_bytes"] <= 1536 * MiB, (name, budgets[32, 90][name])
    # and it is real work, not an empty batch: the packed masks alone, 32 images x the batch's largest
    # kept count (at least 80 of the first image's 90 objects) x 128 KiB, are 320 MiB
    assert budgets[32, 90]["masks"]["peak_bytes"] >= 32 * 80 * 128 * 1024


def test_cli_prints_and_writes_json(tmp_path, capsys):
    assert gpu_budget.main(["--batch-size", "3", "--instances", "5", "--size", "128", "--json",
                            str(tmp_path / "b.json")]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert set(doc["stages"]) == {"masks", "copy_paste"}
    assert {"host_syncs", "kernels", "peak_bytes"} <= set(doc["stages"]["masks"])
    out = capsys.readouterr().out
    assert "masks" in out and "copy_paste" in out and "host_syncs" in out


def test_cli_without_gpu_says_so(capsys):
    from dali_scp.deps import gpu_available
    if gpu_available():
        pytest.skip("a GPU is present: covered by scripts/gpu_check.sh")
    assert gpu_budget.main(["--batch-size", "2", "--instances", "2", "--size", "64", "--device", "gpu"]) == 2
    assert "needs CuPy and a CUDA device" in capsys.readouterr().err


# --- the stand-in counts what CuPy would do ---------------------------------------------------------------

def test_standin_counts_every_blocking_transfer():
    xp = StandIn()
    a = xp.asarray(np.arange(12))
    xp.meter.reset()
    b = a * 2
    int(b[3])
    b.get()
    b.sum().item()
    b[b > 5]          # boolean mask: output size depends on the data
    xp.nonzero(b)
    bool(b.any())
    assert xp.meter.host_syncs == 6
    xp.meter.reset()
    c = b[2:5].reshape(3, 1)  # views: no kernel, no sync
    assert xp.meter.kernels == 0 and xp.meter.host_syncs == 0 and c.shape == (3, 1)


def test_standin_refuses_what_cupy_refuses():
    xp = StandIn()
    a = xp.asarray(np.arange(4, dtype=np.int64))
    with pytest.raises(TypeError):
        np.asarray(a)  # implicit device -> host conversion
    with pytest.raises(TypeError):
        xp.maximum(a, np.arange(4))  # a host array in a device operation
    with pytest.raises(TypeError):
        xp.scatter("min", a, xp.asarray(np.array([0])), xp.asarray(np.array([1])))  # int64: CuPy < 14.1


def test_standin_concatenate_follows_cupy():
    """One kernel for more than 8 small arrays, one copy per array otherwise (CuPy's rule)."""
    xp = StandIn()
    small = [xp.asarray(np.zeros(10, np.int32)) for _ in range(9)]
    big = [xp.asarray(np.zeros(3 << 20, np.uint8)) for _ in range(9)]
    for arrays, kernels in ((small, 1), (small[:8], 8), (big, 9)):
        xp.meter.reset()
        xp.concatenate(arrays)
        assert xp.meter.kernels == kernels


def test_standin_peak_counts_live_bytes_and_fused_kernels_have_no_temporaries():
    xp = StandIn()
    x = xp.asarray(np.zeros((4, 1 << 20), np.uint8))  # an input: excluded
    xp.meter.reset()
    y = x + 1                   # 4 MiB
    z = y.sum(axis=1)           # 32 B
    del y
    w = x * 2                   # 4 MiB again, after y was freed: peak stays 4 MiB + z
    assert xp.meter.peak_bytes == 4 * MiB + z.nbytes
    xp.meter.reset()
    r = xp.fused("row_or", lambda a: np.bitwise_or.reduce(a.astype(np.int64), axis=1), x)  # temp not counted
    assert xp.meter.kernels == 1 and xp.meter.peak_bytes == r.nbytes
    del w


def test_stage_times_under_a_concurrent_training_step_cpu_form():
    """The --under-training measurement's code path, on the CPU: the demo recipe's model trains in a
    thread while the stages (through the stand-in) are timed beside it, then both alone."""
    batch = gpu_budget.coco_like_batch(2, 4, 64, seed=0)
    r = gpu_budget.measure_under_training(batch, 64, "demo", train_batch=1, repeats=2, device="cpu",
                                          train_image_size=64)
    for key in ("stages_alone_ms", "stages_under_training_ms"):
        assert set(r[key]) == set(gpu_budget.STAGES) and all(v > 0 for v in r[key].values())
    assert r["train_step_ms"] > 0
    # the training thread really ran beside the stages, through nearly all of their time
    assert r["train_steps_beside_stages"] >= 1 and r["train_step_beside_stages_ms"] > 0
    assert r["training_share_of_stage_window"] > 0.5, r


def test_cli_under_training_needs_the_gpu(capsys):
    with pytest.raises(SystemExit):
        gpu_budget.main(["--batch-size", "2", "--instances", "2", "--size", "64", "--under-training", "demo"])
    assert "needs --device gpu" in capsys.readouterr().err
