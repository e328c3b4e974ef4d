"""Imported mmdetection weights compute what mmdetection computes.

``tests/data/mmdet_reference.npz`` was written by ``scripts/mmdet_reference.py`` in a side environment with
mmdetection 3.3 (mmcv-lite; its nms and RoIAlign kernels stood in by torchvision's): the seed config's model
(narrowed: FPN and heads 32 channels, 8 classes; ResNet-50 kept) with seeded random weights and BN statistics,
saved by mmengine, and its outputs on two already-resized images. Here the same checkpoint is rebuilt bit
for bit (its digest is mmdetection's), imported with ``trainer.import_weights``, loaded as
``trainer.evaluate`` loads checkpoints, and run through ``trainer.model.inference``.
"""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from reference_files import load_reference, reference_script, seeded_mmdet_checkpoint
from dali_scp.presets import MODEL_FIELDS, recipe
from trainer import import_weights
from trainer import mmdet_style as mm

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "data" / "mmdet_reference.npz"
# float32 on the CPU, measured differences in brackets (values up to ~16 in size): since the recipe normalises
# pixels in mmdetection's order (``normalize``), all but the detection scores are equal bit for bit
FEATURE_ATOL = 1e-4        # FPN outputs, RPN objectness and deltas (0; 2.1e-5 with torchvision's normalisation)
PROPOSAL_SCORE_ATOL = 1e-5  # (<= 6e-8)
BOX_ATOL = 0.01            # pixels, proposals and detections (0)
SCORE_ATOL = 1e-4          # detection scores (<= 1.5e-7)
MASK_PROB_ATOL = 2e-4      # 28x28 mask probabilities of the top 20 detections (0)
MASK_PIXELS = 5e-4         # fraction of pasted mask pixels on the other side of 0.5 (0)


def _script():
    return reference_script("mmdet_reference")


@pytest.fixture(scope="module")
def ref():
    return load_reference(REF)


@pytest.fixture(scope="module")
def mmdet_checkpoint(ref, tmp_path_factory):
    """The checkpoint mmengine saved, rebuilt from its key list and seed; equal to it byte for byte."""
    info = ref["info"]
    meta = dict(info["meta"], dataset_meta=dict(classes=tuple(info["meta"]["dataset_meta"]["classes"])))
    return seeded_mmdet_checkpoint(info, tmp_path_factory.mktemp("mmdet") / "mask-rcnn_seed_narrow.pth", meta)


