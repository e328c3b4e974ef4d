"""The data the r50_ssj_scp recipes train on, against mmdetection's own SSJ + copy-paste train pipeline.

``scripts/mmdet_ssj_reference.py`` ran the seed config's pipeline (``MultiImageMixDataset`` with LoadImageFromFile,
LoadAnnotations, RandomResize 1024^2 x 0.8-1.25, RandomCrop 1024^2, FilterAnnotations, RandomFlip, Pad, then
CopyPaste) in mmdetection 3.3 itself, 2,090 samples of a 200-image synthetic COCO-like set, and recorded per
sample and per object what mmdetection recorded (``tests/data/mmdet_ssj_scp_stats.npz``). Here the ``ssj_scp``
pipeline draws ``SAMPLES`` samples of the same images (made again from the same generator arguments, checked by
the digest of the annotation file) and every distribution is compared by a two-sample Kolmogorov-Smirnov test
at p >= 0.01. The geometry of each sample is what the pipeline emits (``Geometry``), mmdetection's is what its
``results`` recorded (``scale_factor``, ``homography_matrix``, ``flip``).

Where we differ by design (docs/pipelines.md "Against mmdetection's pipeline"): the copy-paste source is another
sample of the batch (mmdetection draws one image of the dataset at random); crowd regions are no targets and
are not pasted (mmdetection carries them as ignored instances, pastes them and lets them occlude). Neither
moves a distribution here beyond the test's resolution.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from reference_files import load_reference
from scipy.stats import ks_2samp

REF = Path(__file__).parent / "data" / "mmdet_ssj_scp_stats.npz"
SAMPLES = 1140      # 6 passes over the 190 trained images; mmdetection's reference has 2,090 (11 passes)
BATCH = 10
P_MIN = 0.01


@pytest.fixture(scope="module")
def reference():
    return load_reference(REF)


def reference_images(info, root: Path):
    """The reference's synthetic set, made again under ``root``: its training split."""
    from dali_scp.dataset import resolve
    from dali_scp.synthetic import generate
    generate(root, **info["dataset"])
    ann = root / "annotations" / "instances_train2017.json"
    assert hashlib.sha256(ann.read_bytes()).hexdigest() == info["annotation_sha256"], (
        "the synthetic generator now makes other images than the reference was made on: rerun "
        "scripts/mmdet_ssj_reference.py in the mmdetection side venv")
    return resolve(root)


