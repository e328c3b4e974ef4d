"""The raw CUDA kernels without a GPU: each one's source compiled by NVRTC with the options CuPy adds,
its compiled parameters against what the Python side declares (and passes), no fused multiply-add
where its NumPy twin rounds each operation; and the CuPy stand-in launching them as CuPy would (one
kernel each) and refusing what CuPy or the kernel's declaration would refuse. Each kernel against its
twin on a GPU: tests/test_gpu.py."""
import numpy as np
import pytest

import nvrtc
from dali_scp import copy_paste, raster  # noqa: F401 - registers their kernels
from dali_scp import xp as xpm
from dali_scp.cupy_standin import POISON, StandIn

ARCHS = ("compute_75", "compute_80", "compute_90")  # CUDA 13's oldest, A100, H100/H200
PTX_TYPES = {np.dtype(np.int32): {"u32", "s32"}, np.dtype(np.uint32): {"u32"}, np.dtype(np.int64): {"u64", "s64"},
             np.dtype(np.uint64): {"u64"}, np.dtype(np.float32): {"f32"}, np.dtype(np.float64): {"f64"}}


def test_every_stage_kernel_is_registered():
    names = set(xpm.KERNELS)
    assert {"dali_scp_gather_samples", "dali_scp_polygon_edges", "dali_scp_crossings", "dali_scp_span_boxes",
            "dali_scp_kept_ranks", "dali_scp_span_bits", "dali_scp_kept_outputs", "dali_scp_paste_alpha",
            "dali_scp_dst_stats", "dali_scp_paste_masks", "dali_scp_paste_rows", "dali_scp_paste_images"} <= names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(xpm.KERNELS))
def test_kernel_compiles_with_nvrtc_as_cupy_would_compile_it(name, arch):
    k = xpm.KERNELS[name]
    c = nvrtc.compile_ptx(k.source, k.name, xpm.CUPY_ADDS + xpm.COMPILE_OPTIONS + (f"-arch={arch}",))
    assert c.ok, f"{name} does not compile for {arch}:\n{c.log}"
    assert "warning" not in c.log.lower(), c.log
    params = nvrtc.entry_params(c.ptx, k.name)
    assert params is not None, f"no extern \"C\" entry {k.name} in the PTX (CuPy looks it up by that name)"
    assert len(params) == len(k.params), (params, k.params)
    for p, t in zip(k.params, params):  # the declaration the stand-in and check_args enforce is the real one
        assert t in ({"u64"} if p.pointer else PTX_TYPES[p.dtype]), (k.name, p, t)
    # the twins round every float operation on its own: no contraction into fused multiply-adds
    assert not any(op in c.ptx for op in ("fma.rn", "mad.rn")), f"{name}: fused multiply-add in the PTX"


def test_nvrtc_catches_a_broken_kernel():
    """The compile test can fail: an undeclared name is an error, not a skipped kernel."""
    c = nvrtc.compile_ptx('extern "C" __global__ void broken(int* a) { a[0] = undeclared; }', "broken",
                          ("-arch=compute_90",))
    assert not c.ok and "undeclared" in c.log


def test_without_the_flag_double_arithmetic_would_be_contracted():
    """Why COMPILE_OPTIONS holds --fmad=false: by default NVRTC turns a + b * c into one fma, which rounds
    once where NumPy rounds twice (the crossing column would differ from the CPU's in the last bit)."""
    src = 'extern "C" __global__ void f(const double* x, double* y) { y[0] = x[0] + x[1] * x[2]; }'
    assert "fma.rn" in nvrtc.compile_ptx(src, "f", ("-arch=compute_90",)).ptx
    assert "fma.rn" not in nvrtc.compile_ptx(src, "f", ("-arch=compute_90",) + xpm.COMPILE_OPTIONS).ptx


# --- the stand-in launches raw kernels as CuPy would -----------------------------------------------------

