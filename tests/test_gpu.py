"""The GPU path against its references on the same inputs: the raw kernels against their NumPy twins, the GPU stages against the CPU stages bit for bit, the stand-in's counts against CuPy, the
mixed-decoder pipeline against the CPU pipeline. Run by scripts/gpu_check.sh on a GPU machine (with
DALI_SCP_REQUIRE_GPU=1 a test that cannot run there fails instead of skipping); skipped elsewhere."""
import numpy as np
import pytest

from dali_scp.copy_paste import copy_paste_packed, copy_paste_packed_batched, draw_choices
from dali_scp.presets import CopyPaste, pipeline_preset
from dali_scp.raster import rasterize_batch, rasterize_packed_batch
from pipelines.gpu_budget import coco_like_batch

pytestmark = pytest.mark.gpu


def _dev(cp, xs):
    return [cp.asarray(x) for x in xs]


def _host(xs):
    return [x.get() for x in xs]


def test_gather_samples_kernel_equals_concatenate():
    import cupy as cp
    from dali_scp.xp import gather_samples
    rng = np.random.default_rng(0)
    for dtype, tail in ((np.uint8, (5, 3)), (np.float32, (2,)), (np.int32, ())):
        arrays = [rng.integers(0, 200, (int(n),) + tail).astype(dtype) for n in rng.integers(0, 40, 11)]
        arrays.append(np.zeros((0,) + tail, dtype))
        got = gather_samples(cp, _dev(cp, arrays), tail)
        np.testing.assert_array_equal(got.get(), np.concatenate(arrays))
    # unaligned sample pointers (views at odd offsets) take the byte path
    base = cp.arange(1000, dtype=cp.uint8)
    views = [base[1 + 37 * i: 1 + 37 * i + 33] for i in range(9)]
    np.testing.assert_array_equal(gather_samples(cp, views, ()).get(), np.concatenate(_host(views)))


def _unaligned(cp, a):
    """A C-contiguous copy of ``a`` at an odd address: the kernels' byte paths instead of their words."""
    assert a.dtype == cp.uint8
    out = cp.empty(a.size + 1, cp.uint8)[1:].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("size,aligned", [(320, True), (100, True), (320, False)])  # 100: 13-byte rows
def test_every_kernel_equals_its_numpy_twin_on_stage_batches(size, aligned):
    """Every raw kernel, launched by the stages on COCO-like batches, against its NumPy twin run on host
    copies of the very same arguments: every output byte for byte (``xp.shadow_twins``). Unaligned
    samples take the byte paths the word paths fall back to."""
    import cupy as cp
    from dali_scp.xp import KERNELS, shadow_twins
    b = coco_like_batch(6, 20, size, 4)
    with shadow_twins() as checked:
        masks, boxes, labels = rasterize_packed_batch(_dev(cp, b.polygons), _dev(cp, b.vertices), _dev(cp, b.cat_ids),
                                                      size, size, cp)
        images = _dev(cp, b.images)
        if not aligned:
            masks, images = [_unaligned(cp, m) for m in masks], [_unaligned(cp, i) for i in images]
            assert all(m.data.ptr % 2 for m in masks)
        ch = draw_choices(np.random.default_rng(2), [len(x) for x in labels], CopyPaste())
        out = copy_paste_packed_batched(images, masks, boxes, labels, ch, CopyPaste(), cp)
    assert set(checked) == set(KERNELS), set(KERNELS) - set(checked)
    assert sum(int(p.sum()) for p in _host(out[4])) > 0  # something was pasted


@pytest.mark.parametrize("seed", range(4))
def test_packed_rasteriser_on_gpu_equals_cpu_bit_for_bit(seed):
    import cupy as cp
    b = coco_like_batch(6, 20, 320, seed)
    cm, cb, ck = rasterize_batch(b.polygons, b.vertices, [len(lab) for lab in b.cat_ids], 320, 320)
    gm, gb, gl = (_host(x) for x in rasterize_packed_batch(_dev(cp, b.polygons), _dev(cp, b.vertices),
                                                           _dev(cp, b.cat_ids), 320, 320, cp))
    for i in range(6):
        np.testing.assert_array_equal(np.unpackbits(gm[i], axis=-1), cm[i])
        np.testing.assert_array_equal(gb[i], cb[i])
        np.testing.assert_array_equal(gl[i], b.cat_ids[i][ck[i]])


