"""The dataset check finds every planted defect, names file and annotation, and the pipelines then run
on the filtered copy instead of dying."""
import json
import shutil

import pytest
from PIL import Image

from dali_scp.check import check, checked_annotations, main


@pytest.fixture()
def broken(syn_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(syn_root / "train2017", root / "train2017")
    (root / "annotations").mkdir()
    doc = json.loads((syn_root / "annotations" / "instances_train2017.json").read_text())
    ims = doc["images"]
    anns = [a for a in doc["annotations"] if not a["iscrowd"]]
    planted = {}
    (root / "train2017" / ims[0]["file_name"]).unlink()
    planted["missing-image"] = (ims[0]["id"], None)
    p = root / "train2017" / ims[1]["file_name"]
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
    planted["corrupt-image"] = (ims[1]["id"], None)
    ims[2]["width"] += 10
    planted["size-mismatch"] = (ims[2]["id"], None)
    on = [a for a in anns if a["image_id"] not in [im["id"] for im in ims[:4]]]
    on[0]["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
    planted["degenerate-polygon"] = (on[0]["image_id"], on[0]["id"])
    on[1]["segmentation"] = [[1, 1, 5, 5, 9, 9]]  # collinear: zero area
    planted["degenerate-polygon/zero"] = (on[1]["image_id"], on[1]["id"])
    on[2]["bbox"] = [600.0, 10.0, 500.0, 20.0]
    planted["box-outside-image"] = (on[2]["image_id"], on[2]["id"])
    on[3]["category_id"] = 4242
    planted["unknown-category"] = (on[3]["image_id"], on[3]["id"])
    on[4]["segmentation"] = {"size": [10, 10], "counts": "abc"}
    planted["malformed-rle"] = (on[4]["image_id"], on[4]["id"])
    on[5]["image_id"] = 987654
    planted["unknown-image-id"] = (987654, on[5]["id"])
    im6 = next(im for im in ims if im["id"] == on[6]["image_id"])
    on[6]["segmentation"] = {"size": [im6["height"], im6["width"]], "counts": [5, 7]}  # 12 px, not h*w
    planted["malformed-rle/sum"] = (on[6]["image_id"], on[6]["id"])
    on[7]["segmentation"] = [[1.0, 1.0, 40.0, 2.0, float("nan"), 30.0]]  # json writes NaN, and reads it back
    planted["malformed-annotation"] = (on[7]["image_id"], on[7]["id"])
    p = root / "train2017" / ims[3]["file_name"]
    Image.open(p).save(p.with_suffix(".gif"))
    ims[3]["file_name"] = p.with_suffix(".gif").name
    planted["unsupported-image"] = (ims[3]["id"], None)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return root, planted, doc


def test_every_planted_defect_is_found(broken):
    root, planted, doc = broken
    rep, filtered = check(root / "annotations" / "instances_train2017.json", root / "train2017", progress=False)
    found = {(d.kind, d.image_id, d.annotation_id) for d in rep.defects}
    for kind, (iid, aid) in planted.items():
        assert (kind.split("/")[0], iid, aid) in found, kind
    assert len(rep.defects) == len(planted)
    bad_images = {planted[k][0] for k in ("missing-image", "corrupt-image", "size-mismatch", "unsupported-image")}
    assert not bad_images & {im["id"] for im in filtered["images"]}
    bad_anns = {aid for _, aid in planted.values() if aid}
    assert not bad_anns & {a["id"] for a in filtered["annotations"]}
    assert all(str(root) in str(d) for d in rep.defects if d.kind == "missing-image")


def test_pipeline_runs_on_the_filtered_dataset_and_the_check_is_cached(broken, capsys):
    from dali_scp.dataset import resolve
    from dali_scp.presets import pipeline_preset
    from pipelines.iterator import CocoLoader
    root, planted, _ = broken
    split = resolve(root)
    loader = CocoLoader(pipeline_preset("ssj_scp", out_size=128), split, batch_size=4, shuffle=False)
    ids = [t["image_id"] for _, targets in loader for t in targets]
    assert planted["corrupt-image"][0] not in ids and planted["missing-image"][0] not in ids
    assert len(loader.check_report.defects) == len(planted)
    path1, _ = checked_annotations(split.annotations, split.images_dir)
    path2, rep2 = checked_annotations(split.annotations, split.images_dir)
    assert path1 == path2 and len(rep2.defects) == len(planted)


def test_malformed_json_and_cli(tmp_path, broken, capsys):
    root, planted, _ = broken
    assert main(["--coco-root", str(root), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "corrupt-image" in out and "annotation" in out and "the pipelines read" in out
    (tmp_path / "bad" / "annotations").mkdir(parents=True)
    (tmp_path / "bad" / "train2017").mkdir()
    (tmp_path / "bad" / "annotations" / "instances_train2017.json").write_text("{not json")
    rep, filtered = check(tmp_path / "bad" / "annotations" / "instances_train2017.json", tmp_path / "bad" / "train2017")
    assert filtered is None and rep.defects[0].kind == "malformed-json"
    assert main(["--coco-root", str(tmp_path / "bad")]) == 1