@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_axpy(const float* x, float a, long long n, float* y) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = __fadd_rn(__fmul_rn(a, x[i]), y[i]);
}
""", register=False)
def AXPY(x, a, n, y):
    y[:n] = a * x[:n] + y[:n]


@xpm.raw_kernel(r"""
extern "C" __global__ void dali_scp_test_bad_twin(const float* x, float* y) { y[0] = x[0]; }
""", register=False)
def BAD_TWIN(x, y):
    x[0] = 1  # writes its const input


def test_standin_counts_a_raw_kernel_as_one_launch_and_runs_its_twin():
    xp = StandIn()
    x, y = xp.asarray(np.arange(5, dtype=np.float32)), xp.asarray(np.ones(5, np.float32))
    xp.meter.reset()
    AXPY(xp, 1, 256, x, np.float32(2), np.int64(5), y)
    assert xp.meter.kernels == 1 and xp.meter.host_syncs == 0
    np.testing.assert_array_equal(y.get(), [1, 3, 5, 7, 9])
    AXPY(np, 1, 256, x.get(), np.float32(2), np.int64(5), out := np.ones(5, np.float32))
    np.testing.assert_array_equal(out, [1, 3, 5, 7, 9])


def test_standin_refuses_what_cupy_or_the_declaration_refuses():
    xp = StandIn()
    x, y = xp.asarray(np.arange(5, dtype=np.float32)), xp.asarray(np.ones(5, np.float32))
    ok = (x, np.float32(2), np.int64(5), y)
    bad = {"host array (CuPy)": (np.arange(5, dtype=np.float32), *ok[1:]),
           "python float: 8 bytes for a float parameter": (x, 2.0, *ok[2:]),
           "python int for a long long": (x, np.float32(2), 5, y),
           "wrong dtype": (xp.asarray(np.arange(5, dtype=np.float64)), *ok[1:]),
           "not C-contiguous": (xp.asarray(np.arange(10, dtype=np.float32))[::2], *ok[1:]),
           "too few arguments": ok[:3]}
    for why, args in bad.items():
        with pytest.raises(TypeError):
            AXPY(xp, 1, 256, *args)
            pytest.fail(why)
    for grid, block in ((0, 256), (1, 2048), ((1, 70000), 32)):  # CUDA: invalid launch configuration
        with pytest.raises(ValueError):
            AXPY(xp, grid, block, *ok)
    with pytest.raises(ValueError, match="read-only"):  # a twin that writes a const input
        BAD_TWIN(xp, 1, 1, x, y)
    assert x.get()[0] == 0 and x._a.flags.writeable  # untouched, and writable again afterwards


def test_standin_uploads_a_sample_table_once_per_samples_object():
    xp = StandIn()
    arrays = [xp.asarray(np.full(n, n, np.uint8)) for n in (3, 0, 5)]
    nbytes = np.array([3, 0, 5], np.int64)
    table = xp.asarray(np.concatenate([np.cumsum(nbytes) - nbytes, nbytes]))
    xp.meter.reset()
    out = xp.empty(8, xp.uint8)
    samples = xpm.Samples(arrays)
    for _ in range(2):
        xpm.GATHER_SAMPLES(xp, (1, 3), 256, samples, table[:3], table[3:], np.int32(3), out)
    assert xp.meter.kernels == 2 and xp.meter.h2d == 1
    np.testing.assert_array_equal(out.get(), [3, 3, 3, 5, 5, 5, 5, 5])
    with pytest.raises(TypeError):  # a sample table of mixed dtypes
        xpm.GATHER_SAMPLES(xp, 1, 256, [arrays[0], xp.asarray(np.zeros(2, np.int32))], table[:2], table[3:5],
                           np.int32(2), out)


def test_standin_empty_is_not_zero():
    """CuPy's empty is uninitialised memory: code that relies on zeros must fail in CI too."""
    xp = StandIn()
    assert (xp.empty((3, 4), xp.uint8).get() == POISON).all()
    assert (xp.empty(2, xp.int32).get().view(np.uint8) == POISON).all()


def test_gather_samples_refuses_a_sample_of_another_shape_before_launching():
    """The kernel copies each sample's rows by byte count: a sample whose shape is not rows x tail would be
    read past its end on a GPU, so the host refuses it, naming the sample (the stand-in runs that path)."""
    xp = StandIn()
    good = xp.asarray(np.zeros((2, 3, 4), np.uint8))
    bad = xp.asarray(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="sample 1 has shape"):
        xpm.gather_samples(xp, [good, bad], (3, 4))
    assert xpm.gather_samples(xp, [good, good], (3, 4)).shape == (4, 3, 4)
