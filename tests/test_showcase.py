"""The picture at the end of an evaluated run: ground truth next to predictions, from the results file."""
import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from trainer import showcase


def _perfect_results(ann_path, images):
    """Every non-crowd ground-truth object as a prediction (RLE mask, score 0.9), and one low-score
    detection that must not be drawn."""
    from pycocotools.coco import COCO
    gt = COCO(str(ann_path))
    res = []
    for iid in images:
        for a in gt.imgToAnns[iid]:
            if a["iscrowd"]:
                continue
            rle = mask_utils.encode(np.asfortranarray(gt.annToMask(a)))
            rle["counts"] = rle["counts"].decode("ascii")
            res.append(dict(image_id=iid, category_id=a["category_id"], score=0.9, bbox=a["bbox"], segmentation=rle))
        res.append(dict(image_id=iid, category_id=gt.getCatIds()[0], score=0.1, bbox=[0, 0, 5, 5]))
    return gt, res


def test_picture_shows_ground_truth_and_predictions(syn_root, tmp_path):
    from dali_scp.dataset import resolve
    val = resolve(syn_root, "val2017")
    from pycocotools.coco import COCO
    ids = showcase.pick_images(COCO(str(val.annotations)), 3)
    assert len(ids) == 3 and ids == sorted(ids)
    gt, res = _perfect_results(val.annotations, ids)
    (tmp_path / "eval_val2017").mkdir()
    (tmp_path / "eval_val2017" / "results.json").write_text(json.dumps(res))
    out = showcase.after_evaluation(val, tmp_path, n=3)
    assert out == tmp_path / "predictions_val2017.png" and out.is_file()
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] == 2 * 2 * 320 and img.shape[0] == 2 * (320 + 22)
    # perfect predictions: each prediction tile looks like its ground-truth tile (same masks, other labels)
    left, right = img[22:342, :320].astype(int), img[22:342, 320:640].astype(int)
    assert np.abs(left - right).mean() < 12 and right.std() > 20


def test_picture_failure_is_a_warning_not_an_error(syn_root, tmp_path, caplog):
    from dali_scp.dataset import resolve
    val = resolve(syn_root, "val2017")
    assert showcase.after_evaluation(val, tmp_path) is None  # no results.json
    assert "could not draw" in caplog.text
