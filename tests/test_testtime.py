"""The test-time path against mmdetection's own test (``trainer.evaluate`` with ``--resize opencv``).

``tests/data/mmdet_testtime.npz`` was written by ``scripts/mmdet_testtime.py reference`` in the side venv
(mmdetection 3.3, OpenCV): two JPEGs, one shrunk and one enlarged by the keep-ratio test resize (at a
small scale, 320 x 192, the same code path as 1333 x 800 within a test's budget), the pixels mmdetection's
``LoadImageFromFile`` decoded and its ``Resize`` made, and the detections of ``scripts/mmdet_reference.py``'s
seeded checkpoint from one batch of both, at the original image size. Here the same JPEGs go through
``trainer.evaluate.predict`` (DALI decode, resize, pad, normalise, model, boxes and masks back at the
original size). The whole-size comparison with trained weights is in docs/checkpoints.md.
"""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_files import load_reference, seeded_mmdet_checkpoint
from dali_scp.dataset import resolve
from dali_scp.presets import EvalResize, recipe
from trainer import evaluate as ev
from trainer import import_weights

ROOT = Path(__file__).resolve().parents[1]
REF = np.load(ROOT / "tests" / "data" / "mmdet_testtime.npz")
INFO = json.loads(str(REF["info"]))
SCALE = EvalResize(max_long=INFO["scale"][0], max_short=INFO["scale"][1], pad_divisor=32, method="opencv")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The reference JPEGs as a COCO split (the seed model's 8 classes as categories 1..8)."""
    root = tmp_path_factory.mktemp("testtime")
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    images = []
    for i, (w, h) in enumerate(INFO["sizes"]):
        (root / "val2017" / f"{i:012d}.jpg").write_bytes(REF[f"jpeg{i}"].tobytes())
        images.append(dict(id=i + 1, file_name=f"{i:012d}.jpg", width=w, height=h))
    doc = dict(images=images, categories=[dict(id=c, name=f"c{c}") for c in range(1, 9)],
               annotations=[dict(id=i + 1, image_id=i + 1, category_id=1, bbox=[1, 1, 20, 20], area=400, iscrowd=0,
                                 segmentation=[[1, 1, 21, 1, 21, 21, 1, 21]]) for i in range(len(images))])
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return resolve(root, "val2017")


def eval_pixels(split, method: str) -> list:
    """What the evaluation pipeline feeds the model, per image (RGB, the valid region)."""
    from pipelines.iterator import EvalLoader
    out = []
    for b in EvalLoader(split, replace(SCALE, method=method), batch_size=1):
        g = b.geometry[0]
        out.append(b.images[0, : g.valid_h, : g.valid_w].numpy().astype(int))
    return out


def test_fit_size_is_mmcvs_rescale_size():
    """Output sizes equal mmcv's ``rescale_size`` (Python floats) at 1333 x 800 for every size class that
    float32 arithmetic rounds the other way (e.g. 320 x 640: 666.5 -> 667) and a spread of others."""
    from nvidia.dali import fn, pipeline_def, types
    from pipelines.blocks import fit_size
    rng = np.random.default_rng(0)
    sizes = [(320, 640), (640, 320), (35, 70), (400, 800), (7, 602), (21, 602), (29, 2494), (37, 2294)]
    sizes += [tuple(int(v) for v in rng.integers(16, 4000, 2)) for _ in range(2000)]

    @pipeline_def(batch_size=len(sizes), num_threads=1, device_id=None)
    def pipe():
        hw = fn.external_source(source=lambda: [np.array(s, np.float64) for s in sizes], batch=True)
        _, oh, ow = fit_size(hw[0], hw[1], EvalResize())
        return fn.cast(fn.stack(oh, ow), dtype=types.INT32)
    p = pipe()
    p.build()
    ours = [tuple(np.asarray(t).tolist()) for t in p.run()[0]]
    for (h, w), got in zip(sizes, ours):
        s = min(1333 / max(h, w), 800 / min(h, w))
        assert got == (int(h * s + 0.5), int(w * s + 0.5)), (h, w)


@pytest.mark.parametrize("w,h,out", [(70, 35, (667, 1333)), (1204, 14, (16, 1333))])
def test_evaluation_loader_sizes_as_mmdetection(tmp_path, w, h, out):
    """Through the pipeline, sizes whose side x scale lands on .5 (70 x 35: 35 x 1333 / 70 = 666.5): mmcv
    rounds up to 667, float32 arithmetic can give 666."""
    from PIL import Image
    from pipelines.iterator import EvalLoader
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (w, h), (90, 120, 150)).save(tmp_path / "val2017" / "a.jpg")
    doc = dict(images=[dict(id=1, file_name="a.jpg", width=w, height=h)], categories=[dict(id=1, name="x")],
               annotations=[dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5], area=25, iscrowd=0,
                                 segmentation=[[1, 1, 6, 1, 6, 6, 1, 6]])])
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    (b,) = list(EvalLoader(resolve(tmp_path, "val2017"), EvalResize(), batch_size=1))
    assert (b.geometry[0].valid_h, b.geometry[0].valid_w) == out