@pytest.fixture(scope="module")
def imported(mmdet_checkpoint):
    """(imported checkpoint, what the CLI printed)."""
    import contextlib
    import io
    out, printed = mmdet_checkpoint.with_name("imported.pth"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert import_weights.main([str(mmdet_checkpoint), "--out", str(out)]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def ours(imported, ref):
    """Everything the comparison needs from one ``inference`` call of the imported model."""
    from trainer.evaluate import load_model_from_checkpoint
    from trainer.model import inference
    model, r, state = load_model_from_checkpoint(str(imported[0]))
    model.eval()
    sizes = [tuple(int(v) for v in s) for s in ref["image_sizes"]]
    imgs = [torch.from_numpy(ref["images"][i, :h, :w]).permute(2, 0, 1).contiguous() for i, (h, w) in enumerate(sizes)]
    cap = {}
    model.backbone.register_forward_hook(lambda m, i, o: cap.__setitem__("fpn", list(o.values())))
    model.rpn.head.register_forward_hook(lambda m, i, o: cap.__setitem__("rpn", o))
    model.roi_heads.mask_predictor.register_forward_hook(lambda m, i, o: cap.__setitem__("mask_logits", o))
    filter_proposals = model.rpn.filter_proposals

    def keep_proposals(*a):
        cap["proposals"] = filter_proposals(*a)
        return cap["proposals"]
    model.rpn.filter_proposals = keep_proposals
    with torch.no_grad():
        cap["dets"] = inference(model, imgs, sizes)
    cap.update(recipe=r, state=state, sizes=sizes, imgs=imgs)
    return cap


def test_import_maps_every_tensor_and_says_so(imported, ref):
    out, printed = imported
    assert "432 tensors mapped, 0 unused, 0 missing; 8 classes, background moved first" in printed
    state = torch.load(out, map_location="cpu", weights_only=True)
    r = recipe("r50_ssj_scp_270k")
    assert state["num_classes"] == 9 and state["class_names"] == list(ref["info"]["class_names"])
    assert state["recipe"]["fpn_channels"] == 32 and state["recipe"]["head_channels"] == 32
    assert all(state["recipe"][f] == "mmdet" for f in MODEL_FIELDS)
    assert state["recipe"]["eval_resize"]["max_long"] == r.eval_resize.max_long
    info = ref["info"]
    bn = [k for k, *_ in info["spec"] if k.endswith("running_var")]
    sd = _script().seeded_state_dict(info["spec"], info["seed"])
    assert torch.equal(state["model"]["backbone.body.layer3.5.bn2.running_var"], sd["backbone.layer3.5.bn2.running_var"])
    assert len(bn) == sum(k.endswith("running_var") for k in state["model"])
    # background: mmdetection's last classifier row is ours first; its deltas and mask channel are zeros
    assert torch.equal(state["model"]["roi_heads.box_predictor.cls_score.weight"][0], sd["roi_head.bbox_head.fc_cls.weight"][-1])
    assert not state["model"]["roi_heads.box_predictor.bbox_pred.weight"][:4].any()


@pytest.mark.parametrize("level", range(5))
def test_fpn_and_rpn_outputs_equal_mmdetections(ours, ref, level):
    assert np.abs(ours["fpn"][level].numpy() - ref[f"fpn{level}"]).max() <= FEATURE_ATOL
    objectness, deltas = ours["rpn"]
    assert np.abs(objectness[level].numpy() - ref[f"rpn_cls{level}"]).max() <= FEATURE_ATOL
    assert np.abs(deltas[level].numpy() - ref[f"rpn_reg{level}"]).max() <= FEATURE_ATOL


@pytest.mark.parametrize("i", range(2))
def test_proposals_after_nms_equal_mmdetections(ours, ref, i):
    """Same number kept; each of mmdetection's proposals is one of ours, box and score (near-equal scores
    may trade places in the sorted list, so they are paired by box and score, one to one)."""
    boxes, scores = ours["proposals"][0][i], ours["proposals"][1][i]
    rb, rs = torch.from_numpy(ref[f"proposals{i}"]), torch.from_numpy(ref[f"proposal_scores{i}"])
    assert len(boxes) == len(rb) > 100
    cost = (rb[:, None] - boxes[None]).abs().amax(-1) + 1e3 * (rs[:, None] - scores[None]).abs()
    pair = cost.argmin(dim=1)
    assert len(set(pair.tolist())) == len(rb)
    assert (scores[pair] - rs).abs().max() <= PROPOSAL_SCORE_ATOL
    assert (boxes[pair] - rb).abs().max() <= BOX_ATOL


@pytest.mark.parametrize("i", range(2))
def test_detections_and_masks_equal_mmdetections(ours, ref, i):
    det = ours["dets"][i]
    h, w = ours["sizes"][i]
    assert len(det["boxes"]) == len(ref[f"boxes{i}"]) == 100
    assert np.array_equal(det["labels"].numpy() - 1, ref[f"labels{i}"])  # rank order and classes, all 100
    assert np.abs(det["boxes"].numpy() - ref[f"boxes{i}"]).max() <= BOX_ATOL
    assert np.abs(det["scores"].numpy() - ref[f"scores{i}"]).max() <= SCORE_ATOL
    start = 0 if i == 0 else len(ours["dets"][0]["labels"])
    logits = ours["mask_logits"][start:start + len(det["labels"])]
    probs = logits[torch.arange(len(det["labels"])), det["labels"]].sigmoid()[: len(ref[f"mask_probs{i}"])]
    assert np.abs(probs.numpy() - ref[f"mask_probs{i}"]).max() <= MASK_PROB_ATOL
    theirs = np.unpackbits(ref[f"masks{i}"], axis=-1)[..., :w].astype(bool)
    mine = (det["masks"][:, 0] >= 0.5).numpy()  # mmdetection's mask_thr_binary rule
    assert mine.shape == theirs.shape == (100, h, w)
    assert (mine != theirs).mean() <= MASK_PIXELS and theirs.sum() > 10000


@pytest.mark.parametrize("field", ["roi_align", "anchors", "mask_paste"])
def test_torchvisions_choice_would_not_match(ours, ref, field):
    """The comparison can tell: switching one field back to torchvision's moves boxes or masks."""
    from trainer.model import build_model, inference
    model = build_model(replace(ours["recipe"], **{field: "torchvision"}), 9)
    model.load_state_dict(ours["state"]["model"])
    with torch.no_grad():
        det = inference(model.eval(), ours["imgs"][:1], ours["sizes"][:1])[0]
    n = min(len(det["boxes"]), 100)
    moved = np.abs(det["boxes"][:n].numpy() - ref["boxes0"][:n]).max() > 1
    masks = (det["masks"][:n, 0] >= 0.5).numpy() != np.unpackbits(ref["masks0"], axis=-1)[:n, :, :224].astype(bool)
    assert moved or masks.mean() > 10 * MASK_PIXELS


def test_box_coder_matches_delta2bbox_beyond_the_clip(ref):
    rois, deltas = torch.from_numpy(ref["case_coder_rois"]), torch.from_numpy(ref["case_coder_deltas"])
    from torchvision.ops import clip_boxes_to_image
    rpn = clip_boxes_to_image(mm.ClampedBoxCoder((1.0,) * 4).decode_single(deltas[:, :4] * 3, rois), (160, 224))
    assert torch.allclose(rpn, torch.from_numpy(ref["case_coder_rpn"]), atol=1e-3)
    rcnn = mm.ClampedBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, rois).reshape(64, 3, 4)
    rcnn = clip_boxes_to_image(rcnn, (160, 224)).reshape(64, 12)
    assert torch.allclose(rcnn, torch.from_numpy(ref["case_coder_rcnn"]), atol=1e-3)


@pytest.mark.parametrize("stage,thr", [("rpn", (0.7, 0.3, 0.3)), ("rcnn", (0.5, 0.5, 0.5))])
def test_matcher_is_max_iou_assigner(ref, stage, thr):
    q = box_iou(torch.from_numpy(ref["case_assign_gts"]), torch.from_numpy(ref["case_coder_rois"]))
    mine = mm.MaxIoUMatcher(thr[0], thr[1], min_pos_iou=thr[2])(q)
    assert np.array_equal(mine.numpy(), ref[f"case_assign_{stage}"])
    assert (ref[f"case_assign_{stage}"] >= 0).sum() >= 10


def test_mask_targets_are_crop_and_resize_binarised(ref):
    t = mm.aligned_mask_targets(torch.from_numpy(ref["case_mask_gt"]), torch.from_numpy(ref["case_coder_rois"]),
                                torch.from_numpy(ref["case_mask_inds"]), 28)
    theirs = torch.from_numpy(ref["case_mask_targets"])
    assert (t != theirs).float().mean() <= 1e-3 and theirs.sum() > 1000


def test_mmdet_init_has_mmdetections_statistics(ref):
    """Mean and std of every weight after ``mmdet_init`` against mmdetection's ``init_weights()``."""
    from trainer.model import build_model
    torch.manual_seed(0)
    r = replace(recipe("r50_ssj_90k"), fpn_channels=32, head_channels=32)
    sd = build_model(r, 9).state_dict()
    names, _ = import_weights.rename_mmdet({k: None for k in ref["info"]["init_stats"]})
    mapping = dict(zip(names, ref["info"]["init_stats"].values()))
    assert len(mapping) == len(ref["info"]["init_stats"]) > 200
    for key, (mean, std) in mapping.items():
        v = sd[key].float()
        if key.startswith(("roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits")):
            v = v[1:] if "cls_score" in key or "mask_fcn" in key else v[4:]
        n = v.numel()  # sampling error of a mean and of a std over n draws, 5 standard errors
        assert abs(v.std().item() - std) <= 5 * std / (2 * n) ** 0.5 + 1e-6, key
        assert abs(v.mean().item() - mean) <= 5 * std / n ** 0.5 + 1e-6, key


def test_other_architectures_and_class_counts_get_one_line(mmdet_checkpoint, tmp_path, capsys):
    ck = torch.load(mmdet_checkpoint, map_location="cpu", weights_only=True)
    one_conv = dict(ck, state_dict={k.replace("rpn_conv.0.", "rpn_conv."): v for k, v in ck["state_dict"].items()
                                    if "rpn_conv.1." not in k})
    torch.save(one_conv, tmp_path / "rpn1.pth")
    assert import_weights.main([str(tmp_path / "rpn1.pth"), "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not the seed's architecture" in err and "rpn.head.conv.0.0.weight" in err
    assert import_weights.main([str(mmdet_checkpoint), "--out", str(tmp_path / "x.pth"), "--num-classes", "80"]) == 2
    assert "has 8 classes, --num-classes says 80" in capsys.readouterr().err
    bad = dict(ck, state_dict=dict(ck["state_dict"]))
    bad["state_dict"]["roi_head.mask_head.conv_logits.weight"] = bad["state_dict"]["roi_head.mask_head.conv_logits.weight"][:5]
    torch.save(bad, tmp_path / "bad.pth")
    assert import_weights.main([str(tmp_path / "bad.pth"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "class counts disagree" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert import_weights.main([str(tmp_path / "junk.pth"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_torchvision_v2_state_dict_imports_and_computes_the_same(tmp_path):
    """A torchvision ``maskrcnn_resnet50_fpn_v2`` (built here, nothing downloaded) imported keeps torchvision's
    arithmetic and gives its detections; its 91 COCO-id outputs become the 80 contiguous classes."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
    from torchvision.models._meta import _COCO_CATEGORIES
    from trainer.evaluate import load_model_from_checkpoint
    from trainer.model import inference
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=9).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert import_weights.main([str(tmp_path / "tv.pth"), "--out", str(tmp_path / "imp.pth")]) == 0
    model, r, _ = load_model_from_checkpoint(str(tmp_path / "imp.pth"))
    assert all(getattr(r, f) == "torchvision" for f in MODEL_FIELDS)
    img = (torch.rand(3, 192, 256) * 255).to(torch.uint8)
    with torch.no_grad():
        mine = inference(model.eval(), [img], [(192, 256)])[0]
        tv.transform.min_size, tv.transform.max_size = (192,), 256  # no resize: the same input tensor
        theirs = tv([img.float() / 255])[0]
    assert len(mine["boxes"]) == len(theirs["boxes"]) > 0
    assert torch.allclose(mine["boxes"], theirs["boxes"], atol=1e-3)
    assert torch.equal(mine["labels"], theirs["labels"])
    assert torch.allclose(mine["masks"], theirs["masks"], atol=1e-4)
    # 91 outputs indexed by COCO id -> background + the 80 used ids, in id order
    sd = {k: v.clone() for k, v in tv.state_dict().items()}
    for k in [k for k in sd if "cls_score" in k or "bbox_pred" in k or "mask_fcn_logits" in k]:
        rows = 91 * (4 if "bbox_pred" in k else 1)
        sd[k] = torch.arange(rows, dtype=torch.float32).reshape((rows,) + (1,) * (sd[k].dim() - 1)).expand(
            (rows,) + sd[k].shape[1:]).clone()
    n, names = import_weights.torchvision_coco_layout(sd)
    used = [i for i, c in enumerate(_COCO_CATEGORIES) if c != "N/A"]
    assert n == 80 and names[0] == "person" and names[-1] == "toothbrush"
    assert sd["roi_heads.box_predictor.cls_score.bias"].tolist() == used
    assert sd["roi_heads.box_predictor.bbox_pred.bias"][4:8].tolist() == [4, 5, 6, 7]


def test_demo_recipe_keeps_torchvisions_choices_and_seed_recipes_use_mmdetections():
    assert all(getattr(recipe("demo"), f) == "torchvision" for f in MODEL_FIELDS)
    for name in ("r50_ssj_90k", "r50_ssj_scp_90k", "r50_ssj_270k", "r50_ssj_scp_270k"):
        r = recipe(name)
        assert all(getattr(r, f) == "mmdet" for f in MODEL_FIELDS) and r.rpn_post_nms_train == 1000


def _png_export(src_root: Path, dst: Path, n: int = 3) -> Path:
    """A COCO export as annotation tools write them: PNG (RGBA) images, annotation ids from 0, categories
    listed in another order than their ids."""
    from PIL import Image
    doc = json.loads((src_root / "annotations" / "instances_val2017.json").read_text())
    doc["images"] = doc["images"][:n]
    keep = {im["id"] for im in doc["images"]}
    (dst / "val2017").mkdir(parents=True)
    (dst / "annotations").mkdir()
    for im in doc["images"]:
        png = Path(im["file_name"]).with_suffix(".png").name
        Image.open(src_root / "val2017" / im["file_name"]).convert("RGBA").save(dst / "val2017" / png)
        im["file_name"] = png
    doc["annotations"] = [dict(a, id=k) for k, a in enumerate(a for a in doc["annotations"] if a["image_id"] in keep)]
    doc["categories"] = doc["categories"][::-1]
    (dst / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return dst


def test_evaluate_runs_on_an_imported_checkpoint(imported, small_root, tmp_path):
    """End to end through trainer.evaluate (DALI resize to 1333x800, paste, COCOeval) on the synthetic
    dataset's layout and on a PNG export with id-0 annotations; every image scored, 100 detections each."""
    from trainer import evaluate as ev
    syn = small_root(2)
    for root, n in ((syn, 2), (_png_export(syn, tmp_path / "export", 2), 2)):
        out = tmp_path / f"eval_{root.name}"
        assert ev.main(["--checkpoint", str(imported[0]), "--coco-root", str(root), "--out", str(out),
                        "--device", "cpu", "--batch-size", "2"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics) == {"bbox", "segm"} and all(0 <= v <= 1 for v in metrics["segm"].values())
        results = json.loads((out / "results.json").read_text())
        assert len({r["image_id"] for r in results}) == n and len(results) == 100 * n
        assert all("segmentation" in r for r in results)


def test_evaluate_refuses_another_class_count(imported, small_root, tmp_path, capsys):
    from trainer import evaluate as ev
    root = small_root(1)
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    doc["categories"] = doc["categories"][:5]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").symlink_to(root / "val2017", target_is_directory=True)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    assert ev.main(["--checkpoint", str(imported[0]), "--coco-root", str(tmp_path), "--device", "cpu"]) == 2
    assert "the model has 8 classes" in capsys.readouterr().err


def test_init_from_loads_weights_only_and_refits_class_heads(imported, tmp_path):
    from trainer import checkpoint as ckpt
    from trainer.model import build_model
    from trainer.run import init_from
    state = torch.load(imported[0], map_location="cpu", weights_only=True)
    r = replace(recipe("r50_ssj_scp_90k"), fpn_channels=32, head_channels=32)
    same = build_model(r, 9)
    init_from(same, str(imported[0]), r)
    assert all(torch.equal(v, state["model"][k]) for k, v in same.state_dict().items())
    other = build_model(r, 4)  # fine-tuning on 3 classes: all but the class-specific predictors
    before = {k: v.clone() for k, v in other.state_dict().items()}
    init_from(other, str(imported[0]), r)
    for k, v in other.state_dict().items():
        fresh = k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits."))
        assert torch.equal(v, before[k] if fresh else state["model"][k]), k
    with pytest.raises(ckpt.CheckpointError, match="does not fit recipe r50_ssj_scp_90k"):
        init_from(build_model(recipe("r50_ssj_scp_90k"), 9), str(imported[0]), recipe("r50_ssj_scp_90k"))
    # a file read as data may hold anything where a tensor belongs: named in one line, never an AttributeError
    k = next(iter(state["model"]))
    torch.save(dict(state, model=dict(state["model"], **{k: "not a tensor"})), tmp_path / "str.pth")
    with pytest.raises(ckpt.CheckpointError, match=f"{k}: checkpoint has nothing"):
        init_from(build_model(r, 9), str(tmp_path / "str.pth"), r)
    torch.save(dict(state, model=[1, 2]), tmp_path / "list.pth")
    with pytest.raises(ckpt.CheckpointError, match="not a dali-scp checkpoint"):
        init_from(build_model(r, 9), str(tmp_path / "list.pth"), r)


def test_run_cli_starts_from_init_weights_with_a_fresh_schedule(syn_root, tmp_path):
    """``trainer.run --init-from``: iteration 0, fresh optimiser; the first step starts from those weights."""
    from trainer import checkpoint as ckpt
    from trainer import run as run_mod
    common = ["--preset", "demo", "--coco-root", str(syn_root), "--no-eval", "--threads", "2", "--batch-size", "2"]
    run_mod.train(run_mod.parse_args(common + ["--out", str(tmp_path / "a"), "--max-iters", "2"]))
    first = ckpt.latest(tmp_path / "a")
    summary = run_mod.train(run_mod.parse_args(common + ["--out", str(tmp_path / "b"), "--max-iters", "1",
                                                         "--init-from", str(first)]))
    assert summary["iteration"] == 1
    b = ckpt.load(ckpt.latest(tmp_path / "b"))
    assert b["iteration"] == 1 and len(b["optimizer"]["state"]) > 0
    assert len(b["class_names"]) == b["num_classes"] - 1 and all(isinstance(n, str) for n in b["class_names"])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["resolved"]["init_from"] == str(first)
    w0, w1 = ckpt.load(first)["model"], b["model"]
    k = "backbone.body.conv1.weight"
    assert not torch.equal(w0[k], w1[k]) and (w0[k] - w1[k]).abs().max() < 0.05  # one small step away
    with pytest.raises(SystemExit):
        run_mod.parse_args(common + ["--init-from", str(first), "--backbone-weights", str(first)])


# ------------------------------------------------------------------ and back: trainer.export_weights
EXPORT_REF = ROOT / "tests" / "data" / "mmdet_export_reference.npz"


@pytest.fixture(scope="module")
def exported(imported):
    out = imported[0].with_name("exported_mmdet.pth")
    from trainer import export_weights
    assert export_weights.main([str(imported[0]), "--to", "mmdetection", "--out", str(out)]) == 0
    return out


def test_export_is_what_mmdetections_init_detector_loaded(exported, mmdet_checkpoint, ref):
    """``scripts/mmdet_checkpoints.py export`` ran the same import and export in the side venv, loaded the file
    with ``init_detector`` (strict: no missing or unexpected key) and recorded its digest: the file written
    here is that file, and it is the original mmdetection checkpoint again, bit for bit."""
    z = np.load(EXPORT_REF)
    theirs = torch.load(exported, map_location="cpu", weights_only=True)
    assert _script().state_dict_digest(theirs["state_dict"]) == str(z["digest"])
    assert int(z["missing"]) == int(z["unexpected"]) == 0
    assert list(theirs["meta"]["dataset_meta"]["classes"]) == list(z["classes"]) == list(ref["info"]["class_names"])
    original = torch.load(mmdet_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert set(theirs["state_dict"]) == set(original)
    assert all(torch.equal(theirs["state_dict"][k], v) and theirs["state_dict"][k].dtype == v.dtype
               for k, v in original.items())


@pytest.fixture(scope="module")
def ours_from_export(exported, ref):
    """This project's inference of the file export_weights wrote, read back through import_weights: what
    a user who exported, and then brought the file back, would detect."""
    from trainer.evaluate import load_model_from_checkpoint
    from trainer.model import inference
    back = exported.with_name("exported_then_imported.pth")
    assert import_weights.main([str(exported), "--out", str(back)]) == 0
    model = load_model_from_checkpoint(str(back))[0].eval()
    sizes = [tuple(int(v) for v in s) for s in ref["image_sizes"]]
    imgs = [torch.from_numpy(ref["images"][i, :h, :w]).permute(2, 0, 1).contiguous() for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        return inference(model, imgs, sizes)


@pytest.mark.parametrize("i", range(2))
def test_mmdetections_detections_from_the_export_equal_ours(ours_from_export, i):
    """init_detector(seed config narrowed, exported file) on the reference images, recorded in the side venv,
    vs this project's inference of the file exported here and imported back: every label in rank order,
    boxes and scores (tolerances above). An export that misplaces a class row or tensor fails here."""
    z = np.load(EXPORT_REF)
    det = ours_from_export[i]
    assert len(z[f"labels{i}"]) == len(det["labels"]) == 100
    assert np.array_equal(det["labels"].numpy() - 1, z[f"labels{i}"])
    assert np.abs(det["boxes"].numpy() - z[f"boxes{i}"]).max() <= BOX_ATOL
    assert np.abs(det["scores"].numpy() - z[f"scores{i}"]).max() <= SCORE_ATOL
