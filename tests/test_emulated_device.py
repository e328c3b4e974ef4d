"""The raw CUDA kernels' own source executed without a GPU (dali_scp.emulated_device): every registered
kernel through both GPU stages on ~75 batches (tests/kernel_runs.py), each launch with its real grid, a
capped grid in reverse order and one odd-sized block, every output byte equal to the NumPy twin's; the
same runs under AddressSanitizer + UndefinedBehaviorSanitizer and ThreadSanitizer; and the emulator
itself catching the bugs it is there for (scripts/kernel_mutations.py plants them in the real kernels)."""
import re

import numpy as np
import pytest

import kernel_runs
from dali_scp import copy_paste, raster  # noqa: F401 - registers their kernels
from dali_scp import emulated_device as emu
from dali_scp import xp as xpm
from dali_scp.cupy_standin import StandIn


def _sanitizer_report(stderr: str):
    """The line of a sanitizer's report that names the kernel's file and line (ASan's and TSan's summary,
    UBSan's "runtime error"), or None."""
    m = re.search(r"^SUMMARY: \w+Sanitizer: .*$", stderr, re.M) or re.search(r"^\S+: runtime error: .*$", stderr, re.M)
    return m.group(0) if m else None


def _check(p, summary, mode):
    out = f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-6000:]}"
    report = _sanitizer_report(p.stderr)
    assert report is None, f"{report}\n{out}"
    assert summary is not None, f"the {mode} run ended without a summary: {out}"
    failures = summary["failures"]
    assert not failures, f"{len(failures)} of {summary['cases']} cases failed, the first: " + "\n".join(failures[:20])
    assert summary["missing"] == [], f"registered kernels that never ran: {summary['missing']}"
    assert set(summary["ran"]) == set(xpm.KERNELS)
    assert p.returncode == 0, out
    return summary


def test_every_kernel_source_equals_its_twin_through_both_stages():
    p, s = kernel_runs.in_subprocess("plain", "--cases", "all")
    s = _check(p, s, "plain")
    assert s["cases"] >= 70 and s["runs"] >= 3 * 12 * 70, s  # three configurations of every launch


@pytest.mark.parametrize("mode", ["address", "thread"])
def test_every_kernel_is_clean_under_sanitizers(mode):
    """address: every argument copied so it ends at its allocation's last byte, so one byte read or
    written past any array is a report; undefined behaviour (misaligned words, overflows, bad shifts)
    too. thread: every thread of a block an OS thread, all at once; any unsynchronised access is a report."""
    p, s = kernel_runs.in_subprocess(mode, "--cases", "sanitizer")
    _check(p, s, mode)


@pytest.mark.parametrize("mode,planted,report", [("thread", "race", "ThreadSanitizer: data race"),
                                                 ("address", "overread", "AddressSanitizer: heap-buffer-overflow")])
def test_sanitizers_report_a_planted_bug(mode, planted, report):
    """The clean runs above mean something only if the runtime really reports: a kernel with a racy
    read-modify-write and one that reads one element past its input (both invisible to the plain run,
    whose results equal the twin's) end the sanitizer's run with its report naming the kernel."""
    plain, s = kernel_runs.in_subprocess("plain", "--planted", planted)
    assert plain.returncode == 0 and s is not None and not s["failures"], plain.stderr[-3000:]
    p, _ = kernel_runs.in_subprocess(mode, "--planted", planted)
    assert p.returncode != 0 and report in p.stderr, p.stderr[-3000:]
    assert f"/raw-kernel/dali_scp_planted_{planted}.cu" in _sanitizer_report(p.stderr)


# --- the emulator catches what it is there for (in process, plain mode) ---------------------------------

@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_no_stride(const int* x, long long n, int* y) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  /* one element a thread: no grid stride */
    if (i < n) y[i] = 2 * x[i];
}
""", register=False)
def NO_STRIDE(x, n, y):
    y[:int(n)] = 2 * x[:int(n)]


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_order(long long n, int* y) {
    /* thread 0 sums what the others wrote, without a barrier between */
    for (long long i = threadIdx.x + 1; i < n; i += blockDim.x) y[i] = (int)i;
    if (threadIdx.x == 0) { int s = 0; for (long long i = 1; i < n; ++i) s += y[i]; y[0] = s; }
}
""", register=False)
def ORDER(n, y):
    y[1:int(n)] = np.arange(1, int(n))
    y[0] = y[1:int(n)].sum()


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_words(const unsigned char* x, long long n, unsigned char* y) {
    /* 16-byte words with no alignment test */
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n / 16; i += (long long)gridDim.x * blockDim.x)
        ((uint4*)y)[i] = ((const uint4*)x)[i];
}
""", register=False)
def WORDS(x, n, y):
    y[:int(n) // 16 * 16] = x[:int(n) // 16 * 16]


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_past_row(long long rows, long long width, unsigned char* y) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x)
        for (long long c = threadIdx.x; c <= width; c += blockDim.x) y[r * width + c] = (unsigned char)r;
}
""", register=False)
def PAST_ROW(rows, width, y):
    y.reshape(int(rows), int(width))[:] = np.arange(int(rows), dtype=np.uint8)[:, None]


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_shared(long long n, int* y) {
    __shared__ int acc;  /* never initialised */
    for (long long i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(&acc, 1);
    __syncthreads();
    if (threadIdx.x == 0 && blockIdx.x == 0) y[0] = acc;
}
""", register=False)
def SHARED(n, y):
    y[0] = int(n)


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_const(const int* x, int* y) {
    if (threadIdx.x == 0 && blockIdx.x == 0) { ((int*)x)[0] = 7; y[0] = 1; }
}
""", register=False)
def CONST(x, y):
    y[0] = 1