CV_CASES = len([k for k in REF.files if k.startswith("cv_in")])


def test_the_reference_holds_every_opencv_case():
    assert CV_CASES == 8  # enlarged, shrunk, halved, mixed, one pixel wide... (scripts/mmdet_testtime.py)


@pytest.mark.parametrize("i", range(CV_CASES))
def test_resize_linear_is_opencvs(i):
    """``pipelines.opencv_resize`` against OpenCV's own INTER_LINEAR (the reference's cases: enlarged, shrunk,
    halved, mixed, one pixel wide), every pixel."""
    from pipelines.opencv_resize import resize_linear
    src, ref = REF[f"cv_in{i}"], REF[f"cv_out{i}"]
    ref = ref.reshape(ref.shape[0], ref.shape[1], -1)  # OpenCV drops the axis of 1 channel; never for 3
    assert np.array_equal(resize_linear(torch.from_numpy(src), *ref.shape[:2]).numpy(), ref)


def test_decoding_equals_opencvs(split):
    """DALI's decoder gives OpenCV's pixels for these JPEGs (both libjpeg-turbo's default DCT)."""
    from nvidia.dali import fn, pipeline_def
    from pipelines.blocks import decode

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe(path):
        return decode(fn.readers.file(files=[str(path)])[0], "cpu")
    for i in range(len(INFO["sizes"])):
        p = pipe(split.images_dir / f"{i:012d}.jpg")
        p.build()
        assert np.array_equal(np.asarray(p.run()[0][0]), REF[f"decoded{i}"]), i


def test_opencv_resize_is_mmdetections_resize(split):
    """``--resize opencv``: mmdetection's sizes and its resized pixels, bit for bit, shrunk and enlarged.
    ``antialias`` averages more pixels when shrinking: far from mmdetection's there."""
    ours, aa = eval_pixels(split, "opencv"), eval_pixels(split, "antialias")
    for i, det in enumerate(INFO["detections"]):
        ref = REF[f"resized{i}"].astype(int)
        assert ours[i].shape[:2] == tuple(det["img_shape"]) == ref.shape[:2]
        assert np.array_equal(ours[i], ref), (i, np.abs(ours[i] - ref).max(), (ours[i] != ref).mean())
    shrunk = np.abs(aa[0] - REF["resized0"].astype(int))
    assert shrunk.max() > 20 and shrunk.mean() > 1.0


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory):
    """scripts/mmdet_reference.py's seeded checkpoint, rebuilt bit for bit and imported."""
    info = load_reference(ROOT / "tests" / "data" / "mmdet_reference.npz")["info"]
    path = seeded_mmdet_checkpoint(info, tmp_path_factory.mktemp("seed") / "seed.pth",
                                   dict(dataset_meta=dict(classes=info["class_names"])))
    imp = import_weights.convert(path, recipe("r50_ssj_scp_90k"))
    from trainer.model import build_model
    from dali_scp.presets import Recipe
    model = build_model(Recipe.from_dict(imp.state["recipe"]), imp.state["num_classes"])
    model.load_state_dict(imp.state["model"])
    return model.eval()


