"""EXIF orientation: for every tag and both annotation conventions the pipelines' masks lie on their
objects' pixels (found by colour), the check reports each tagged image and the frame it chose, and
evaluation maps predictions back into the annotation's frame."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dali_scp import orientation
from dali_scp.check import check
from dali_scp.dataset import resolve
from dali_scp.presets import pipeline_preset
from geometry_truth import iou, match_annotation, object_pixels, tight_box, visible_core
from pipelines.iterator import CocoLoader
from quirks import ROTATED_CASES, COLOURS, oriented_dataset, perfect_inference, save_with_orientation, write_coco

OUT = 256


@pytest.fixture(scope="module")
def exif_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("exif")
    doc = oriented_dataset(root, "train2017")
    return root, doc


@pytest.mark.parametrize("tag", range(1, 9))
def test_point_and_array_maps_agree_with_pil(tag):
    """The maps evaluation and the check use, against PIL's exif_transpose on a marked image."""
    w, h = 7, 4
    a = np.zeros((h, w), np.uint8)
    a[1, 5] = 255  # pixel (x=5, y=1)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = tag
    shown = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(orientation.to_oriented_array(a, tag), shown)
    np.testing.assert_array_equal(orientation.to_stored_array(shown, tag), a)
    ys, xs = np.nonzero(shown)
    box = orientation.to_oriented_boxes([[5, 1, 6, 2]], tag, w, h)[0]
    np.testing.assert_array_equal(box, [xs[0], ys[0], xs[0] + 1, ys[0] + 1])
    np.testing.assert_array_equal(orientation.to_stored_boxes([box], tag, w, h)[0], [5, 1, 6, 2])
    assert shown.shape[::-1] == orientation.oriented_size(w, h, tag)


def _images_whose_masks_cover_their_objects(name: str, root, doc) -> set:
    """Runs pipeline ``name`` over the dataset; every mask must lie on its object's pixels, found by
    colour in the output image (ground truth independent of the code). Returns the ids of the images
    where at least two objects were large enough to compare."""
    split = resolve(root)
    anns_of = {im["id"]: [a for a in doc["annotations"] if a["image_id"] == im["id"]] for im in doc["images"]}
    loader = CocoLoader(pipeline_preset(name, out_size=OUT), split, batch_size=7, shuffle=False, seed=3)
    ok = set()
    for images, targets in loader:
        for img, t in zip(images.numpy(), targets):
            t = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in t.items()}
            anns = anns_of[t["image_id"]]
            found, checked = set(), 0
            for m, box in zip(t["masks"], t["boxes"]):
                np.testing.assert_allclose(box, tight_box(m), atol=1.0)
                a = match_annotation(img, m, anns)
                if a is None and m.sum() < 64:
                    continue
                assert a is not None, f"image {t['image_id']}: a mask lies on no object"
                truth = object_pixels(img, a["colour"])
                if truth.sum() >= 32 * 32:
                    assert iou(m, truth) >= 0.95, (t["image_id"], a["id"], iou(m, truth))
                    checked += 1
                found.add(a["id"])
            for a in anns:
                if a["id"] not in found:
                    assert visible_core(img, a["colour"]).sum() < 20, \
                        f"image {t['image_id']}: object {a['id']} has no mask"
            if checked >= 2:
                ok.add(t["image_id"])
    return ok


@pytest.mark.parametrize("name", ["none", "ssj"])
def test_masks_cover_their_objects_for_every_tag_and_convention(name, exif_root):
    root, doc = exif_root
    ok = _images_whose_masks_cover_their_objects(name, root, doc)
    cases = {(im["tag"], im["frame"]) for im in doc["images"] if im["id"] in ok}
    assert {(t, "stored") for t in range(1, 9)} | {(t, "oriented") for t in (5, 6, 7, 8)} <= cases, \
        sorted(cases)