def _fails(match, fn):
    with emu.emulate():
        with pytest.raises(AssertionError, match=match):
            fn()


def test_emulator_runs_a_kernel_with_each_configuration_and_counts_it():
    x = np.arange(1000, dtype=np.int32)
    with emu.emulate() as dev:
        y = np.zeros(1000, np.int32)
        kernel_runs.PLANTED_RACE(np, 4, 256, x, np.int64(1000), y)
        assert y[0] == 999
    assert dev.ran == {"dali_scp_planted_race": 1} and dev.runs == len(emu.CONFIGS)


def test_emulator_catches_a_missing_grid_stride():
    x = np.arange(1000, dtype=np.int32)
    NO_STRIDE(np, xpm.blocks(1000), 256, x, np.int64(1000), np.zeros(1000, np.int32))  # the twin alone: fine
    _fails(r"dali_scp_test_no_stride \[capped: grid \(3, 1, 1\).*differs", lambda: NO_STRIDE(
        np, xpm.blocks(1000), 256, x, np.int64(1000), np.zeros(1000, np.int32)))


def test_emulator_catches_a_missing_barrier_by_thread_order():
    _fails(r"dali_scp_test_order \[real.*output y differs", lambda: ORDER(np, 1, 64, np.int64(200),
                                                                           np.full(200, 5, np.int32)))


def test_emulator_catches_a_word_path_on_an_unaligned_address():
    x = np.arange(256, dtype=np.uint8)
    WORDS(np, 1, 64, x, np.int64(256), np.zeros(256, np.uint8))  # aligned: the same bytes
    with emu.emulate():
        WORDS(np, 1, 64, x, np.int64(256), np.zeros(256, np.uint8))
    odd = np.zeros(257, np.uint8)[1:]
    odd[:] = x
    _fails(r"misaligned access: a .*uint4.* \(16-byte aligned\)", lambda: WORDS(np, 1, 64, odd, np.int64(256),
                                                                              np.zeros(256, np.uint8)))


def test_emulator_catches_a_write_one_byte_past_the_last_row():
    _fails(r"wrote past the end of y", lambda: PAST_ROW(np, 2, 32, np.int64(5), np.int64(24), np.zeros(120, np.uint8)))


def test_emulator_poisons_shared_memory_at_every_block():
    _fails(r"dali_scp_test_shared \[real.*output y differs", lambda: SHARED(np, 1, 64, np.int64(100),
                                                                             np.zeros(1, np.int32)))


def test_emulator_catches_a_write_to_a_const_input():
    _fails(r"wrote its const input x", lambda: CONST(np, 1, 32, np.arange(4, dtype=np.int32), np.zeros(1, np.int32)))


def test_emulator_compares_through_the_standin_and_takes_the_gpu_paths_arguments():
    """Through the stand-in, ``gather_samples`` (which the NumPy path replaces by ``np.concatenate``)
    launches with the GPU path's sample table and offsets, and the stand-in still counts one kernel."""
    xp = StandIn()
    arrays = [xp.asarray(np.full(n, n, np.uint8)) for n in (3, 0, 40)]
    with emu.emulate() as dev:
        xp.meter.reset()
        out = xpm.gather_samples(xp, arrays, ())
    assert dev.ran == {"dali_scp_gather_samples": 1} and xp.meter.ops["raw:dali_scp_gather_samples"] == 1
    np.testing.assert_array_equal(out.get(), [3] * 3 + [40] * 40)


def test_kernels_compile_once_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("DALI_SCP_CACHE", str(tmp_path))
    k = kernel_runs.PLANTED_RACE
    first = emu._build(k, "plain")
    mtime = first.stat().st_mtime_ns
    assert emu._build(k, "plain") == first and first.stat().st_mtime_ns == mtime  # cached
    other = xpm.RawKernel(k.name, k.params, k.source.replace("max(out[0], x[i])", "max(x[i], out[0])"), k.twin)
    assert emu._build(other, "plain") != first  # another source, another library
    assert len(list((tmp_path / "emulated_device").glob("*.so"))) == 2
