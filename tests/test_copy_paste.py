"""Copy-paste semantics (mmdetection's CopyPaste) on the pure NumPy function, and end to end. The
semantics are asserted on the reference (``copy_paste``) and every other form - the CPU box-window path,
the GPU form run on NumPy and through the counting CuPy stand-in - must equal it bit for bit."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_scp.copy_paste import (Choices, copy_paste, copy_paste_packed, copy_paste_packed_batched, derangement,
                                  draw_choices)
from dali_scp.cupy_standin import StandIn
from dali_scp.presets import CopyPaste

CFG = CopyPaste()


def gpu_form(images, masks, boxes, labels, choices, cfg, xp=np):
    """The GPU form behind the list API: packed in, per-sample [n_out] dense masks out."""
    w = images[0].shape[1]
    dev = (lambda xs: [xp.asarray(np.ascontiguousarray(x)) for x in xs]) if xp is not np else list
    out = copy_paste_packed_batched(dev(images), dev([np.packbits(m, axis=-1) for m in masks]), dev(boxes),
                                    dev(labels), choices, cfg, xp)
    out = [[x.get() if xp is not np else x for x in o] for o in out]
    masks = [np.unpackbits(m[: len(lab)], axis=-1)[..., :w] for m, lab in zip(out[1], out[3])]
    return out[0], masks, out[2], out[3], out[4]


def standin_form(*args):
    return gpu_form(*args, xp=StandIn())


FORMS = [copy_paste, gpu_form, standin_form]


def full_box_masks(boxes, h, w):
    m = np.zeros((len(boxes), h, w), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).astype(int)):
        m[i, y0:y1, x0:x1] = 1
    return m


def tight(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("copy_paste", FORMS)
def test_mmdetection_scenario(copy_paste):
    """mmdetection's unit test: all three source objects pasted, the second destination object is
    covered completely and dropped, the first loses area but stays."""
    w, h = 400, 300
    scale = np.array([w, h, w, h])
    dst_boxes = np.array([[0.2, 0.2, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]]) * scale
    src_boxes = np.array([[0.1, 0.1, 0.3, 0.5], [0.4, 0.4, 0.7, 0.7], [0.8, 0.8, 0.9, 0.9]]) * scale
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(2)]
    masks = [full_box_masks(dst_boxes, h, w), full_box_masks(src_boxes, h, w)]
    boxes = [dst_boxes.astype(np.float32), src_boxes.astype(np.float32)]
    labels = [np.array([1, 2]), np.array([3, 4, 5])]
    ch = Choices(src=np.array([1, 0]), picks=[np.array([0, 1, 2]), np.zeros(0, int)])
    oi, om, ob, ol, op = copy_paste(imgs, masks, boxes, labels, ch, CFG)
    assert len(om[0]) == len(ob[0]) == len(ol[0]) == 4
    assert ol[0].tolist() == [1, 3, 4, 5] and op[0].tolist() == [0, 1, 1, 1]
    assert om[0][0].sum() < masks[0][0].sum()
    assert ob[0][0].tolist() == [0.3 * w, 0.2 * h, 0.4 * w, 0.4 * h]
    np.testing.assert_array_equal(ob[0][1:], src_boxes)
    # destination 1 received nothing: unchanged
    np.testing.assert_array_equal(oi[1], imgs[1])
    np.testing.assert_array_equal(om[1], masks[1])
    np.testing.assert_array_equal(ob[1], src_boxes)


@pytest.mark.parametrize("moved,area_px,kept", [(10, 200, True), (11, 200, False), (11, 300, False),
                                                (11, 301, True), (30, 0, False)])
@pytest.mark.parametrize("copy_paste", FORMS)
def test_occlusion_rule_at_its_thresholds(moved, area_px, kept, copy_paste):
    """Destination: a full 20 x (40 + moved) box. The source covers its first ``moved`` columns (the left
    edge moves by exactly that) and enough interior pixels to leave ``area_px`` (the border stays, so
    the box moves only on the left)."""
    h = 20
    width = 40 + moved
    w = width + 5
    dst = np.zeros((1, h, w), np.uint8)
    dst[0, :, :width] = 1
    src = np.zeros((1, h, w), np.uint8)
    src[0, :, :moved] = 1
    if area_px == 0:
        src[0, :, :width] = 1
    else:
        interior = [(r, c) for r in range(1, h - 1) for c in range(moved + 1, width - 1)]
        for r, c in interior[: h * 40 - area_px]:
            src[0, r, c] = 1
    dst_box = np.array([[0, 0, width, h]], np.float32)
    out = copy_paste([np.zeros((h, w, 3), np.uint8)] * 2, [dst, src], [dst_box, dst_box],
                     [np.array([1]), np.array([2])], Choices(np.array([1, 0]), [np.array([0]), np.zeros(0, int)]),
                     CFG)
    n_dst = int((out[4][0] == 0).sum())
    assert n_dst == int(kept)
    if kept:
        assert out[1][0][0].sum() == area_px
        assert out[2][0][0].tolist() == [moved, 0, width, h]


@st.composite
def batches(draw):
    b = draw(st.integers(2, 4))
    h, w = draw(st.integers(8, 24)), 8 * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    imgs, masks, boxes, labels = [], [], [], []
    for _ in range(b):
        n = int(rng.integers(0, 6))
        m = np.zeros((n, h, w), np.uint8)
        for i in range(n):
            x0, y0 = rng.integers(0, w - 1), rng.integers(0, h - 1)
            x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
            m[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
            m[i, y0, x0] = 1
        imgs.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        masks.append(m)
        boxes.append(np.array([tight(x) for x in m], np.float32).reshape(-1, 4))
        labels.append(rng.integers(1, 9, n))
    cfg = CopyPaste(bbox_occluded_thr=float(draw(st.integers(0, 6))), mask_occluded_thr=draw(st.integers(0, 40)))
    return imgs, masks, boxes, labels, seed, cfg


@settings(max_examples=60, deadline=None)
@given(batches())
def test_copy_paste_properties(data):
    imgs, masks, boxes, labels, seed, cfg = data
    ch = draw_choices(np.random.default_rng(seed), [len(m) for m in masks], cfg)
    oi, om, ob, ol, op = copy_paste(imgs, masks, boxes, labels, ch, cfg)
    again = copy_paste(imgs, masks, boxes, labels, draw_choices(np.random.default_rng(seed), [len(m) for m in masks], cfg), cfg)
    for b in range(len(imgs)):
        s = int(ch.src[b])
        assert s != b
        picks = ch.picks[b]
        alpha = masks[s][picks].any(0) if len(picks) else np.zeros(imgs[b].shape[:2], bool)
        np.testing.assert_array_equal(oi[b][~alpha], imgs[b][~alpha])
        np.testing.assert_array_equal(oi[b][alpha], imgs[s][alpha])
        assert len(om[b]) == len(ob[b]) == len(ol[b]) == len(op[b])
        for m, box in zip(om[b], ob[b]):
            assert m.any()
            assert box.tolist() == tight(m)
        n_dst = int((op[b] == 0).sum())
        assert not (om[b][:n_dst].astype(bool) & alpha).any()
        # the occlusion rule, recomputed here from its definition
        expected = []
        for j, m in enumerate(masks[b]):
            rem = m.astype(bool) & ~alpha
            if not rem.any():
                continue
            moved = np.abs(np.array(tight(rem)) - boxes[b][j]).max()
            if moved <= cfg.bbox_occluded_thr or rem.sum() > cfg.mask_occluded_thr:
                expected.append(j)
        assert n_dst == len(expected)
        for k, j in enumerate(expected):
            np.testing.assert_array_equal(om[b][k].astype(bool), masks[b][j].astype(bool) & ~alpha)
            assert ol[b][k] == labels[b][j]
        np.testing.assert_array_equal(ol[b][n_dst:], labels[s][picks])
        np.testing.assert_array_equal(om[b][n_dst:], masks[s][picks])
        # same seed, same result
        for x, y in zip(again, (oi, om, ob, ol, op)):
            np.testing.assert_array_equal(x[b], y[b])
    # the CPU fast path gives exactly the reference's result (its masks are packed, padded to the batch max)
    wi, wm, wb, wl, wp = copy_paste_packed(imgs, [np.packbits(m, axis=-1) for m in masks], boxes, labels, ch, cfg)
    wm = [np.unpackbits(m, axis=-1) for m in wm]
    nmax = max(len(x) for x in om)
    for b in range(len(imgs)):
        np.testing.assert_array_equal(wi[b], oi[b])
        assert wm[b].shape[0] == nmax and not wm[b][len(om[b]):].any()
        np.testing.assert_array_equal(wm[b][: len(om[b])], om[b])
        np.testing.assert_array_equal(wb[b], ob[b])
        np.testing.assert_array_equal(wl[b], ol[b])
        np.testing.assert_array_equal(wp[b], op[b])
    # and so does the GPU form, on NumPy and through the CuPy stand-in
    for form in (gpu_form, standin_form):
        for x, y in zip(form(imgs, masks, boxes, labels, ch, cfg), (oi, om, ob, ol, op)):
            for b in range(len(imgs)):
                np.testing.assert_array_equal(x[b], y[b])


def test_choices_follow_the_recipe():
    rng = np.random.default_rng(0)
    for n in range(2, 9):
        p = derangement(rng, n)
        assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))
    ks = [len(draw_choices(rng, [3, 3], CFG).picks[0]) for _ in range(400)]
    assert set(ks) == {0, 1, 2, 3}  # k ~ U{0..min(n, max_num_pasted - 1)}, mmdetection's randint(0, min(n + 1, max))
    assert max(len(draw_choices(rng, [50, 50], CopyPaste(max_num_pasted=4)).picks[0]) for _ in range(100)) == 3
    assert max(len(draw_choices(rng, [4, 4], CopyPaste(max_num_pasted=4)).picks[0]) for _ in range(100)) == 3
    assert all(len(draw_choices(rng, [5, 5], CopyPaste(paste_prob=0.0)).picks[0]) == 0 for _ in range(20))
    single = draw_choices(rng, [4], CFG)
    assert single.src.tolist() == [-1] and len(single.picks[0]) == 0


def packed_impl(images, masks, *rest):
    return copy_paste_packed(images, [np.packbits(m, axis=-1) for m in masks], *rest)


@pytest.mark.parametrize("impl", [copy_paste, packed_impl, gpu_form])
def test_blending_mixes_only_near_the_alpha_edge(impl):
    h, w = 40, 40
    src_img, dst_img = np.full((h, w, 3), 200, np.uint8), np.full((h, w, 3), 0, np.uint8)
    src_m = np.zeros((1, h, w), np.uint8)
    src_m[0, 10:30, 10:30] = 1
    out = impl([dst_img, src_img], [np.zeros((0, h, w), np.uint8), src_m],
                     [np.zeros((0, 4), np.float32), np.array([[10, 10, 30, 30]], np.float32)],
                     [np.zeros(0, int), np.array([1])], Choices(np.array([1, 0]), [np.array([0]), np.zeros(0, int)]),
                     CopyPaste(blend_sigma=2.0))[0][0]
    assert 190 <= out[20, 20, 0] <= 200 and out[0, 0, 0] == 0
    assert 20 < out[20, 10, 0] < 180  # the edge is blended


def test_ssj_scp_pastes_objects_where_their_masks_say(syn_train, syn_ann):
    """Every object of a ssj_scp batch - kept or pasted - shows its own colour under its mask, and the
    pasted ones cover their colour's pixels (independent of the pipeline's own bookkeeping)."""
    from geometry_truth import dominant_colour, iou, object_pixels
    from dali_scp.synthetic import PALETTE
    from dali_scp.presets import pipeline_preset
    from pipelines.iterator import CocoLoader
    loader = CocoLoader(pipeline_preset("ssj_scp", out_size=384), syn_train, batch_size=6, seed=4)
    images, targets = next(iter(loader))
    n_pasted = checked = 0
    for img, t in zip(images.numpy(), targets):
        masks, pasted = t["masks"].numpy(), t["pasted"].numpy()
        n_pasted += int(pasted.sum())
        for m, p in zip(masks, pasted):
            if m.sum() < 64:
                continue
            c = dominant_colour(img, m)
            dist = np.abs(PALETTE.astype(int) - c).max(1)
            assert dist.min() <= 36, "pixels under a mask are not an object's colour: misplaced"
            if p and m.sum() >= 48 * 48:
                truth = object_pixels(img, PALETTE[dist.argmin()])
                ys, xs = np.nonzero(m)
                win = (slice(max(ys.min() - 4, 0), ys.max() + 5), slice(max(xs.min() - 4, 0), xs.max() + 5))
                assert iou(m[win], truth[win]) >= 0.9
                checked += 1
    assert n_pasted > 0 and checked > 0


def test_gpu_stage_form_equals_cpu_stage_form_on_pipeline_batches(syn_train):
    """The stage's GPU form, run here with NumPy and through the CuPy stand-in, gives exactly what the
    CPU packed form gives on real rasterised batches - so the GPU run differs from CI's only by the
    array library."""
    from dali_scp.presets import pipeline_preset
    from pipelines.iterator import CocoLoader
    images, targets = next(iter(CocoLoader(pipeline_preset("ssj", out_size=256), syn_train, batch_size=6, seed=2)))
    imgs = list(images.numpy())
    masks = [np.packbits(t["masks"].numpy(), axis=-1) for t in targets]
    nmax = max(len(m) for m in masks)
    masks = [np.concatenate([m, np.zeros((nmax - len(m),) + m.shape[1:], np.uint8)]) for m in masks]
    boxes = [t["boxes"].numpy() for t in targets]
    labels = [t["cat_ids"].numpy().astype(np.int32) for t in targets]
    ch = draw_choices(np.random.default_rng(5), [len(x) for x in labels], CFG)
    a = copy_paste_packed(imgs, masks, boxes, labels, ch, CFG)
    b = copy_paste_packed_batched(imgs, masks, boxes, labels, ch, CFG, np)
    xp = StandIn()
    c = copy_paste_packed_batched(*[[xp.asarray(x) for x in xs] for xs in (imgs, masks, boxes, labels)], ch, CFG, xp)
    assert sum(len(x) for x in a[3]) > sum(len(x) for x in labels) // 2
    assert sum(int(x.sum()) for x in a[4]) > 0  # something was pasted
    for x, y, z in zip(a, b, c):
        for u, v, w in zip(x, y, z):
            np.testing.assert_array_equal(u, v)
            np.testing.assert_array_equal(u, w.get())


def test_stages_take_the_same_decisions_on_the_gpu_branch():
    """The two DALI stages, called as DALI calls them, with device arrays (the CuPy stand-in) and with
    NumPy: same masks, boxes, ids, pasted flags and images for the same seed and batch counter."""
    from pipelines.gpu_budget import coco_like_batch
    from pipelines.stages import CopyPasteStage, RasterizeStage
    b = coco_like_batch(4, 10, 128, seed=1)
    xp = StandIn()
    dev = lambda xs: [xp.asarray(x) for x in xs]  # noqa: E731
    cpu_m = RasterizeStage(128, 128)(b.polygons, b.vertices, b.cat_ids)
    gpu_m = RasterizeStage(128, 128)(dev(b.polygons), dev(b.vertices), dev(b.cat_ids))
    for x, y in zip(cpu_m, gpu_m):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v.get())
    cpu = CopyPasteStage(CFG, seed=3, start_batch=5)(b.images, *cpu_m)
    gpu = CopyPasteStage(CFG, seed=3, start_batch=5)(dev(b.images), *gpu_m)
    assert sum(int(p.sum()) for p in cpu[4]) > 0
    for x, y in zip(cpu, gpu):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v.get())


def test_dataloader_baseline_follows_the_same_contract():
    """The baseline's collate (torchvision-reference style, in torch) draws with ``draw_choices`` and gives
    the reference's result: the speed comparison is between two implementations of one semantics."""
    import torch
    from pipelines.baseline import CopyPasteCollate
    from pipelines.gpu_budget import coco_like_batch
    from dali_scp.raster import rasterize_batch
    b = coco_like_batch(4, 8, 96, seed=2)
    masks, boxes, kept = rasterize_batch(b.polygons, b.vertices, [len(x) for x in b.cat_ids], 96, 96)
    masks = [m[: len(k)] for m, k in zip(masks, kept)]
    labels = [lab[k].astype(np.int64) for lab, k in zip(b.cat_ids, kept)]
    batch = [(torch.from_numpy(img).permute(2, 0, 1), dict(boxes=torch.from_numpy(bx), labels=torch.from_numpy(lab),
                                                          masks=torch.from_numpy(m), image_id=i))
             for i, (img, bx, lab, m) in enumerate(zip(b.images, boxes, labels, masks))]
    images, targets = CopyPasteCollate(CFG, seed=9)(batch)
    ch = draw_choices(np.random.default_rng(9), [len(x) for x in labels], CFG)
    ref = copy_paste(b.images, masks, boxes, labels, ch, CFG)
    assert sum(int(p.sum()) for p in ref[4]) > 0
    for i, t in enumerate(targets):
        np.testing.assert_array_equal(images[i].permute(1, 2, 0).numpy(), ref[0][i])
        np.testing.assert_array_equal(t["masks"].numpy(), ref[1][i])
        np.testing.assert_array_equal(t["boxes"].numpy(), ref[2][i])
        np.testing.assert_array_equal(t["labels"].numpy(), ref[3][i])