@pytest.mark.parametrize("blend", [0.0, 2.0])
def test_packed_copy_paste_on_gpu_equals_cpu_bit_for_bit(blend):
    import cupy as cp
    b = coco_like_batch(6, 20, 256, 7)
    masks, boxes, labels = rasterize_packed_batch(b.polygons, b.vertices, b.cat_ids, 256, 256, np)
    cfg = CopyPaste(blend_sigma=blend)
    ch = draw_choices(np.random.default_rng(1), [len(x) for x in labels], cfg)
    cpu = copy_paste_packed_batched(b.images, masks, boxes, labels, ch, cfg, np)
    gpu = copy_paste_packed_batched(_dev(cp, b.images), _dev(cp, masks), _dev(cp, boxes), _dev(cp, labels), ch, cfg, cp)
    for k, (a, g) in enumerate(zip(cpu, gpu)):
        for x, y in zip(a, _host(g)):
            if blend and k == 0:
                assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # float blur rounding
            else:
                np.testing.assert_array_equal(x, y)
    if not blend:  # and the CPU box-window path agrees too
        win = copy_paste_packed(b.images, masks, boxes, labels, ch, cfg)
        for a, w in zip(cpu, win):
            for x, y in zip(a, w):
                np.testing.assert_array_equal(x, y)


def test_standin_counts_match_the_gpu_run():
    """The numbers CI holds (stand-in) are the numbers the GPU pays: syncs exactly, and peak memory of
    the same order as CuPy's pool."""
    import cupy as cp
    from pipelines import gpu_budget
    batch = coco_like_batch(8, 30, 1024, 0)
    stand = gpu_budget.measure_standin(batch, 1024)
    real = gpu_budget.measure_gpu(batch, 1024, repeats=2)
    for name in gpu_budget.STAGES:
        assert real[name]["pool_peak_bytes"] <= 2 * stand[name]["peak_bytes"] + (64 << 20), (name, stand, real)
    assert cp.cuda.runtime.getDeviceCount() > 0


@pytest.mark.parametrize("name", ["ssj", "ssj_scp"])
def test_gpu_pipeline_matches_cpu_pipeline(name, syn_train):
    """Same seed: the random choices are identical, so masks/boxes/labels must agree exactly and the
    mixed (nvJPEG) decode differs from the CPU decoder only within resize tolerance."""
    import torch
    from pipelines.iterator import CocoLoader
    preset = pipeline_preset(name, out_size=512)
    out = {}
    for dev in ("cpu", "gpu"):
        images, targets = next(iter(CocoLoader(preset, syn_train, batch_size=4, device=dev, seed=3)))
        if dev == "gpu":
            assert images.is_cuda and targets[0]["masks"].is_cuda
        out[dev] = (images.cpu().float(), [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in t.items()}
                                           for t in targets])
    (ic, tc), (ig, tg) = out["cpu"], out["gpu"]
    assert (ic - ig).abs().mean() < 2.0 and (ic - ig).abs().quantile(0.99) < 12
    for a, b in zip(tc, tg):
        assert a["image_id"] == b["image_id"]
        torch.testing.assert_close(a["labels"], b["labels"])
        # identical vertices -> identical rasterisation; copy-paste decisions depend on masks only
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert torch.equal(a["masks"], b["masks"])


@pytest.mark.parametrize("stage", ["masks", "copy_paste"])
def test_an_error_inside_a_gpu_stage_is_one_named_error_not_a_crash(stage, syn_root):
    """Before the stages caught their exceptions, a CuPy error inside the GPU copy-paste ended the
    process with a segmentation fault in DALI's ``share_outputs`` (seen on an H100)."""
    from stage_failure import run_probe
    p = run_probe(syn_root, "gpu", stage)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"
    assert f"CAUGHT the {stage} stage failed on batch 0: ValueError: planted failure" in p.stdout, p.stdout


def test_opencv_resize_on_the_gpu_is_opencvs():
    """``trainer.evaluate --resize opencv`` resizes on the batch's device: on CUDA the integer arithmetic
    gives OpenCV's pixels as on the CPU (tests/data/mmdet_testtime.npz: OpenCV's own outputs)."""
    import torch
    from pathlib import Path
    from pipelines.opencv_resize import resize_linear
    ref = np.load(Path(__file__).parent / "data" / "mmdet_testtime.npz")
    cases = len([k for k in ref.files if k.startswith("cv_in")])
    assert cases == 8, f"the reference holds {cases} OpenCV cases, not 8: regenerate or update this test"
    for i in range(cases):
        out = ref[f"cv_out{i}"]
        out = out.reshape(out.shape[0], out.shape[1], -1)
        got = resize_linear(torch.from_numpy(ref[f"cv_in{i}"]).cuda(), *out.shape[:2]).cpu().numpy()
        np.testing.assert_array_equal(got, out)
