"""GPU path against the CPU path on the same inputs (run by scripts/gpu_check.sh on a GPU machine;
skipped where there is no CUDA device)."""
import numpy as np
import pytest

from dali_scp.copy_paste import copy_paste, copy_paste_packed, draw_choices
from dali_scp.presets import CopyPaste, pipeline_preset
from dali_scp.raster import rasterize_batch
from dali_scp.synthetic import star_polygon

pytestmark = pytest.mark.gpu


def _random_batch(seed, b=6, h=256, w=320):
    rng = np.random.default_rng(seed)
    polys, verts, counts = [], [], []
    for _ in range(b):
        n = int(rng.integers(0, 12))
        p, v, off = [], [], 0
        for i in range(n):
            for _ in range(int(rng.integers(1, 3))):
                q = star_polygon(rng, rng.uniform(-30, w + 30), rng.uniform(-30, h + 30), rng.uniform(2, 90),
                                 int(rng.integers(3, 61)))
                p.append([i, off, off + len(q)])
                v.append(q)
                off += len(q)
        polys.append(np.array(p, np.int64).reshape(-1, 3))
        verts.append(np.concatenate(v).astype(np.float32) if v else np.zeros((0, 2), np.float32))
        counts.append(n)
    return polys, verts, counts


@pytest.mark.parametrize("seed", range(4))
def test_rasteriser_gpu_equals_cpu_bit_for_bit(seed):
    import cupy as cp
    polys, verts, counts = _random_batch(seed)
    cm, cb, ck = rasterize_batch(polys, verts, counts, 256, 320, np)
    gm, gb, gk = rasterize_batch([cp.asarray(p) for p in polys], [cp.asarray(v) for v in verts], counts, 256, 320, cp)
    for a, b in zip(cm + cb + ck, gm + gb + gk):
        np.testing.assert_array_equal(a, cp.asnumpy(b))


@pytest.mark.parametrize("blend", [0.0, 2.0])
def test_copy_paste_gpu_equals_cpu_bit_for_bit(blend):
    import cupy as cp
    polys, verts, counts = _random_batch(7)
    masks, boxes, kept = rasterize_batch(polys, verts, counts, 256, 320, np)
    masks = [m[: len(k)] for m, k in zip(masks, kept)]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 320, 3), dtype=np.uint8) for _ in masks]
    labels = [np.arange(len(k), dtype=np.int32) + 10 * i for i, k in enumerate(kept)]
    cfg = CopyPaste(blend_sigma=blend)
    ch = draw_choices(np.random.default_rng(1), [len(l) for l in labels], cfg)
    cpu = copy_paste(images, masks, boxes, labels, ch, cfg, np)
    g = lambda xs: [cp.asarray(x) for x in xs]  # noqa: E731
    gpu = copy_paste(g(images), g(masks), g(boxes), g(labels), ch, cfg, cp)
    for a, b in zip(cpu, gpu):
        for x, y in zip(a, b):
            if blend and x.dtype == np.uint8 and x.ndim == 3 and x.shape[-1] == 3:
                assert np.abs(x.astype(int) - cp.asnumpy(y).astype(int)).max() <= 1  # float blur rounding
            else:
                np.testing.assert_array_equal(x, cp.asnumpy(y))
    win = copy_paste_packed(images, [np.packbits(m, axis=-1) for m in masks], boxes, labels, ch, cfg)
    for x, y in zip(cpu[1], win[1]):
        np.testing.assert_array_equal(x, np.unpackbits(y[: len(x)], axis=-1))


def test_masked_union_kernel_equals_its_numpy_reference():
    import cupy as cp
    from dali_scp.copy_paste import masked_union
    rng = np.random.default_rng(0)
    m = (rng.random((5, 7, 33, 41)) < 0.2).astype(np.uint8)
    sel = rng.random((5, 7)) < 0.5
    np.testing.assert_array_equal(masked_union(m, sel, np), cp.asnumpy(masked_union(cp.asarray(m), cp.asarray(sel), cp)))


def test_stage_dense_form_on_gpu_equals_cpu_packed_form():
    import cupy as cp
    from pipelines.stages import CopyPasteStage
    polys, verts, counts = _random_batch(11)
    masks, boxes, kept = rasterize_batch(polys, verts, counts, 256, 320, np)
    packed = [np.packbits(m, axis=-1) for m in masks]
    labels = [np.arange(len(k), dtype=np.int32) for k in kept]
    images = [np.random.default_rng(i).integers(0, 256, (256, 320, 3), dtype=np.uint8) for i in range(len(kept))]
    cfg = CopyPaste()
    ch = draw_choices(np.random.default_rng(3), [len(l) for l in labels], cfg)
    cpu = copy_paste_packed(images, packed, boxes, labels, ch, cfg)
    g = lambda xs: [cp.asarray(x) for x in xs]  # noqa: E731
    gpu = CopyPasteStage.dense(g(images), g(packed), g(boxes), g(labels), ch, cfg, cp)
    for a, b in zip(cpu, gpu):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, cp.asnumpy(y))


@pytest.mark.parametrize("name", ["ssj", "ssj_scp"])
def test_gpu_pipeline_matches_cpu_pipeline(name, syn_train):
    """Same seed: the random choices are identical, so masks/boxes/labels must agree exactly and the
    mixed (nvJPEG) decode differs from the CPU decoder only within resize tolerance."""
    import torch
    from pipelines.iterator import CocoLoader
    preset = pipeline_preset(name, out_size=512)
    out = {}
    for dev in ("cpu", "gpu"):
        images, targets = next(iter(CocoLoader(preset, syn_train, batch_size=4, device=dev, seed=3,
                                               device_id=0 if dev == "gpu" else None)))
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
