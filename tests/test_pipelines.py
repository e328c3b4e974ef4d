"""Geometry of the DALI pipelines (CPU) against ground truth recovered from the augmented images."""
import json
from dataclasses import replace

import numpy as np
import pytest

from dali_scp.presets import Jitter, PipelinePreset, pipeline_preset
from geometry_truth import iou, off_edge_disagreement, visible_core, match_annotation, object_pixels, tight_box
from pipelines.iterator import CocoLoader

OUT = 384  # a smaller canvas keeps CI fast; geometry is size-independent


def batches(name, split, n_batches=2, batch_size=6, seed=0, **kw):
    preset = pipeline_preset(name, out_size=OUT) if isinstance(name, str) else name
    loader = CocoLoader(preset, split, batch_size=batch_size, seed=seed, **kw)
    out = []
    for k, (images, targets) in enumerate(loader):
        out.append((images.numpy(), [{kk: (v.numpy() if hasattr(v, "numpy") else v) for kk, v in t.items()}
                                     for t in targets]))
        if k + 1 == n_batches:
            break
    return out, loader


@pytest.mark.parametrize("name", ["none", "ssj", "lsj"])
def test_masks_follow_the_image(name, syn_train, syn_ann):
    data, loader = batches(name, syn_train, seed=1)
    lut = syn_train.label_to_cat()
    checked = flipped = 0
    for images, targets in data:
        for img, t in zip(images, targets):
            im, anns = syn_ann[t["image_id"]]
            assert len(t["labels"]) == len(t["masks"]) == len(t["boxes"])
            found = set()
            for m, box, lab, cat in zip(t["masks"], t["boxes"], t["labels"], t["cat_ids"]):
                assert m.any(), "empty masks must be dropped"
                np.testing.assert_allclose(box, tight_box(m), atol=1.0)
                a = match_annotation(img, m, anns)
                if a is None and m.sum() < 64:
                    continue  # a few pixels of blended edge: too small to tell its colour
                assert a is not None, "a mask shows no object colour: it is misplaced"
                assert a["category_id"] == cat == lut[lab], "category ids must round-trip"
                truth = object_pixels(img, a["colour"])
                found.add(a["id"])
                if truth.sum() >= 48 * 48:
                    where = (name, t["image_id"], a["id"], iou(m, truth))
                    assert iou(m, truth) >= 0.9 and off_edge_disagreement(m, truth) <= 0.01, where
                    checked += 1
            # every object visible in the augmented image has a mask (multi-part objects: all parts)
            for a in anns:
                if a["iscrowd"] or a["id"] in found:
                    continue
                assert visible_core(img, a["colour"]).sum() < 20, f"object {a['id']} visible but has no mask"
            flipped += int(t["geometry"][3])
    assert checked > 5
    assert 0 < flipped < sum(len(t) for _, t in data), "flip p=0.5 should flip some, not all"


def test_images_are_scaled_by_the_preset_range(syn_train):
    for name, (lo, hi) in (("ssj", (0.8, 1.25)), ("lsj", (0.1, 2.0))):
        data, _ = batches(name, syn_train, n_batches=3, seed=2)
        for images, targets in data:
            for img, t in zip(images, targets):
                r, vh, vw = t["geometry"][:3]
                assert vh <= OUT and vw <= OUT
                # the image content ends at the valid region, the rest is padding
                assert img[int(vh):, :].max(initial=0) == 0 and img[:, int(vw):].max(initial=0) == 0
                assert img[: int(vh), : int(vw)].mean() > 30
                s_fit = OUT / max(syn_train_size(t["image_id"], syn_train))
                assert lo - 1e-3 <= r / s_fit <= hi + 1e-3


_sizes = {}


def syn_train_size(image_id, split):
    if not _sizes:
        for im in json.loads(split.annotations.read_text())["images"]:
            _sizes[im["id"]] = (im["width"], im["height"])
    return _sizes[image_id]


def test_multi_part_objects_keep_every_part(syn_train, syn_ann):
    data, _ = batches("none", syn_train, n_batches=4, seed=0)
    seen = 0
    for images, targets in data:
        for img, t in zip(images, targets):
            anns = syn_ann[t["image_id"]][1]
            for m in t["masks"]:
                a = match_annotation(img, m, anns)
                if a is None or len(a["segmentation"]) < 2:
                    continue
                from scipy.ndimage import label
                assert label(m)[1] >= 2, "a two-part object lost a part"
                seen += 1
    assert seen > 0


def test_empty_images_and_everything_cropped_away_pass_through(tmp_path):
    """One object covers the top-left quarter; a 4x zoom keeps a random 1/16, often without it. Read in
    file order: training's shuffled order skips the two images without annotations."""
    from PIL import Image, ImageDraw
    from dali_scp.dataset import resolve
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, 9):
        im = Image.new("RGB", (200, 200), (120, 120, 120))
        if i > 2:  # images 1-2 have no objects at all
            ImageDraw.Draw(im).rectangle([10, 10, 89, 89], fill=(255, 0, 0))
            anns.append(dict(id=i, image_id=i, category_id=5, iscrowd=0, area=6400, bbox=[10, 10, 80, 80],
                             segmentation=[[10, 10, 90, 10, 90, 90, 10, 90]]))
        im.save(tmp_path / "train2017" / f"{i}.jpg")
        images.append(dict(id=i, file_name=f"{i}.jpg", width=200, height=200))
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(
        dict(images=images, annotations=anns, categories=[dict(id=5, name="box")])))
    split = resolve(tmp_path)
    preset = PipelinePreset("zoom", Jitter(out_size=64, scale_range=(4.0, 4.0)))
    counts = []
    for seed in range(3):
        for p in ("zoom", "zoom_scp"):
            pr = preset if p == "zoom" else replace(preset, copy_paste=pipeline_preset("ssj_scp").copy_paste)
            data, _ = batches(pr, split, n_batches=1, batch_size=8, seed=seed, shuffle=False)
            for images, targets in data:
                assert images.shape == (8, 64, 64, 3)
                counts += [len(t["labels"]) for t in targets]
                for t in targets:
                    assert t["masks"].shape[1:] == (64, 64)
    assert 0 in counts and max(counts) >= 1


