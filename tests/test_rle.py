"""Non-crowd RLE objects are training targets: the check turns them into rectangles whose union is the
mask exactly, and the pipelines give them the masks the same objects get as polygons."""
import json

import numpy as np
import pytest

from dali_scp import rle
from dali_scp.check import check
from dali_scp.dataset import resolve
from dali_scp.presets import pipeline_preset
from dali_scp.raster import rasterize_flat
from geometry_truth import iou
from pipelines.iterator import CocoLoader
from quirks import _mask, encode_rle


@pytest.fixture(scope="module")
def rle_root(syn_root, tmp_path_factory):
    """The synthetic train split with every non-crowd object stored as RLE (compressed and uncompressed
    counts alternating), same images."""
    root = tmp_path_factory.mktemp("rle")
    (root / "train2017").symlink_to(syn_root / "train2017", target_is_directory=True)
    (root / "annotations").mkdir()
    doc = json.loads((syn_root / "annotations" / "instances_train2017.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    for k, a in enumerate(doc["annotations"]):
        if not a["iscrowd"]:
            a["segmentation"] = encode_rle(_mask(a["segmentation"], *sizes[a["image_id"]]), compressed=k % 2 == 0)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return root


def test_rectangles_reproduce_the_mask_exactly():
    rng = np.random.default_rng(0)
    for k in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        for seg in (encode_rle(m, True), encode_rle(m, False)):
            polys = rle.to_polygons(seg, h, w)
            np.testing.assert_array_equal(rle.to_mask(seg, h, w), m)
            if not polys:
                assert not m.any()
                continue
            verts = np.asarray(polys, np.float64).reshape(-1, 2)
            p = len(polys)
            masks, _, _ = rasterize_flat(np.zeros(p, int), np.arange(p) * 4, np.arange(p) * 4 + 4, verts, 1, h, w)
            np.testing.assert_array_equal(masks[0], m)


def test_the_check_keeps_rle_objects_and_reports_malformed_ones(rle_root, tmp_path):
    rep, filtered = check(rle_root / "annotations" / "instances_train2017.json", rle_root / "train2017",
                          progress=False)
    doc = json.loads((rle_root / "annotations" / "instances_train2017.json").read_text())
    non_crowd = [a for a in doc["annotations"] if not a["iscrowd"]]
    assert not rep.defects and rep.converted_rle == len(non_crowd)
    assert all(isinstance(a["segmentation"], list) for a in filtered["annotations"] if not a["iscrowd"])
    h, w = 4, 5
    for seg, why in (({"size": [h, w], "counts": [3, 2]}, "cover 5 pixels"),
                     ({"size": [h, w + 1], "counts": [24]}, "differs from the image"),
                     ({"size": [h, w], "counts": "0!"}, "malformed RLE counts")):
        with pytest.raises(ValueError, match=why):
            rle.to_polygons(seg, h, w)
    assert rle.to_polygons({"size": [h, w], "counts": [20]}, h, w) == []  # empty: the check reports it


@pytest.mark.parametrize("name", ["none", "ssj"])
def test_rle_objects_get_the_masks_of_the_same_objects_as_polygons(name, syn_root, rle_root):
    preset = pipeline_preset(name, out_size=384)
    runs = []
    for root in (syn_root, rle_root):
        loader = CocoLoader(preset, resolve(root), batch_size=6, shuffle=False, seed=5)
        runs.append([b for _, b in zip(range(2), loader)])
    compared = 0
    for (ia, ta), (ib, tb) in zip(*runs):
        np.testing.assert_array_equal(ia.numpy(), ib.numpy())  # same images, same geometry
        for a, b in zip(ta, tb):
            assert a["image_id"] == b["image_id"]
            for m in a["masks"].numpy():
                if m.sum() < 32 * 32:  # smaller objects: pycocotools' boundary rule differs by a pixel
                    continue
                best = max((iou(m, r) for r in b["masks"].numpy()), default=0.0)
                assert best >= 0.95, (a["image_id"], best)
                compared += 1
    assert compared >= 10


def test_bulk_run_totals_agree_with_rle_runs():
    """evaluation validates 500,000 result masks with the bulk decoder: it must accept exactly what
    rle_runs accepts (valid characters, no cut-off number, no negative run) with the same totals, on
    pycocotools' own strings and on broken ones (cut, a character changed or appended, random)."""
    import random
    from pycocotools import mask as mask_utils
    from dali_scp.rle import compressed_run_totals, rle_runs
    rng, pick = np.random.default_rng(0), random.Random(0)
    good = []
    for _ in range(200):
        h, w = rng.integers(1, 60, 2)
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        good.append(mask_utils.encode(np.asfortranarray(m))["counts"].decode())
    alphabet = [chr(c) for c in range(40, 120)]
    broken = []
    for i in range(2000):
        s = pick.choice(good)
        j = int(rng.integers(len(s) + 1))
        broken.append([s[:j], s[:j] + pick.choice(alphabet) + s[j + 1:], s + pick.choice(alphabet),
                       "".join(pick.choice(alphabet) for _ in range(int(rng.integers(12))))][i % 4])
    strings = good + broken + ["", "é0", "0"]
    totals, ok = compressed_run_totals(strings, chunk_chars=997)  # chunks end inside the list
    assert ok[:len(good)].all() and not ok.all()
    for s, t, o in zip(strings, totals, ok):
        try:
            runs = rle_runs(s)
        except ValueError:
            assert not o, s
            continue
        assert o == all(r >= 0 for r in runs), s
        if o:
            assert t == sum(runs), s
