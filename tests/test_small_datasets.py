"""Datasets of any size >= 1 image: training streams on (images repeat), the visualiser draws what
there is, evaluation scores every image exactly once - also with more processes than images."""
import json

import numpy as np
import pytest
from PIL import Image

from dali_scp.dataset import resolve
from dali_scp.presets import pipeline_preset
from pipelines import visualize
from pipelines.iterator import CocoLoader
from trainer import run as run_mod


def _no_detections(model, images, sizes):
    import torch
    return [dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64),
                 masks=torch.zeros(0, 1, *s)) for s in sizes]


@pytest.mark.parametrize("n", [1, 3])
def test_a_dataset_smaller_than_a_batch_trains_visualises_and_evaluates(n, small_root, tmp_path, monkeypatch):
    from trainer import evaluate as ev
    root = small_root(n)
    out = tmp_path / "run"
    if n == 3:  # the model's own detections cost time and prove nothing more than the 1-image run
        monkeypatch.setattr(ev, "inference", _no_detections)
    # the demo recipe's batch (4), and its evaluation on the val split at the end
    summary = run_mod.train(run_mod.parse_args(["--preset", "demo", "--coco-root", str(root), "--threads", "2",
                                                "--out", str(out), "--max-iters", "1", "--record-image-ids"]))
    assert summary["iteration"] == 1
    train_ids = {im["id"] for im in json.loads(resolve(root).annotations.read_text())["images"]}
    seen = json.loads((out / "rank0_debug.json").read_text())["image_ids"]
    assert len(seen) == 4 and set(seen) == train_ids, "a full batch: the data repeats"
    assert set(summary["metrics"]) == {"bbox", "segm"}
    val_ids = {im["id"] for im in json.loads(resolve(root, "val2017").annotations.read_text())["images"]}
    results = json.loads((out / "eval_val2017" / "results.json").read_text())
    assert {r["image_id"] for r in results} <= val_ids
    # evaluate_model raises unless every val image was scored exactly once; the 3-image split is a
    # partial batch of 4
    png = tmp_path / "grid.png"
    assert visualize.main(["--coco-root", str(root), "--out", str(png), "--tile", "64"]) == 0  # default --num 8
    assert Image.open(png).size == (n * 64, 64 + 22), "one tile per image, none twice"


def test_more_processes_than_images(small_root):
    """Each of 2 processes reads the single image with its own augmentation; evaluation scores it once."""
    import torch
    from dali_scp.presets import recipe
    from trainer import evaluate as ev
    from trainer.distributed import Dist
    split = resolve(small_root(1))
    batches = []
    for shard in (0, 1):
        loader = CocoLoader(pipeline_preset("ssj", out_size=64), split, batch_size=2, shard_id=shard, num_shards=2,
                            infinite=True)
        batches.append(next(iter(loader))[0].numpy())
    assert not np.array_equal(*batches)
    val = resolve(small_root(1), "val2017")
    model = torch.nn.Module()
    monkey = ev.inference
    try:
        ev.inference = _no_detections
        parts = [ev.predict(model, val, recipe("demo").eval_resize, d=Dist(r, 2, 0), progress=False) for r in (0, 1)]
    finally:
        ev.inference = monkey
    assert [p[1] for p in parts] == [[json.loads(val.annotations.read_text())["images"][0]["id"]], []]


def test_the_demo_set_is_few_large_objects_of_four_shapes(tmp_path):
    """The README's first command trains on the demo set (python -m dali_scp.synthetic --demo): 1-5
    objects per image, four shape families, no crowd regions, half-size images whose objects are medium
    to large (mostly COCO's >= 32^2 px) - what 600 CPU iterations can learn, unlike the COCO-like set's tiny
    objects and crowds."""
    import json

    from dali_scp.dataset import resolve
    from dali_scp.synthetic import generate
    root = generate(tmp_path / "demo", train=16, val=4, seed=5, demo=True)
    doc = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert sorted(c["name"] for c in doc["categories"]) == ["disc", "square", "star", "triangle"]
    per_image = {im["id"]: 0 for im in doc["images"]}
    for a in doc["annotations"]:
        assert a["iscrowd"] == 0 and a["area"] >= 20 * 20, a  # a thin star of the smallest radius: ~25^2
        per_image[a["image_id"]] += 1
    areas = np.array([a["area"] for a in doc["annotations"]])
    assert np.mean(areas >= 32 * 32) > 0.8 and np.median(areas) > 48 * 48
    assert set(per_image.values()) <= set(range(1, 6)) and max(per_image.values()) > 1
    assert all(max(im["width"], im["height"]) <= 320 for im in doc["images"])
    # trainer.run without --coco-root trains on it; the profiler's default keeps the COCO-like set
    assert resolve(None, "train2017", demo=True).cat_names == ["disc", "triangle", "square", "star"]
    assert len(resolve(None, "train2017").cat_names) == 8


def test_a_training_set_without_any_annotation_is_one_line_and_a_partial_one_trains_the_annotated(tmp_path, caplog):
    """Training reads only annotated images (mmdetection's filter_empty_gt): none left is one clear line
    naming the file, not an empty stream; some left is logged with the count."""
    from quirks import write_coco
    (tmp_path / "train2017").mkdir()
    images = []
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 30)).save(tmp_path / "train2017" / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", height=48, width=64))
    write_coco(tmp_path, "train2017", images, [])
    with pytest.raises(ValueError, match=r"instances_train2017\.json: no image has an annotation; nothing to train on"):
        CocoLoader("ssj_scp", resolve(tmp_path, "train2017"), batch_size=2, out_size=64, infinite=True)
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    write_coco(tmp_path, "train2017", images, [dict(id=0, image_id=2, category_id=3, segmentation=square,
                                                    area=400.0, bbox=[10, 10, 20, 20], iscrowd=0)])
    caplog.set_level("INFO")
    batch_images, targets = next(iter(CocoLoader("ssj_scp", resolve(tmp_path, "train2017"), batch_size=2,
                                                 out_size=64, infinite=True)))
    assert "training on the 1 of 3 images that have annotations" in caplog.text
    assert [t["image_id"] for t in targets] == [2, 2]  # the annotated image only