def test_same_seed_same_batches_and_other_seed_differs(syn_train):
    a, _ = batches("ssj_scp", syn_train, n_batches=2, seed=7)
    b, _ = batches("ssj_scp", syn_train, n_batches=2, seed=7)
    c, _ = batches("ssj_scp", syn_train, n_batches=2, seed=8)
    for (ia, ta), (ib, tb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        for x, y in zip(ta, tb):
            np.testing.assert_array_equal(x["masks"], y["masks"])
            np.testing.assert_array_equal(x["boxes"], y["boxes"])
    assert not np.array_equal(a[0][0], c[0][0])


def test_shards_are_disjoint_and_cover_the_dataset(syn_train):
    n_images = len(json.loads(syn_train.annotations.read_text())["images"])
    seen = []
    for shard in range(2):
        loader = CocoLoader(pipeline_preset("none", out_size=64), syn_train, batch_size=4, shuffle=False,
                            shard_id=shard, num_shards=2)
        ids = [t["image_id"] for _, targets in loader for t in targets]
        assert len(ids) == len(set(ids))
        seen.append(set(ids))
    assert not (seen[0] & seen[1])
    assert len(seen[0] | seen[1]) == n_images


@pytest.mark.parametrize("stage", ["masks", "copy_paste"])
def test_an_error_inside_a_stage_reaches_the_caller_as_one_named_error(stage, syn_root):
    """An exception in a custom stage must come out of the iterator as StageFailed naming the stage,
    the batch and the original error, and no batch built from the failed stage's empty stand-in
    outputs may reach the caller (tests/test_gpu.py runs the same on the GPU)."""
    from stage_failure import run_probe
    p = run_probe(syn_root, "cpu", stage)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert f"CAUGHT the {stage} stage failed on batch 0: ValueError: planted failure" in p.stdout, p.stdout


def test_outputs_are_named_once_and_geometry_reads_the_vector():
    from pipelines.outputs import OUTPUTS, Geometry, ordered
    outs = {n: i for i, n in enumerate(OUTPUTS)}
    assert ordered(OUTPUTS, **dict(reversed(outs.items()))) == tuple(range(len(OUTPUTS)))
    with pytest.raises(ValueError):
        ordered(OUTPUTS, images=0)
    g = Geometry.from_row(np.array([1.25, 300.0, 256.0, 1.0], np.float32))
    assert g == (1.25, 300, 256, True, 0, 0) and g.valid_h == 300 and g.flipped  # evaluation's 4-vector
    g = Geometry.from_row(np.array([1.25, 300.0, 256.0, 0.0, 17.0, 3.0], np.float32))
    assert g == (1.25, 300, 256, False, 17, 3) and g.crop_y == 17 and g.crop_x == 3


def test_each_pipeline_times_its_own_stages(syn_train):
    """Two pipelines in one process: the one that ran has the time, the other none (no shared dict)."""
    from pipelines import coco
    ran, idle = [], []
    a = coco.build("ssj_scp", syn_train, batch_size=2, out_size=128, stages=ran)
    coco.build("ssj_scp", syn_train, batch_size=2, out_size=128, stages=idle)
    a.run()
    a.run()
    assert [s.name for s in ran] == [s.name for s in idle] == ["resample", "masks", "copy_paste"]
    assert all(s.calls >= 2 and s.seconds > 0 for s in ran)
    assert all(s.calls == 0 and s.seconds == 0 for s in idle)


def test_a_stage_that_failed_mid_write_starts_the_next_batch_from_zeros(monkeypatch):
    """The CPU copy-paste stage reuses one zeroed mask buffer (it re-zeroes only the windows it wrote);
    a failure after writing into it must not leak those pixels into the next batch's masks."""
    import pipelines.stages as st
    from dali_scp.presets import CopyPaste
    from pipelines.gpu_budget import coco_like_batch
    b = coco_like_batch(3, 8, 64, 0)
    masks, boxes, cats = st.RasterizeStage(64, 64)(b.polygons, b.vertices, b.cat_ids)
    inputs = (b.images, masks, boxes, cats)
    fresh = st.CopyPasteStage(CopyPaste(), seed=1)(*inputs)
    stage = st.CopyPasteStage(CopyPaste(), seed=1)
    real = st.copy_paste_packed

    def dirty_then_fail(*a):
        a[6][...] = 1  # out
        raise ValueError("planted failure")
    monkeypatch.setattr(st, "copy_paste_packed", dirty_then_fail)
    stage(*inputs)
    with pytest.raises(st.StageFailed, match="planted failure"):
        st.raise_if_failed()
    monkeypatch.setattr(st, "copy_paste_packed", real)
    stage.batch = 0  # the same random draws as ``fresh``
    again = stage(*inputs)
    assert sum(len(x) for x in fresh[3]) > 0
    for x, y in zip(fresh[1], again[1]):
        np.testing.assert_array_equal(x, y)