def test_the_check_reports_each_tagged_image_and_its_frame(exif_root, tmp_path):
    root, doc = exif_root
    rep, filtered = check(root / "annotations" / "instances_train2017.json", root / "train2017", progress=False)
    assert not rep.defects
    notes = {n.image_id: n.message for n in rep.notes}
    for im in doc["images"]:
        if im["tag"] == 1:
            assert im["id"] not in notes
            continue
        msg = notes[im["id"]]
        assert f"EXIF orientation {im['tag']}" in msg
        if im["frame"] == "oriented":
            assert "re-expressed in stored pixels" in msg
        elif im["width"] == im["height"] or im["tag"] in (2, 3, 4):
            assert "fits both" in msg
        else:
            assert "is the stored image's" in msg
    out = {im["id"]: im for im in filtered["images"]}
    for im in doc["images"]:
        rotated = im["frame"] == "oriented"
        assert out[im["id"]].get("annotated_orientation") == (im["tag"] if rotated else None)
        assert (out[im["id"]]["width"], out[im["id"]]["height"]) == \
            ((im["height"], im["width"]) if rotated else (im["width"], im["height"]))
    # a JSON size that fits neither reading is a defect naming both sizes
    (tmp_path / "train2017").mkdir()
    save_with_orientation(Image.new("RGB", (60, 40), COLOURS[0]), tmp_path / "train2017" / "a.jpg", 6, format="JPEG")
    write_coco(tmp_path, "train2017", [dict(id=1, file_name="a.jpg", width=50, height=50)], [])
    rep, _ = check(tmp_path / "annotations" / "instances_train2017.json", tmp_path / "train2017", progress=False)
    assert [d.kind for d in rep.defects] == ["size-mismatch"]
    assert "file is 60x40 (40x60 with its EXIF orientation 6 applied)" in rep.defects[0].message


def test_evaluation_maps_predictions_back_into_the_annotation_frame(exif_root, monkeypatch):
    """A perfect model seen from the stored pixels: ground-truth masks moved onto the stored pixels with
    PIL, handed to evaluation at the original size DALI reports. Scored against the original file they
    must give AP 100 for boxes and masks (every tag, both conventions, RLE objects included)."""
    _evaluate_a_perfect_model(*exif_root, monkeypatch)


def _evaluate_a_perfect_model(root, doc, monkeypatch):
    from dali_scp.presets import recipe
    from trainer import evaluate as ev
    from trainer.distributed import Dist
    split = resolve(root, "train2017")
    gt = ev.load_ground_truth(split.annotations)
    monkeypatch.setattr(ev, "inference", perfect_inference(doc, gt))
    r = recipe("demo")
    model = torch.nn.Module()
    metrics, scored = ev.evaluate_model(model, split, r.eval_resize, "cpu", 4, Dist(), progress=False)
    assert sorted(scored) == [im["id"] for im in doc["images"]]
    assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0, metrics
    assert any(isinstance(a["segmentation"], dict) for a in gt.anns.values()), "RLE objects are part of it"


@pytest.fixture(scope="module")
def rotated_root(tmp_path_factory):
    """An export annotated on the rotated images throughout: unambiguous tag-6 images, and a square
    tag-6 and a tag-3 image whose sizes fit both frames."""
    root = tmp_path_factory.mktemp("exif_rotated")
    return root, oriented_dataset(root, "train2017", cases=ROTATED_CASES)


def test_images_whose_size_fits_both_frames_follow_the_dataset(rotated_root, monkeypatch):
    """The square tag-6 image and the tag-3 image were annotated rotated, like the dataset's unambiguous
    tag-6 images: read in the stored frame, their masks would lie off their objects."""
    root, doc = rotated_root
    rep, filtered = check(root / "annotations" / "instances_train2017.json", root / "train2017", progress=False)
    assert not rep.defects and rep.frame_evidence == {"stored": 0, "oriented": 2}
    notes = {n.image_id: n.message for n in rep.notes}
    for im in doc["images"]:
        both = im["width"] == im["height"] or im["tag"] == 3
        assert ("fits both" in notes[im["id"]]) == both and "re-expressed in stored pixels" in notes[im["id"]]
        if both:
            assert "2 of the dataset's 2 tagged images whose size tells the frames apart" in notes[im["id"]]
    assert {im["id"]: im.get("annotated_orientation") for im in filtered["images"]} == \
        {im["id"]: im["tag"] for im in doc["images"]}
    ok = _images_whose_masks_cover_their_objects("none", root, doc)
    assert ok == {im["id"] for im in doc["images"]}, (ok, doc["images"])
    _evaluate_a_perfect_model(root, doc, monkeypatch)
