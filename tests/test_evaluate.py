"""Evaluation: the results path (threshold, RLE, category mapping) scored by COCOeval, compared with a
direct pycocotools call on the same file; bad results files; distributed gathering."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.ndimage import binary_erosion

from dali_scp.dataset import resolve
from trainer import evaluate as ev


def quiet_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def gt_detections(gt: COCO, split, shift=0.0, erode=0):
    """Ground truth as detections at the original resolution (score 1, contiguous labels, mask
    probabilities), optionally with shifted boxes / eroded masks."""
    c2l = split.cat_to_label_table()
    results = []
    for iid, im in gt.imgs.items():
        anns = [a for a in gt.imgToAnns[iid] if not a["iscrowd"]]
        if not anns:
            continue
        boxes = torch.tensor([[a["bbox"][0] + shift, a["bbox"][1], a["bbox"][0] + a["bbox"][2] + shift,
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float64)
        masks = np.stack([gt.annToMask(a) for a in anns])
        if erode:
            masks = np.stack([binary_erosion(m, iterations=erode) for m in masks]).astype(np.uint8)
        det = dict(boxes=boxes, scores=torch.ones(len(anns)),
                   labels=torch.as_tensor(c2l[[a["category_id"] for a in anns]]),
                   masks=torch.as_tensor(masks, dtype=torch.float32)[:, None] * 0.9)
        results += ev.detections_to_results(iid, det, split.label_to_cat())
    return results


def direct_cocoeval(gt, results, iou_type, as_given: bool = False):
    """pycocotools called directly. ``as_given``: on the entries exactly as a user's file holds them (loadRes
    with the bbox present); else segm entries without their bbox (loadRes then boxes the mask itself)."""
    res = [dict(r) for r in results]
    if iou_type == "segm" and not as_given:
        for r in res:
            r.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(res), iou_type)
        e.evaluate(), e.accumulate(), e.summarize()
    return e.stats


def test_ground_truth_scores_ap_one_and_degradations_match_pycocotools(syn_root):
    split = resolve(syn_root, "val2017")
    gt = quiet_coco(split.annotations)
    perfect = ev.score(gt, gt_detections(gt, split))
    assert perfect["bbox"]["AP"] == pytest.approx(1.0) and perfect["segm"]["AP"] == pytest.approx(1.0)
    worse = gt_detections(gt, split, shift=3.0, erode=2)
    m = ev.score(gt, worse)
    assert m["bbox"]["AP"] < 0.95 and m["segm"]["AP"] < 0.95
    for t in ("bbox", "segm"):
        np.testing.assert_allclose([m[t][n] for n in ev.STAT_NAMES], direct_cocoeval(gt, worse, t), atol=1e-12)
    assert "AP50" in ev.format_table(m)


def test_empty_images_and_category_zero(tmp_path):
    h, w = 40, 50
    poly = [[10, 5, 30, 5, 30, 20, 10, 20]]
    doc = dict(images=[dict(id=1, file_name="a.jpg", width=w, height=h), dict(id=2, file_name="b.jpg", width=w, height=h)],
               annotations=[dict(id=1, image_id=1, category_id=0, bbox=[10, 5, 20, 15], area=300, iscrowd=0,
                                 segmentation=poly)],
               categories=[dict(id=0, name="zero"), dict(id=7, name="seven")])
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    split = resolve(tmp_path, "val2017")
    assert split.cat_to_label_table()[0] == 1 and split.label_to_cat()[1] == 0
    gt = quiet_coco(split.annotations)
    det = dict(boxes=torch.tensor([[10.0, 5.0, 30.0, 20.0]]), scores=torch.tensor([1.0]), labels=torch.tensor([1]),
               masks=torch.as_tensor(gt.annToMask(gt.anns[1]), dtype=torch.float32)[None, None])
    res = ev.detections_to_results(1, det, split.label_to_cat())
    assert res[0]["category_id"] == 0
    metrics = ev.score(gt, res)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)


def polygon_results(gt, rng=None) -> list:
    """Ground-truth polygons as results with the annotation's box (score 1); with ``rng`` degraded: objects
    dropped, polygons scaled and shifted (the box: their extent), some labels wrong, random scores, and false
    detections per image - boxes and thin diagonal slivers, whose box area (large) and mask area (small)
    fall in different COCO size ranges, so the area rule shows in APs/APl."""
    out = []
    for a in gt.dataset["annotations"]:
        if a["iscrowd"] or type(a["segmentation"]) is not list:
            continue
        if rng is None:
            out.append(dict(image_id=a["image_id"], category_id=a["category_id"], score=1.0, bbox=list(a["bbox"]),
                            segmentation=a["segmentation"]))
            continue
        if rng.random() < 0.15:
            continue
        im = gt.imgs[a["image_id"]]
        size = max(a["bbox"][2], a["bbox"][3])
        k, d = rng.uniform(0.85, 1.15), rng.normal(0, 0.08 * size, 2)
        parts = []
        for p in a["segmentation"]:
            xy = np.asarray(p, np.float64).reshape(-1, 2)
            xy = ((xy - xy.mean(0)) * k + xy.mean(0) + d).clip(0, [im["width"], im["height"]])
            parts.append(np.round(xy, 2))
        allp = np.concatenate(parts)
        lo, hi = allp.min(0), allp.max(0)
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(gt.getCatIds()))
        out.append(dict(image_id=a["image_id"], category_id=cat, score=round(float(rng.uniform(0.05, 1)), 4),
                        bbox=[float(v) for v in np.round([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], 2)],
                        segmentation=[q.reshape(-1).tolist() for q in parts]))
    if rng is not None:
        for iid, im in gt.imgs.items():
            for _ in range(int(rng.integers(1, 4))):
                w, h = rng.uniform(0.2, 0.6) * im["width"], rng.uniform(0.2, 0.6) * im["height"]
                x, y = rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h)
                sliver = rng.random() < 0.6
                poly = ([x, y, x + 3, y, x + w, y + h, x + w - 3, y + h] if sliver else
                        [x, y, x + w, y, x + w, y + h, x, y + h])
                out.append(dict(image_id=iid, category_id=int(rng.choice(gt.getCatIds())),
                                score=round(float(rng.uniform(0.05, 1)), 4),
                                bbox=[round(float(v), 2) for v in (x, y, w, h)],
                                segmentation=[[round(float(v), 2) for v in poly]]))
    return out


@pytest.mark.parametrize("scorer", ev.SCORERS)
def test_polygon_results_score_as_pycocotools_scores_them(syn_root, tmp_path, scorer):
    split = resolve(syn_root, "val2017")
    gt = quiet_coco(split.annotations)
    f = tmp_path / "polygons.json"
    f.write_text(json.dumps(polygon_results(gt)))
    assert ev.main(["--results", str(f), "--coco-root", str(syn_root), "--scorer", scorer, "--out", str(tmp_path)]) == 0
    perfect = json.loads((tmp_path / "metrics.json").read_text())
    for t in ("bbox", "segm"):
        assert perfect[t]["AP"] == 1.0 and perfect[t]["AR100"] == 1.0, t
    worse = polygon_results(gt, np.random.default_rng(3))
    m = ev.score(ev.load_ground_truth(split.annotations, scorer), worse, scorer=scorer)
    for t in ("bbox", "segm"):
        ours = [m[t][n] for n in ev.STAT_NAMES]
        assert 0.1 < m[t]["AP"] < 0.9, (t, m[t]["AP"])  # informative: neither perfect nor nothing
        np.testing.assert_allclose(ours, direct_cocoeval(gt, worse, t, as_given=True), rtol=0, atol=1e-6, err_msg=t)
    # the area rule is what makes them equal: with mask areas (the RLE rule) the size-split numbers move
    as_rle = [dict(r, segmentation=ev.results_of_type([r], "segm", gt.imgs).entries[0]["segmentation"])
              for r in worse]
    m_rle = ev.score(gt, as_rle, iou_types=("segm",))["segm"]
    assert any(abs(m_rle[n] - m["segm"][n]) > 1e-3 for n in ("APs", "APm", "APl"))
    assert m_rle["AP"] == pytest.approx(m["segm"]["AP"], abs=1e-6)  # the same pixels


@pytest.mark.parametrize("mutate,msg", [
    (lambda r: r.update(image_id=999999), "image_id 999999 is not in the ground truth"),
    (lambda r: r.update(category_id=4242), "category_id 4242"),
    (lambda r: r.update(score="high"), "score"),
    (lambda r: r.update(bbox=[1, 2, 3]), "bbox"),
    (lambda r: r["segmentation"].update(counts="!!!!"), "malformed RLE"),
    (lambda r: r["segmentation"].update(size=[1, 1]), "RLE size"),
    (lambda r: r.update(image_id="7"), "not an integer"),
    (lambda r: r.update(segmentation="polygon"), "neither an RLE dict"),
] + [(m, "polygon results: " + msg) for m, msg in [
    (lambda r: r.pop("bbox"), "a polygon segmentation needs the entry's bbox"),
    (lambda r: r.update(segmentation=[]), "empty list of polygons"),
    (lambda r: r["segmentation"].append([1.0, 2.0, 3.0, 4.0]), "polygon 1 has 4 coordinates"),
    (lambda r: r["segmentation"][0].pop(), "coordinates; expected x, y pairs"),
    (lambda r: r["segmentation"][0].__setitem__(2, "7"), "polygon 0 is not a list of numbers"),
    (lambda r: r["segmentation"].__setitem__(0, 5), "polygon 0 is not a list of numbers"),
    (lambda r: r["segmentation"][0].__setitem__(0, float("nan")), "not a finite number"),
    (lambda r: r["segmentation"][0].__setitem__(0, 10 ** 400), "not a finite number"),
    (lambda r: r["segmentation"][0].__setitem__(1, -3e9), "more than ten image sizes away"),
]])
def test_bad_results_name_the_entry(syn_root, mutate, msg):
    split = resolve(syn_root, "val2017")
    gt = quiet_coco(split.annotations)
    results = gt_detections(gt, split)
    if msg.startswith("polygon results: "):
        msg = msg.removeprefix("polygon results: ")
        results = [dict(r, segmentation=[list(p) for p in r["segmentation"]]) for r in polygon_results(gt)]
    mutate(results[3])
    with pytest.raises(ValueError, match="entry 3") as e:
        ev.validate_results(results, gt, "r.json")
    assert msg in str(e.value)


def test_cli_scores_a_results_file(syn_root, tmp_path, capsys):
    split = resolve(syn_root, "val2017")
    res = gt_detections(quiet_coco(split.annotations), split)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    assert ev.main(["--results", str(f), "--coco-root", str(syn_root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "segm" in out and "100.0" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["bbox"]["AP"] == pytest.approx(1.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(res[0], image_id=-5)]))
    assert ev.main(["--results", str(bad), "--coco-root", str(syn_root)]) == 2
    assert "entry 0" in capsys.readouterr().err


def test_checkpoint_mismatch_is_a_clear_error(tmp_path, capsys):
    from dali_scp.presets import recipe
    from trainer.model import build_model
    r = recipe("demo")
    model = build_model(r, 5)
    torch.save(dict(model=model.state_dict(), recipe=r.as_dict(), num_classes=9), tmp_path / "c.pth")
    assert ev.main(["--checkpoint", str(tmp_path / "c.pth")]) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "9 classes" in err
    torch.save({"weights": 1}, tmp_path / "d.pth")
    assert ev.main(["--checkpoint", str(tmp_path / "d.pth")]) == 2
    assert "not a dali-scp checkpoint" in capsys.readouterr().err


def test_postprocess_maps_boxes_and_masks_back_to_the_original_image():
    """The model's postprocessing undoes the pipeline's resize: a box in the resized image comes back
    scaled by 1/r, a full 28x28 mask is pasted over it at the original resolution."""
    from dali_scp.presets import recipe
    from trainer.model import build_model
    model = build_model(recipe("demo"), 3).eval()
    det = [dict(boxes=torch.tensor([[32.0, 16.0, 96.0, 48.0]]), scores=torch.tensor([0.9]),
                labels=torch.tensor([1]), masks=torch.ones(1, 1, 28, 28))]
    out = model.transform.postprocess(det, [(128, 256)], [(256, 512)])[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[64.0, 32.0, 192.0, 96.0]]))
    m = out["masks"][0, 0] > 0.5
    assert m.shape == (256, 512)
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert abs(int(xs.min()) - 64) <= 2 and abs(int(xs.max()) - 191) <= 2 and abs(int(ys.min()) - 32) <= 2


def _eval_rank(rank, world, init_file, syn_root, out):
    import torch.distributed as tdist
    from dali_scp.presets import recipe
    from trainer.distributed import Dist
    from trainer.model import build_model
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    split = resolve(syn_root, "val2017")
    r = recipe("demo")
    metrics, scored = ev.evaluate_model(build_model(r, split.num_classes), split, r.eval_resize, "cpu", 3,
                                        Dist(rank, world, 0), progress=False)
    if rank == 0:
        (out / "scored.json").write_text(json.dumps(scored))
    tdist.destroy_process_group()


def test_distributed_evaluation_scores_every_image_once(syn_root, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_eval_rank, args=(2, str(tmp_path / "init"), syn_root, tmp_path), nprocs=2, join=True)
    scored = json.loads((tmp_path / "scored.json").read_text())
    ids = [im["id"] for im in json.loads(resolve(syn_root, "val2017").annotations.read_text())["images"]]
    assert sorted(scored) == sorted(ids)
    a = [([{"image_id": 1}], [1, 2]), ([{"image_id": 2}, {"image_id": 3}], [2, 3])]
    res, sc = ev.merge_rank_results(a)
    assert sc == [1, 2, 3] and [r["image_id"] for r in res] == [1, 3]


def test_annotation_id_zero_is_renumbered_and_ground_truth_scores_exactly_100(syn_root, tmp_path, caplog):
    """labelme/Roboflow number annotations from 0; COCOeval reads a matched id 0 as unmatched."""
    doc = json.loads(resolve(syn_root, "val2017").annotations.read_text())
    for k, a in enumerate(doc["annotations"]):
        a["id"] = k  # 0, 1, 2, ...
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").symlink_to(syn_root / "val2017", target_is_directory=True)
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.write_text(json.dumps(doc))
    split = resolve(tmp_path, "val2017")
    results = gt_detections(quiet_coco(ann), split)
    for scorer in ev.SCORERS:  # both COCOevals lose the id-0 object (else this test proves nothing)
        with pytest.warns(UserWarning) if scorer == "faster-coco-eval" else contextlib.nullcontext():
            plain = ev.score(quiet_coco(ann), results, scorer=scorer)
        assert plain["bbox"]["AP"] < 1.0, scorer
    with caplog.at_level("INFO", logger="evaluate"):
        ours = ev.score(ev.load_ground_truth(ann), results)
    assert ours["bbox"]["AP"] == 1.0 and ours["segm"]["AP"] == 1.0
    assert "an annotation id is 0; ground-truth annotation ids renumbered" in caplog.text
    f = tmp_path / "r.json"
    f.write_text(json.dumps(results))
    assert ev.main(["--results", str(f), "--coco-root", str(tmp_path), "--out", str(tmp_path / "m")]) == 0
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["bbox"]["AP"] == 1.0 and m["segm"]["AP"] == 1.0
    # a file with positive unique ids is loaded exactly as pycocotools loads it
    orig = resolve(syn_root, "val2017").annotations
    worse = gt_detections(quiet_coco(orig), split, shift=3.0, erode=2)
    for t in ("bbox", "segm"):
        np.testing.assert_array_equal(
            [ev.score(ev.load_ground_truth(orig), worse)[t][n] for n in ev.STAT_NAMES],
            direct_cocoeval(quiet_coco(orig), worse, t))
