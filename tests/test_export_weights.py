"""``trainer.export_weights``: dali-scp checkpoints back to mmdetection. The test against mmdetection itself
(init_detector on an exported file, its detections against ours) is in tests/test_import_weights.py; here:
import of export is bit-exact, real mmdetection files survive the round trip unchanged, and what cannot be
exported is refused in one line."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dali_scp.presets import recipe
from trainer import checkpoint as ckpt
from trainer import checkpoint_reader as cr
from trainer import export_weights, import_weights
from messages import one_plain_line
from trainer.model import build_model

DATA = Path(__file__).resolve().parent / "data" / "checkpoints"
CLASSES = ["disc", "square", "triangle"]


def _native(tmp_path, name="r50_ssj_scp_90k", names=CLASSES, **narrow) -> Path:
    """A checkpoint as trainer.run writes one for a seed recipe (narrowed), weights and BN statistics random."""
    torch.manual_seed(0)
    r = replace(recipe(name), **narrow)
    model = build_model(r, len(CLASSES) + 1)
    sd = {k: (torch.randn(v.shape) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    sd = {k: (v.abs() + 0.5 if "running_var" in k else v) for k, v in sd.items()}
    path = tmp_path / "ckpt_00000010.pth"
    torch.save(dict(model=sd, recipe=r.as_dict(), num_classes=len(CLASSES) + 1, iteration=10,
                    **({"class_names": names} if names else {})), path)
    return path


NARROW = dict(backbone_width=2, fpn_channels=16, head_channels=8)


def test_import_of_export_is_bit_exact_on_every_tensor(tmp_path):
    src = _native(tmp_path, **NARROW)
    assert export_weights.main([str(src), "--to", "mmdetection", "--out", str(tmp_path / "x.pth")]) == 0
    assert import_weights.main([str(tmp_path / "x.pth"), "--out", str(tmp_path / "back.pth"),
                                "--recipe", "r50_ssj_scp_90k"]) == 0
    before, after = ckpt.load(src), ckpt.load(tmp_path / "back.pth")
    assert after["class_names"] == CLASSES and after["recipe"]["backbone_width"] == 2
    assert set(before["model"]) == set(after["model"]) and len(before["model"]) == 432
    bg = {"roi_heads.box_predictor.bbox_pred.weight": 4, "roi_heads.box_predictor.bbox_pred.bias": 4,
          "roi_heads.mask_predictor.mask_fcn_logits.weight": 1, "roi_heads.mask_predictor.mask_fcn_logits.bias": 1}
    for k, v in before["model"].items():
        w = after["model"][k]
        assert w.dtype == v.dtype and w.shape == v.shape, k
        rows = bg.get(k)  # the background's box deltas / mask channel: no place in mmdetection, never read
        if rows is None:
            assert torch.equal(w, v), k
        else:
            assert torch.equal(w[rows:], v[rows:]) and not w[:rows].any() and v[:rows].any(), k
    # and a second trip changes nothing at all
    assert export_weights.main([str(tmp_path / "back.pth"), "--out", str(tmp_path / "x2.pth")]) == 0
    a, b = (cr.read(tmp_path / n).obj["state_dict"] for n in ("x.pth", "x2.pth"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["mmdet3_iter_2.pth", "mmdet3_published.pth", "mmcv1_epoch_2.pth",
                                  "mmcv1_published.pth"])
def test_real_mmdetection_files_come_back_unchanged(name, tmp_path, capsys):
    assert import_weights.main([str(DATA / name), "--out", str(tmp_path / "ours.pth")]) == 0
    assert export_weights.main([str(tmp_path / "ours.pth"), "--out", str(tmp_path / "back.pth")]) == 0
    assert "432 tensors -> mmdetection 3.x checkpoint, 3 classes" in capsys.readouterr().out
    original = cr.read(DATA / name).obj["state_dict"]
    back = torch.load(tmp_path / "back.pth", map_location="cpu", weights_only=True)
    assert set(back["state_dict"]) == set(original)
    assert all(torch.equal(back["state_dict"][k], v) and back["state_dict"][k].dtype == v.dtype
               for k, v in original.items())
    assert list(back["meta"]["dataset_meta"]["classes"]) == CLASSES


def _one_line(capsys) -> str:
    return one_plain_line(capsys.readouterr().err)


def test_a_model_with_torchvisions_arithmetic_is_refused(tmp_path, capsys):
    src = _native(tmp_path, "demo")
    assert export_weights.main([str(src), "--out", str(tmp_path / "x.pth")]) == 2
    err = _one_line(capsys)
    assert "recipe demo computes roi_align, anchors, box_decode, mask_paste as torchvision does" in err
    assert not (tmp_path / "x.pth").exists()


def test_class_names_come_from_the_checkpoint_or_the_annotations(tmp_path, capsys):
    src = _native(tmp_path, names=None, **NARROW)
    assert export_weights.main([str(src), "--out", str(tmp_path / "x.pth")]) == 2
    assert "--classes-from" in _one_line(capsys)
    ann = tmp_path / "instances_train.json"
    ann.write_text(json.dumps(dict(categories=[dict(id=7, name="c7"), dict(id=2, name="c2"), dict(id=5, name="c5")])))
    assert export_weights.main([str(src), "--out", str(tmp_path / "x.pth"), "--classes-from", str(ann)]) == 0
    assert cr.read(tmp_path / "x.pth").obj["meta"]["dataset_meta"]["classes"] == ("c2", "c5", "c7")
    ann.write_text(json.dumps(dict(categories=[dict(id=1, name="a")])))
    assert export_weights.main([str(src), "--out", str(tmp_path / "y.pth"), "--classes-from", str(ann)]) == 2
    assert "the model has 3 classes" in _one_line(capsys)


def test_what_is_not_a_dali_scp_checkpoint_gets_one_line(tmp_path, capsys):
    assert export_weights.main([str(DATA / "mmdet3_published.pth"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "not a dali-scp checkpoint" in _one_line(capsys)
    assert export_weights.main([str(DATA / "mmdet3_iter_2.pth"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "trainer.import_weights" in _one_line(capsys)
