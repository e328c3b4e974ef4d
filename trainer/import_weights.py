"""Released Mask R-CNN weights -> a dali-scp checkpoint that ``trainer.evaluate --checkpoint`` and
``trainer.run --init-from`` take.

    python -m trainer.import_weights mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-scp-90k_coco_*.pth --out scp90k.pth
    python -m trainer.import_weights maskrcnn_resnet50_fpn_v2_coco.pth --out tv_v2.pth   # torchvision state dict

Sources: an mmdetection 3.x checkpoint (``{'meta', 'state_dict'}``) of the seed's architecture
(``mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all``: ResNet-50, FPN with BN, RPN of 2 convs, 4conv1fc box
head and 4-conv mask head with BN, any width and class count), or a torchvision
``maskrcnn_resnet50_fpn_v2`` state dict (its 91 COCO-id outputs become the 80 contiguous COCO classes).

What changes on the way: key names; the class layout (mmdetection: background last, 80 x 4 deltas and 80
mask channels; here torchvision's: background first, 81 x 4 and 81 - the background's deltas and mask
channel are never read and are set to 0). Anchor order needs no change: both generators enumerate
(location, ratio 0.5/1/2) in the same order, so RPN channel k means the same anchor (checked against
mmdetection's outputs in tests/test_import_weights.py). BN running statistics are copied like any tensor.
The checkpoint's recipe gets mmdetection's arithmetic for an mmdetection source, torchvision's for a
torchvision one (``dali_scp.presets.MODEL_FIELDS``), so each model computes what it was trained to.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dali_scp.presets import MODEL_FIELDS, Recipe, recipe as get_recipe
from trainer import checkpoint_reader

SEED_ARCH = "mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all (ResNet-50, FPN with BN, 2-conv RPN, 4conv1fc box head and 4-conv mask head with BN)"

# mmdetection key -> this project's (torchvision's) key, after ConvModule's ".conv." / ".bn." became
# Conv2dNormActivation's ".0." / ".1." (``rename_mmdet``)
MMDET_RULES = [
    (r"backbone\.(.*)", r"backbone.body.\1"),
    (r"neck\.lateral_convs\.(.*)", r"backbone.fpn.inner_blocks.\1"),
    (r"neck\.fpn_convs\.(.*)", r"backbone.fpn.layer_blocks.\1"),
    (r"rpn_head\.rpn_conv\.(.*)", r"rpn.head.conv.\1"),
    (r"rpn_head\.rpn_cls\.(.*)", r"rpn.head.cls_logits.\1"),
    (r"rpn_head\.rpn_reg\.(.*)", r"rpn.head.bbox_pred.\1"),
    (r"roi_head\.bbox_head\.shared_convs\.(.*)", r"roi_heads.box_head.\1"),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.(.*)", r"roi_heads.box_head.5.\1"),  # after 4 convs and Flatten
    (r"roi_head\.bbox_head\.fc_cls\.(.*)", r"roi_heads.box_predictor.cls_score.\1"),
    (r"roi_head\.bbox_head\.fc_reg\.(.*)", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"roi_head\.mask_head\.convs\.(.*)", r"roi_heads.mask_head.\1"),
    (r"roi_head\.mask_head\.upsample\.(.*)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"roi_head\.mask_head\.conv_logits\.(.*)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]
CLS, REG, MASK = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                  "roi_heads.mask_predictor.mask_fcn_logits")


class NotImportable(ValueError):
    """A source this importer cannot convert; the message is the one line the CLI prints."""


@dataclass(frozen=True)
class Imported:
    """A converted checkpoint and what the summary line reports."""
    state: dict               # what trainer.evaluate / --init-from read (model, recipe, num_classes, ...)
    source_format: str        # "mmdetection" or "torchvision"
    mapped: int
    unused: list
    missing: list


def _names(keys: list, n: int = 3) -> str:
    """The first tensor names of a source file, printable (a crafted key cannot clear the terminal)."""
    return ", ".join(checkpoint_reader.printable(k, 80) for k in keys[:n])


def read_source(path: Path):
    try:  # as data: mmengine's HistoryBuffer, optimiser or config objects are kept inert, never run
        obj = checkpoint_reader.read(path).obj
    except checkpoint_reader.CheckpointError as e:
        raise NotImportable(str(e)) from None
    if not isinstance(obj, dict):
        raise NotImportable(f"{path}: expected a dict of tensors or {{'meta', 'state_dict'}}, got {type(obj).__name__}")
    if "model" in obj and "recipe" in obj:
        raise NotImportable(f"{path}: already a dali-scp checkpoint; pass it to trainer.evaluate or --init-from directly")
    sd = checkpoint_reader.state_dict_of(obj)
    meta = (obj.get("meta") or {}) if isinstance(obj.get("state_dict"), dict) else {}
    if any(k.startswith("backbone.body.") for k in sd):
        return "torchvision", sd, meta
    if any(k.startswith("backbone.conv1.") or k.startswith("backbone.layer1.") for k in sd):
        return "mmdetection", sd, meta
    raise NotImportable(f"{path}: neither an mmdetection Mask R-CNN checkpoint (keys backbone.conv1..., roi_head...) "
                       "nor a torchvision one (backbone.body..., roi_heads...)")


def rename_mmdet(sd: dict) -> tuple[dict, list]:
    out, unused = {}, []
    for key, v in sd.items():
        k = key if key.startswith("backbone.") else key.replace(".conv.", ".0.").replace(".bn.", ".1.")
        for pat, rep in MMDET_RULES:
            if re.fullmatch(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            unused.append(key)
    return out, unused


def mmdet_class_layout(sd: dict, path: Path) -> int:
    """Background last -> first, in place; returns the number of classes (without background)."""
    try:
        n = sd[f"{CLS}.weight"].shape[0] - 1
        reg, mask = sd[f"{REG}.weight"], sd[f"{MASK}.weight"]
    except KeyError as e:
        raise NotImportable(f"{path}: not the seed's architecture {SEED_ARCH}: no {e.args[0]}") from e
    if reg.shape[0] != 4 * n or mask.shape[0] != n:
        raise NotImportable(f"{path}: class counts disagree: classifier {n} + background, box regressor "
                           f"{reg.shape[0]} = 4 x {reg.shape[0] / 4:g}, mask logits {mask.shape[0]} (class-specific heads expected)")
    for key in (f"{CLS}.weight", f"{CLS}.bias"):
        t = sd[key]
        sd[key] = torch.cat([t[n:], t[:n]])
    for key, rows in ((f"{REG}.weight", 4), (f"{REG}.bias", 4), (f"{MASK}.weight", 1), (f"{MASK}.bias", 1)):
        t = sd[key]
        sd[key] = torch.cat([t.new_zeros((rows,) + t.shape[1:]), t])
    return n


def torchvision_coco_layout(sd: dict) -> tuple[int, list | None]:
    """torchvision's COCO models have 91 outputs indexed by COCO category id (10 ids unused, 'N/A'); keep
    background and the 80 used ones, in id order - the contiguous labels every COCO split here gets.
    Other class counts are kept as they are."""
    n = sd[f"{CLS}.weight"].shape[0] - 1
    if n != 90:
        return n, None
    from torchvision.models._meta import _COCO_CATEGORIES
    keep = [i for i, name in enumerate(_COCO_CATEGORIES) if name != "N/A"]
    idx = torch.tensor(keep)
    reg_idx = (idx[:, None] * 4 + torch.arange(4)).flatten()
    for key in (f"{CLS}.weight", f"{CLS}.bias", f"{MASK}.weight", f"{MASK}.bias"):
        sd[key] = sd[key][idx]
    for key in (f"{REG}.weight", f"{REG}.bias"):
        sd[key] = sd[key][reg_idx]
    return len(keep) - 1, [_COCO_CATEGORIES[i] for i in keep[1:]]


def class_names(meta, n: int) -> list | None:
    """mmdetection 3.x: ``meta['dataset_meta']['classes']``; 2.x (mmcv's runner): ``meta['CLASSES']``."""
    if not isinstance(meta, dict):
        return None
    dm = meta.get("dataset_meta")
    classes = (dm.get("classes") if isinstance(dm, dict) else None) or meta.get("CLASSES")
    ok = isinstance(classes, (list, tuple)) and len(classes) == n and all(isinstance(c, str) for c in classes)
    return list(classes) if ok else None


def widths(sd: dict, path: Path) -> dict:
    """Backbone, FPN and head widths read off the tensors; the model here ties the box head's fc to 4 x
    its convs."""
    try:
        bw = sd["backbone.body.conv1.weight"].shape[0]
        fpn = sd["backbone.fpn.inner_blocks.0.0.weight"].shape[0]
        hc = sd["roi_heads.box_head.0.0.weight"].shape[0]
        fc = sd["roi_heads.box_head.5.weight"].shape[0]
    except KeyError as e:
        raise NotImportable(f"{path}: not the seed's architecture {SEED_ARCH}: no tensor for {e.args[0]}") from e
    if fc != 4 * hc:
        raise NotImportable(f"{path}: box head fc of {fc} channels after convs of {hc}; this model's fc is 4 x the "
                           "conv width (1024 after 256 in the seed)")
    return dict(backbone_width=bw, fpn_channels=fpn, head_channels=hc)


def convert(path, base: Recipe, num_classes: int | None = None) -> Imported:
    """Read ``path``, convert it, and check that every tensor of the model the checkpoint's recipe builds
    is filled with one of the right shape."""
    from trainer.model import build_model
    path = Path(path)
    fmt, sd, meta = read_source(path)
    names = None
    if fmt == "mmdetection":
        sd, unused = rename_mmdet(sd)
        n = mmdet_class_layout(sd, path)
        names = class_names(meta, n)
        style = "mmdet"
        rpn_post = 1000
    else:
        unused = []
        if f"{CLS}.weight" not in sd:
            raise NotImportable(f"{path}: not a Mask R-CNN state dict (no {CLS}.weight)")
        n, names = torchvision_coco_layout(sd)
        style, rpn_post = "torchvision", 2000  # torchvision's rpn_post_nms_top_n_train
    if num_classes is not None and n != num_classes:
        raise NotImportable(f"{path}: the checkpoint has {n} classes, --num-classes says {num_classes}")
    r = replace(base, **widths(sd, path), **{f: style for f in MODEL_FIELDS}, rpn_post_nms_train=rpn_post)
    with torch.device("meta"):  # shapes and dtypes only: sizes read off the file allocate nothing before they match
        target = build_model(r, n + 1).state_dict()
    missing = [k for k in target if k not in sd]
    unused += [k for k in sd if k not in target]
    if missing:
        raise NotImportable(f"{path}: not the seed's architecture {SEED_ARCH}: {len(missing)} tensors missing, "
                           f"e.g. {', '.join(missing[:3])}; unused: {_names(unused) or 'none'}")
    for k, v in target.items():
        if sd[k].shape != v.shape:
            raise NotImportable(f"{path}: not the seed's architecture {SEED_ARCH}: {k} has shape "
                               f"{tuple(sd[k].shape)}, the model needs {tuple(v.shape)}")
    model = {k: sd[k].to(v.dtype).clone() for k, v in target.items()}
    state = dict(model=model, recipe=r.as_dict(), num_classes=n + 1, class_names=names, iteration=0,
                 imported_from=dict(path=str(path), format=fmt))
    return Imported(state, fmt, len(model), unused, missing)


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    from dali_scp.files import atomic_write
    p = cli.ArgumentParser(prog="python -m trainer.import_weights", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="mmdetection checkpoint (.pth with meta and state_dict) or torchvision state dict")
    p.add_argument("--out", required=True, help="the dali-scp checkpoint to write")
    p.add_argument("--recipe", default="r50_ssj_scp_270k",
                   help="recipe the checkpoint records (its evaluation resize and schedule); the model fields "
                        "follow the source (default: r50_ssj_scp_270k)")
    p.add_argument("--num-classes", type=cli.COUNT, default=None, help="fail unless the checkpoint has this many classes")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    imp = convert(a.src, get_recipe(a.recipe), a.num_classes)
    atomic_write(a.out, lambda f: torch.save(imp.state, f), durable=True)
    n = imp.state["num_classes"] - 1
    layout = "background moved first" if imp.source_format == "mmdetection" else "background first as before"
    print(f"{a.src}: {imp.source_format} checkpoint: {imp.mapped} tensors mapped, {len(imp.unused)} unused"
          f"{' (' + _names(imp.unused) + ')' if imp.unused else ''}, {len(imp.missing)} missing; "
          f"{n} classes, {layout}; anchor order unchanged -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