def draw(split, pipeline="ssj_scp", samples=SAMPLES, seed=0) -> dict:
    """Per-sample geometry and counts, per-object sizes of ``samples`` training samples, as the trainer reads
    them (``CocoLoader``, shuffled, infinite; ``pipeline``: a name or a PipelinePreset)."""
    from pipelines.iterator import CocoLoader
    sizes = {im["id"]: (im["height"], im["width"]) for im in json.loads(split.annotations.read_text())["images"]}
    loader = CocoLoader(pipeline, split, batch_size=BATCH, seed=seed, out_size=1024, infinite=True, num_threads=2)
    per_sample = {k: [] for k in ("image_id", "scale", "crop_h", "crop_w", "crop_y", "crop_x", "flip", "n_kept",
                                  "n_pasted", "ori_h", "ori_w")}
    obj = {k: [] for k in ("w", "h", "mask_area", "pasted")}
    it = iter(loader)
    for _ in range(samples // BATCH):
        _, targets = next(it)
        for t in targets:
            g, pasted = t["geometry"], t["pasted"].numpy().astype(bool)
            boxes = t["boxes"].numpy()
            h, w = sizes[t["image_id"]]
            for k, v in (("image_id", t["image_id"]), ("scale", g.scale), ("crop_h", g.valid_h), ("crop_w", g.valid_w),
                         ("crop_y", g.crop_y), ("crop_x", g.crop_x), ("flip", g.flipped), ("n_kept", (~pasted).sum()),
                         ("n_pasted", pasted.sum()), ("ori_h", h), ("ori_w", w)):
                per_sample[k].append(v)
            obj["w"].append(boxes[:, 2] - boxes[:, 0])
            obj["h"].append(boxes[:, 3] - boxes[:, 1])
            m = t["masks"].numpy()
            obj["mask_area"].append(np.count_nonzero(m.reshape(len(m), -1), axis=1))
            obj["pasted"].append(pasted)
    out = {k: np.array(v, np.float64) for k, v in per_sample.items()}
    out.update({f"object_{k}": np.concatenate(v).astype(np.float64) for k, v in obj.items()})
    return out


@pytest.fixture(scope="module")
def ours(reference, tmp_path_factory):
    """The ssj_scp pipeline's samples on the reference's images, in training order (seed 0)."""
    return draw(reference_images(reference["info"], tmp_path_factory.mktemp("ssj_stats")))


def long_side_scale(ref):
    """mmdetection's scale_factor of the long side (= the sampled square's side / the long side; the short
    side's is rounded to whole pixels) - what Geometry.scale is."""
    return np.where(ref["sample_ori_w"] >= ref["sample_ori_h"], ref["sample_scale_x"], ref["sample_scale_y"])


def test_the_reference_is_mmdetections_pipeline_on_the_images_we_train(reference, ours):
    info = reference["info"]
    assert info["pipeline"] == ["LoadImageFromFile", "LoadAnnotations", "RandomResize", "RandomCrop",
                                "FilterAnnotations", "RandomFlip", "Pad", "CopyPaste", "PackDetInputs"]
    assert info["versions"]["mmdet"] == "3.3.0"
    # mmdetection trains the images that have annotations (filter_empty_gt); so do we, each as often
    assert set(np.unique(ours["image_id"])) == set(np.unique(reference["sample_image_id"]))
    assert len(np.unique(ours["image_id"])) == info["images"] == 190
    assert np.all(np.unique(ours["image_id"], return_counts=True)[1] == SAMPLES // info["images"])
    assert len(ours["scale"]) == SAMPLES >= 1000 and len(reference["sample_scale_x"]) >= 2000


@pytest.mark.parametrize("name", ["resize scale", "crop height", "crop width", "crop offset y", "crop offset x",
                                  "flip", "objects kept per image", "objects pasted per image"])
def test_per_sample_distributions_match_mmdetection(name, reference, ours):
    mine, theirs = {
        "resize scale": (ours["scale"], long_side_scale(reference).astype(np.float32)),
        "crop height": (ours["crop_h"], reference["sample_crop_h"]),
        "crop width": (ours["crop_w"], reference["sample_crop_w"]),
        "crop offset y": (ours["crop_y"], reference["sample_crop_y"]),
        "crop offset x": (ours["crop_x"], reference["sample_crop_x"]),
        "flip": (ours["flip"], reference["sample_flip"]),
        "objects kept per image": (ours["n_kept"], reference["sample_n_kept"]),
        "objects pasted per image": (ours["n_pasted"], reference["sample_n_pasted"]),
    }[name]
    res = ks_2samp(mine, theirs)
    assert res.pvalue >= P_MIN, (f"{name}: KS D = {res.statistic:.4f}, p = {res.pvalue:.2g}; means ours "
                                 f"{np.mean(mine):.4g}, mmdetection {np.mean(theirs):.4g}")


@pytest.mark.parametrize("name", ["box width", "box height", "box area", "mask area"])
@pytest.mark.parametrize("which", ["all", "kept", "pasted"])
def test_per_object_distributions_match_mmdetection(name, which, reference, ours):
    def values(src, prefix):
        w, h, area = (src[f"{prefix}{k}"].astype(np.float64) for k in ("w", "h", "mask_area"))  # stored as uint16/32
        v = {"box width": w, "box height": h, "box area": w * h, "mask area": area}[name]
        pasted = src[f"{prefix}pasted"].astype(bool)
        return v if which == "all" else v[pasted] if which == "pasted" else v[~pasted]
    mine, theirs = values(ours, "object_"), values(reference, "object_")
    assert len(mine) > 5000 and len(theirs) > 5000
    res = ks_2samp(mine, theirs)
    assert res.pvalue >= P_MIN, (f"{name} ({which} objects): KS D = {res.statistic:.4f}, p = {res.pvalue:.2g}; "
                                 f"medians ours {np.median(mine):.4g}, mmdetection {np.median(theirs):.4g}")


def resized(ori_h, ori_w, scale):
    """mmcv's rescale_size: the sampled side over the long side, then int(x * r + 0.5) per axis (float64)."""
    side = np.round(scale * np.maximum(ori_h, ori_w))
    r = side / np.maximum(ori_h, ori_w)
    return np.floor(ori_h * r + 0.5), np.floor(ori_w * r + 0.5)


def test_crop_offsets_reach_the_margin_as_mmdetections_do(reference, ours):
    """RandomCrop's offset is numpy's randint(0, margin + 1): the margin itself is a possible offset (a
    floor(u * margin) rule never reaches it). Read off mmdetection's own samples, then ours; and the crop is
    min(resized, 1024) on both sides."""
    for src, scale in ((reference, long_side_scale(reference)), (ours, ours["scale"])):
        pre = "sample_" if src is reference else ""
        new_h, new_w = resized(src[f"{pre}ori_h"], src[f"{pre}ori_w"], scale)
        crop_h, crop_w, y, x = (src[f"{pre}{k}"] for k in ("crop_h", "crop_w", "crop_y", "crop_x"))
        assert np.array_equal(crop_h, np.minimum(new_h, 1024)) and np.array_equal(crop_w, np.minimum(new_w, 1024))
        margin_h, margin_w = new_h - crop_h, new_w - crop_w
        assert np.all((0 <= y) & (y <= margin_h) & (0 <= x) & (x <= margin_w))
        assert np.sum((x == margin_w) & (margin_w > 0)) + np.sum((y == margin_h) & (margin_h > 0)) >= 3


def test_a_one_pixel_margin_is_cropped_at_both_offsets_as_the_image_shows(tmp_path):
    """Independent ground truth for the crop rule: 65 x 65 noise images at a fixed scale of 65/64 on a 64^2
    canvas are resized by exactly 1 (a pure crop), with a margin of one pixel on each axis. mmdetection's
    randint(0, margin + 1) takes offset 0 and 1 equally often; the offset and flip the output image shows
    (found by matching it against the stored image) must be the ones Geometry reports."""
    from PIL import Image
    from dali_scp.dataset import resolve
    from dali_scp.presets import Jitter, PipelinePreset
    from pipelines.iterator import CocoLoader
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    rng = np.random.default_rng(5)
    pixels, images, anns = {}, [], []
    for i in range(1, 7):
        pixels[i] = rng.integers(0, 256, (65, 65, 3), dtype=np.uint8)
        Image.fromarray(pixels[i]).save(tmp_path / "train2017" / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", width=65, height=65))
        anns.append(dict(id=i, image_id=i, category_id=1, iscrowd=0, area=400.0, bbox=[20, 20, 20, 20],
                         segmentation=[[20, 20, 40, 20, 40, 40, 20, 40]]))
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(
        dict(images=images, annotations=anns, categories=[dict(id=1, name="square")])))
    preset = PipelinePreset("crop1", Jitter(out_size=64, scale_range=(65 / 64, 65 / 64)))
    loader = CocoLoader(preset, resolve(tmp_path), batch_size=6, seed=3, infinite=True, num_threads=1)
    it = iter(loader)
    seen = []
    for _ in range(8):
        out, targets = next(it)
        for img, t in zip(out.numpy(), targets):
            g = t["geometry"]
            assert (g.scale, g.valid_h, g.valid_w) == (1.0, 64, 64)
            src = pixels[t["image_id"]].astype(np.int16)
            err = {}
            for oy in (0, 1):
                for ox in (0, 1):
                    for flip in (False, True):
                        crop = src[oy:oy + 64, ox:ox + 64]
                        err[oy, ox, flip] = np.abs(img.astype(np.int16) - (crop[:, ::-1] if flip else crop)).mean()
            best = min(err, key=err.get)
            assert err[best] < 0.5 < sorted(err.values())[1], err
            assert best == (g.crop_y, g.crop_x, g.flipped), (best, g)
            seen.append(best)
    seen = np.array(seen, np.int64)
    for axis, name in ((0, "y"), (1, "x")):
        assert 12 <= seen[:, axis].sum() <= 36, f"offset {name} = 1 in {seen[:, axis].sum()} of 48 samples"
