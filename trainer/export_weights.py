"""A dali-scp checkpoint -> an mmdetection 3.x checkpoint (``meta`` with ``dataset_meta`` classes,
``state_dict``), for mmdetection's own tools (``init_detector``, ``tools/test.py``, MMDeploy) or a
comparison in an existing mmdetection setup.

    python -m trainer.export_weights runs/ssj_scp/best.pth --to mmdetection --out scp_mmdet.pth

The inverse of ``trainer.import_weights``: the same key map run backwards and the class layout put back
(background last; mmdetection has no place for the background's box deltas and mask channel, which
neither framework's inference reads: they are dropped, and come back as zeros on import). Only models that
compute what mmdetection computes export: a recipe with mmdetection's test-time arithmetic (RoIAlign,
anchors, box decoding, mask paste: ``dali_scp.presets.MODEL_FIELDS``) on the seed's ResNet-50 - the ``r50_*``
presets. The config to load it with is the seed's (``mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_...``),
with ``num_classes`` set to the checkpoint's class count. See docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from dali_scp.presets import Recipe
from trainer import checkpoint as ckpt
from trainer.import_weights import CLS, MASK, MMDET_RULES, REG

# the fields whose torchvision form would make mmdetection compute other detections from the same weights
TEST_TIME_FIELDS = ("roi_align", "anchors", "box_decode", "mask_paste")
SEED_ANCHORS = (32, 64, 128, 256, 512)  # mmdetection's AnchorGenerator: scales [8] x strides 4..64

# this project's key -> mmdetection's, before ConvModule's ".0." / ".1." become ".conv." / ".bn."
# (most specific first: box_head.5 is the fc, box_head.0-3 the convs)
_REVERSE = sorted(((re.escape(rep).replace(re.escape(r"\1"), "(.*)"), pat.replace("\\.", ".").replace("(.*)", r"\1"))
                   for pat, rep in MMDET_RULES), key=lambda r: -len(r[0]))


class NotExportable(ValueError):
    """A checkpoint this exporter refuses; the message is the one line the CLI prints."""


def mmdet_key(key: str) -> str | None:
    for pat, rep in _REVERSE:
        if re.fullmatch(pat, key):
            k = re.sub(pat, rep, key)
            if k.startswith("backbone."):
                return k
            k = re.sub(r"^(.*\.\d+)\.0\.(\w+)$", r"\1.conv.\2", k)
            return re.sub(r"^(.*\.\d+)\.1\.(\w+)$", r"\1.bn.\2", k)
    return None


def check_model(path, r: Recipe) -> None:
    torchvision_fields = [f for f in TEST_TIME_FIELDS if getattr(r, f) != "mmdet"]
    if torchvision_fields:
        raise NotExportable(
            f"{path}: recipe {r.name} computes {', '.join(torchvision_fields)} as torchvision does, so mmdetection "
            "would compute other detections from these weights; only models with mmdetection's arithmetic "
            "export (the r50_* presets)")
    if r.backbone != "resnet50":
        raise NotExportable(f"{path}: recipe {r.name}'s backbone {r.backbone} is not mmdetection's ResNet-50 of the seed config")
    if tuple(r.anchor_sizes) != SEED_ANCHORS:
        raise NotExportable(f"{path}: anchor sizes {tuple(r.anchor_sizes)} differ from mmdetection's {SEED_ANCHORS}")


def to_mmdet(model: dict, path) -> OrderedDict:
    """Keys mapped back, classes moved back: background last, its deltas and mask channel dropped."""
    out = OrderedDict()
    for k, v in model.items():
        mk = mmdet_key(k)
        if mk is None:
            raise NotExportable(f"{path}: tensor {k} has no place in mmdetection's seed model")
        if k in (f"{CLS}.weight", f"{CLS}.bias"):
            v = torch.cat([v[1:], v[:1]])
        elif k in (f"{REG}.weight", f"{REG}.bias"):
            v = v[4:]
        elif k in (f"{MASK}.weight", f"{MASK}.bias"):
            v = v[1:]
        out[mk] = v.detach().clone().contiguous()
    return out


def class_names(state: dict, n: int, path, classes_from: str | None) -> list:
    """The names of the model's ``n`` foreground classes, in the label order training used."""
    if classes_from:
        from dali_scp.image_index import image_index
        names, where = image_index(classes_from).cat_names.tolist(), classes_from
    else:
        names, where = state.get("class_names"), "the checkpoint"
        if not names:
            raise NotExportable(f"{path}: the checkpoint records no class names (written before they were kept); "
                                "pass --classes-from the training annotations JSON")
    if len(names) != n:
        raise NotExportable(f"{path}: the model has {n} classes, {where} names {len(names)}")
    return list(names)


def export(path, classes_from: str | None = None) -> dict:
    state, r, n, tensors = ckpt.load_trained(Path(path))
    check_model(path, r)
    names = class_names(state, n - 1, path, classes_from)
    meta = dict(dataset_meta=dict(classes=tuple(names)),
                exported_from=dict(path=str(path), recipe=r.name, iteration=int(state.get("iteration", 0)),
                                   tool="dali-scp trainer.export_weights"))
    return dict(meta=meta, state_dict=to_mmdet(tensors, path))


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    from dali_scp.files import atomic_write
    p = cli.ArgumentParser(prog="python -m trainer.export_weights", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a dali-scp checkpoint (ckpt_*.pth, best.pth, or one trainer.import_weights wrote)")
    p.add_argument("--to", default="mmdetection", choices=("mmdetection",), help="target format (mmdetection 3.x)")
    p.add_argument("--out", required=True, help="the mmdetection checkpoint to write")
    p.add_argument("--classes-from", default=None, metavar="ANNOTATIONS_JSON",
                   help="class names from a COCO annotations file (categories in id order), for checkpoints "
                        "that record none")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    ck = export(a.src, a.classes_from)
    atomic_write(a.out, lambda f: torch.save(ck, f), durable=True)
    print(f"{a.src}: {len(ck['state_dict'])} tensors -> mmdetection 3.x checkpoint, "
          f"{len(ck['meta']['dataset_meta']['classes'])} classes (background moved last; its box deltas and mask "
          f"channel, which no inference reads, dropped) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