def test_detections_equal_mmdetections_test_from_its_pixels(split, seed_model):
    """mmdetection's resized pixels of both images as one evaluation batch through
    ``trainer.evaluate.batch_results`` (what ``predict`` does with each batch): normalisation and channel
    order, the batch's padding, boxes scaled back and masks pasted at the original size, labels to category
    ids, RLE. Equal to mmdetection's detections as far as float32 goes (the import test's tolerances; here
    measured: boxes 1e-3 px, scores 2.3e-5)."""
    from pipelines.iterator import EvalBatch
    from pipelines.outputs import Geometry
    from pycocotools import mask as mask_utils
    pix = [REF[f"resized{i}"] for i in range(2)]
    h, w = (max(p.shape[k] for p in pix) for k in (0, 1))
    images = torch.zeros(2, -(-h // 32) * 32, -(-w // 32) * 32, 3, dtype=torch.uint8)  # as fn.pad leaves them
    for i, p in enumerate(pix):
        images[i, : p.shape[0], : p.shape[1]] = torch.from_numpy(p.copy())
    batch = EvalBatch(images=images, image_ids=[1, 2], geometry=[Geometry(0.0, *p.shape[:2], False) for p in pix],
                      orig_sizes=[(hh, ww) for ww, hh in INFO["sizes"]])
    results = ev.batch_results(seed_model, batch, "cpu", split.label_to_cat())
    for i in range(2):
        ref, ours = mmdet_results(i), [r for r in results if r["image_id"] == i + 1]
        assert len(ours) == len(ref) == 100
        rb, ob = (np.array([r["bbox"] for r in x]) for x in (ref, ours))
        rs, os_ = (np.array([r["score"] for r in x]) for x in (ref, ours))
        pair = (np.abs(rb[:, None] - ob[None]).max(-1) + 1e3 * np.abs(rs[:, None] - os_[None])).argmin(1)
        assert len(set(pair.tolist())) == 100
        assert [r["category_id"] for r in ref] == [ours[j]["category_id"] for j in pair]
        assert np.abs(rb - ob[pair]).max() <= 0.01 and np.abs(rs - os_[pair]).max() <= 1e-4
        ma = mask_utils.decode([r["segmentation"] for r in ref])
        mb = mask_utils.decode([ours[j]["segmentation"] for j in pair])
        assert ma.shape[:2] == (INFO["sizes"][i][1], INFO["sizes"][i][0])
        assert (ma != mb).sum() <= 5e-4 * max(ma.sum(), 1), (ma != mb).sum() / ma.sum()


def mmdet_results(i: int) -> list:
    det = INFO["detections"][i]
    return [dict(image_id=i + 1, category_id=label + 1, score=score, bbox=[x0, y0, x1 - x0, y1 - y0], segmentation=m)
            for (x0, y0, x1, y1), score, label, m in zip(det["boxes"], det["scores"], det["labels"], det["masks"])]


def test_resize_flag_and_recipe_defaults(syn_root, tmp_path, monkeypatch):
    """The seed recipes evaluate as mmdetection tests (opencv), the demo keeps its antialiased resize;
    ``--resize`` overrides the checkpoint recipe's."""
    from dali_scp.presets import RECIPES
    from trainer.model import build_model
    assert {n: r.eval_resize.method for n, r in RECIPES.items()} == {
        n: "antialias" if n.startswith("demo") else "opencv" for n in RECIPES}
    seen = []

    def fake_evaluate(model, split, resize, *a, **k):
        seen.append(resize)
        return {t: {n: 0.0 for n in ev.STAT_NAMES} for t in ("bbox", "segm")}, []
    monkeypatch.setattr(ev, "evaluate_model", fake_evaluate)
    r = recipe("demo")
    torch.save(dict(model=build_model(r, 9).state_dict(), recipe=r.as_dict(), num_classes=9), tmp_path / "c.pth")
    for flag, method in ((["--resize", "opencv"], "opencv"), ([], "antialias")):
        assert ev.main(["--checkpoint", str(tmp_path / "c.pth"), "--coco-root", str(syn_root), "--device", "cpu",
                        "--out", str(tmp_path)] + flag) == 0
        assert seen.pop() == replace(r.eval_resize, method=method)


@pytest.mark.parametrize("select", ["mmdet", "torchvision"])
def test_rpn_breaks_score_ties_as_mmdetection(seed_model, select):
    """Thousands of anchors with the same top score (a weakly trained RPN gives its bias to every anchor
    whose features are all zero): the seed recipes' RPN keeps the proposals mmdetection's ``RPNHead`` keeps,
    in its order; torchvision's selection (top-k of logits, NMS per level) keeps others."""
    from collections import OrderedDict
    from torchvision.models.detection.image_list import ImageList

    class Crafted(torch.nn.Module):
        def forward(self, features):
            return ([torch.from_numpy(REF[f"ties_cls{k}"]) for k in range(5)],
                    [torch.from_numpy(REF[f"ties_reg{k}"]) for k in range(5)])
    rpn = seed_model.rpn
    head, chosen = rpn.head, rpn.select
    rpn.head, rpn.select = Crafted(), select
    try:
        feats = OrderedDict((str(k), torch.zeros(1, 1, *REF[f"ties_cls{k}"].shape[2:])) for k in range(5))
        with torch.no_grad():
            boxes = rpn(ImageList(torch.zeros(1, 3, 160, 224), [(160, 224)]), feats)[0][0]
    finally:
        rpn.head, rpn.select = head, chosen
    ref = torch.from_numpy(REF["ties_boxes"])
    same = len(boxes) == len(ref) and torch.allclose(boxes, ref, atol=1e-4)
    assert same == (select == "mmdet")
