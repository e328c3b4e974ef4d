"""Checkpoint files as mmdetection's and torchvision's own tooling writes them, for the reader's tests
(``tests/test_checkpoint_reader.py``, ``tests/data/checkpoints/``).

    PYTHONPATH=$PWD /work/venvs/mmdet/bin/python scripts/mmdet_checkpoints.py mmdet3      # mmdet 3.3 / mmengine
    /work/venvs/mmcv1/bin/python scripts/mmdet_checkpoints.py mmcv1                       # mmcv 1.7 runner
    python scripts/mmdet_checkpoints.py torchvision                                        # any env with torchvision
    PYTHONPATH=$PWD /work/venvs/mmdet/bin/python scripts/mmdet_checkpoints.py export      # export -> init_detector

Each part takes ``--out DIR`` to write into DIR (its own ``reference.json`` there) instead of tests/data.

The mmcv 1.x venv: ``python3 -m venv --system-site-packages /work/venvs/mmcv1;
MMCV_WITH_OPS=0 /work/venvs/mmcv1/bin/pip install --no-build-isolation mmcv==1.7.2`` (mmcv 1.x's pure-Python
build: its runner and ``save_checkpoint``, no compiled ops).

What each writes, all from the seed config's model narrowed so that the files stay small (ResNet-50 of
``base_channels=2``: stages of 8-16-32-64 channels, the same 53 convolutions and keys; FPN 16 channels, head
convs 8, box-head fc 32, 3 classes):

- ``mmdet3``: a 2-iteration training run with mmengine's ``Runner`` on the seed config
  (``...ssj-scp-90k_coco.py``: its SSJ + copy-paste pipeline at 128 px on a 4-image COCO set made here, SGD,
  LinearLR + MultiStepLR) -> ``mmdet3_iter_2.pth`` as the CheckpointHook saved it (``meta`` with NumPy
  scalars, ``message_hub`` with ``HistoryBuffer`` objects, ``optimizer``, ``param_schedulers``); the same
  file through mmdetection's ``tools/model_converters/publish_model.py`` (run as the tool, so torch's legacy
  format as mmdetection publishes) -> ``mmdet3_published.pth``; and the files' contents as mmdetection
  reads them (``torch.load(weights_only=False)`` here, in the trusted side venv) in ``reference.json``.
- ``mmcv1``: mmcv 1.x's ``EpochBasedRunner`` (the mmdetection 2.x training loop) with its CheckpointHook,
  two epochs of 2 iterations over the same state dict, meta as mmdetection 2.x's ``train_detector`` fills
  it (``CLASSES``, ``mmdet_version``, ``env_info``, ``config``, ``seed``, ``exp_name``; mmcv adds
  ``mmcv_version``, ``time``, and ``hook_msgs`` from the first epoch's save) -> ``mmcv1_epoch_2.pth``; and mmdetection 2.x's publish step
  (the same as 3.x's: keep ``meta`` and ``state_dict``, legacy format) -> ``mmcv1_published.pth``.
- ``torchvision``: ``torch.save(model.state_dict())`` of torchvision's ``MaskRCNN`` assembled as its
  ``maskrcnn_resnet50_fpn_v2`` builder does (narrowed the same way) -> ``torchvision_state_dict.pth``.

Each side appends what its files hold (state-dict digests, meta values) to ``reference.json``.

- ``export``: mmdetection's ``init_detector`` on a checkpoint ``trainer.export_weights`` wrote
  (``export_check``) -> ``tests/data/mmdet_export_reference.npz``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "checkpoints"
REFERENCE = OUT / "reference.json"
CLASSES = ("disc", "square", "triangle")
BASE_CHANNELS, FPN, HEAD, FC = 2, 16, 8, 32
IMAGE = 128


sys.path.insert(0, str(Path(__file__).resolve().parent))
from mmdet_reference import state_dict_digest as digest  # noqa: E402  (the tests compute the same)


def record(name: str, entry: dict) -> None:
    ref = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    ref[name] = entry
    REFERENCE.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")


def tiny_coco(root: Path) -> Path:
    """4 images of 128 x 128 with a disc, a square and a triangle each; polygon masks."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(4):
        im = Image.fromarray(rng.integers(0, 60, (IMAGE, IMAGE, 3), dtype=np.uint8))
        d = ImageDraw.Draw(im)
        for c, (x, y) in enumerate(rng.integers(10, IMAGE - 50, (3, 2)).tolist()):
            s = 36
            poly = {0: [(x + s / 2 + s / 2 * np.cos(t), y + s / 2 + s / 2 * np.sin(t)) for t in np.linspace(0, 6.2, 16)],
                    1: [(x, y), (x + s, y), (x + s, y + s), (x, y + s)],
                    2: [(x, y + s), (x + s / 2, y), (x + s, y + s)]}[c]
            d.polygon(poly, fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=c + 1, iscrowd=0,
                             segmentation=[[float(v) for p in poly for v in p]],
                             bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                             area=float((max(xs) - min(xs)) * (max(ys) - min(ys)))))
        im.save(root / "train2017" / f"{i:03d}.jpg", quality=95)
        images.append(dict(id=i + 1, file_name=f"{i:03d}.jpg", height=IMAGE, width=IMAGE))
    doc = dict(images=images, annotations=anns, categories=[dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)])
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return root


# ------------------------------------------------------------------ mmdetection 3.x (mmengine)
def mmdet3() -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from mmdet_reference import _stand_in_kernels, narrow_model_cfg, seed_config
    _stand_in_kernels()
    import mmdet
    from mmengine.config import Config
    from mmengine.runner import Runner

    work = Path(tempfile.mkdtemp(prefix="mmdet3_ckpt_"))
    data = tiny_coco(work / "coco")
    cfg = Config.fromfile(str(seed_config()))
    # the seed model narrowed so that the files stay small (and SyncBN -> BN: one CPU process); keys and layer
    # counts unchanged
    narrow_model_cfg(cfg.model, backbone_width=BASE_CHANNELS, pad_size=IMAGE, num_classes=len(CLASSES),
                     narrow=dict(fpn_channels=FPN, head_channels=HEAD, fc_channels=FC))
    for ex in (cfg.model.roi_head.bbox_roi_extractor, cfg.model.roi_head.mask_roi_extractor):
        ex.roi_layer.use_torchvision = True  # mmcv's RoIAlign through torchvision's op (forward and backward)
    ds = cfg.train_dataloader.dataset.dataset
    ds.update(data_root=str(data) + "/", metainfo=dict(classes=CLASSES))
    for t in ds.pipeline:
        for k in ("scale", "crop_size", "size"):
            if k in t:
                t[k] = (IMAGE, IMAGE)
    cfg.train_dataloader.update(batch_size=2, num_workers=0, persistent_workers=False)
    cfg.train_cfg.update(max_iters=2, val_interval=10 ** 6)
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.work_dir = str(work / "work_dir")
    cfg.randomness = dict(seed=0)
    runner = Runner.from_cfg(cfg)
    runner.train()
    src = Path(cfg.work_dir) / "iter_2.pth"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mmdet3_iter_2.pth").write_bytes(src.read_bytes())

    # mmdetection's publish step, run as the tool (it loads with torch.load's default, which torch >= 2.6
    # refuses for this file: the documented switch lets the tool run as it did when it was written)
    tool = Path(mmdet.__file__).parent / ".mim" / "tools" / "model_converters" / "publish_model.py"
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    subprocess.run([sys.executable, str(tool), str(src), str(work / "published.pth")], check=True, env=env)
    import time
    for _ in range(50):  # the tool renames with a `mv` it does not wait for
        pub = sorted(work.glob("published-*.pth"))
        if pub:
            break
        time.sleep(0.1)
    (OUT / "mmdet3_published.pth").write_bytes(pub[0].read_bytes())

    for name in ("mmdet3_iter_2.pth", "mmdet3_published.pth"):
        ck = torch.load(OUT / name, map_location="cpu", weights_only=False)
        record(name, describe(ck))
    print(f"wrote {OUT}: " + ", ".join(f"{p.name} {p.stat().st_size / 1e3:.0f} kB" for p in sorted(OUT.glob('*.pth'))))
    return 0


def describe(ck: dict) -> dict:
    """What the tests check the reader gets: keys, the state dict's digest, meta values (NumPy scalars as
    their type and value), and for mmengine's message hub each HistoryBuffer's data."""
    out = dict(keys=sorted(ck), state_dict_digest=digest(ck["state_dict"]), tensors=len(ck["state_dict"]))
    meta = ck.get("meta", {})
    out["meta"] = {k: plain(v) for k, v in meta.items() if k not in ("cfg", "config", "env_info")}
    out["meta_keys"] = sorted(meta)
    hub = ck.get("message_hub")
    if hub:
        out["history"] = {k: dict(type=f"{type(v).__module__}.{type(v).__qualname__}",
                                  log=v._log_history.tolist(), count=v._count_history.tolist(),
                                  max_length=v.max_length)
                          for k, v in hub["log_scalars"].items()}
        out["runtime_info"] = {k: plain(v) for k, v in hub["runtime_info"].items() if k != "cfg"}
    if "optimizer" in ck:
        out["optimizer_state_digest"] = digest({f"{i}.{k}": t for i, s in ck["optimizer"]["state"].items()
                                                for k, t in s.items() if torch.is_tensor(t)})
        out["param_groups"] = plain(ck["optimizer"]["param_groups"])
    if "param_schedulers" in ck:
        out["param_schedulers"] = plain(ck["param_schedulers"])
    return out


def plain(v):
    """JSON form that keeps NumPy scalars' types: {"numpy": "float64", "value": 1.5}."""
    if isinstance(v, np.generic):
        return dict(numpy=str(v.dtype), value=v.item())
    if isinstance(v, np.ndarray):
        return dict(numpy_array=str(v.dtype), shape=list(v.shape), value=v.tolist())
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return dict(object=f"{type(v).__module__}.{type(v).__qualname__}")


# ------------------------------------------------------------------ mmcv 1.x (mmdetection 2.x's runner)
def mmcv1() -> int:
    import logging
    import mmcv
    from mmcv.runner import EpochBasedRunner, build_optimizer
    from mmcv.utils import collect_env

    ref = torch.load(OUT / "mmdet3_published.pth", map_location="cpu", weights_only=True)["state_dict"]

    class Detector(torch.nn.Module):
        """Holds the narrowed seed model's tensors under mmdetection's names (mmdetection 2.x's Mask R-CNN
        has the same keys); its train_step is the runner's contract: a loss and log variables."""

        def __init__(self, sd):
            super().__init__()
            self.CLASSES = CLASSES
            for k, v in sd.items():
                mod, leaf = self, k.split(".")
                for part in leaf[:-1]:
                    if not hasattr(mod, part):
                        mod.add_module(part, torch.nn.Module())
                    mod = getattr(mod, part)
                if v.dtype.is_floating_point and "running" not in leaf[-1]:
                    mod.register_parameter(leaf[-1], torch.nn.Parameter(v.clone()))
                else:
                    mod.register_buffer(leaf[-1], v.clone())

        def train_step(self, data, optimizer):
            loss = sum((p * p).mean() for p in self.parameters()) * data
            return dict(loss=loss, log_vars=dict(loss=float(loss)), num_samples=1)

    model = Detector(ref)
    work = Path(tempfile.mkdtemp(prefix="mmcv1_ckpt_"))
    optimizer = build_optimizer(model, dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=1e-4))
    env = collect_env()
    meta = dict(env_info="\n".join(f"{k}: {v}" for k, v in env.items()), config="model = dict(type='MaskRCNN')",
                seed=0, exp_name="mask_rcnn_r50_fpn_1x_coco.py")
    runner = EpochBasedRunner(model, optimizer=optimizer, work_dir=str(work), logger=logging.getLogger("mmcv1"),
                              meta=meta, max_epochs=2)
    runner.register_training_hooks(lr_config=dict(policy="step", step=[8, 11]), optimizer_config=dict(grad_clip=None),
                                   checkpoint_config=dict(interval=1, meta=dict(mmdet_version="2.28.2",
                                                                                CLASSES=CLASSES)),
                                   log_config=dict(interval=1, hooks=[dict(type="TextLoggerHook")]))
    runner.run([[torch.tensor(1.0), torch.tensor(0.5)]], [("train", 1)])
    (OUT / "mmcv1_epoch_2.pth").write_bytes((work / "epoch_2.pth").read_bytes())
    # mmdetection 2.x's tools/model_converters/publish_model.py: drop the optimizer, torch's legacy format
    ck = torch.load(work / "epoch_2.pth", map_location="cpu", weights_only=False)
    ck.pop("optimizer")
    torch.save(ck, OUT / "mmcv1_published.pth", _use_new_zipfile_serialization=False)
    for name in ("mmcv1_epoch_2.pth", "mmcv1_published.pth"):
        c = torch.load(OUT / name, map_location="cpu", weights_only=False)
        record(name, describe(c) | dict(mmcv_version=mmcv.__version__))
    print(f"wrote mmcv1 files ({mmcv.__version__})")
    return 0


# ------------------------------------------------------------------ export: back into mmdetection
EXPORT_REF = ROOT / "tests" / "data" / "mmdet_export_reference.npz"


def export_check() -> int:
    """mmdet -> dali-scp -> mmdet: the seeded checkpoint of ``scripts/mmdet_reference.py`` (its committed key
    list and seed) imported with ``trainer.import_weights`` and exported with ``trainer.export_weights``
    (this project's CLIs, run here as a user runs them), then loaded by mmdetection's ``init_detector`` with
    the seed config narrowed as in that script - its state-dict loader made strict, so a missing or
    unexpected key fails here - and run on the reference images. Records the exported file's digest, what
    init_detector read, and its detections (which must equal mmdet_reference.npz's: same weights, same code)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import mmdet_reference as mr
    mr._stand_in_kernels()
    import mmengine.runner.checkpoint as mc
    from mmdet.apis import init_detector

    z = np.load(mr.OUT, allow_pickle=False)
    info = json.loads(str(z["info"]))
    work = Path(tempfile.mkdtemp(prefix="mmdet_export_"))
    meta = dict(info["meta"], dataset_meta=dict(classes=tuple(info["meta"]["dataset_meta"]["classes"])))
    torch.save(dict(meta=meta, state_dict=mr.seeded_state_dict(info["spec"], info["seed"])), work / "seed.pth")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in (["trainer.import_weights", str(work / "seed.pth"), "--out", str(work / "ours.pth")],
                ["trainer.export_weights", str(work / "ours.pth"), "--to", "mmdetection", "--out", str(work / "X.pth")]):
        subprocess.run([sys.executable, "-m", *cmd], check=True, env=env)

    strict_load = mc.load_state_dict
    report = {}

    def load_state_dict(module, state_dict, strict=False, logger=None):
        mine = set(module.state_dict())
        report.update(missing=sorted(mine - set(state_dict)), unexpected=sorted(set(state_dict) - mine))
        return strict_load(module, state_dict, strict=True, logger=logger)
    mc.load_state_dict = load_state_dict
    cfg, _ = mr.build_mmdet_model()
    model = init_detector(cfg, str(work / "X.pth"), device="cpu")
    loaded = torch.load(work / "X.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, loaded["state_dict"][k]) for k, v in model.state_dict().items())
    assert report == dict(missing=[], unexpected=[]), report

    data = mr.reference_inputs(mr.test_images())
    with torch.no_grad():
        batch = model.data_preprocessor(data, False)
        results = model.predict(batch["inputs"], batch["data_samples"], rescale=True)
    out = dict(digest=np.array(digest(loaded["state_dict"])),
               classes=np.array(model.dataset_meta["classes"]), missing=np.array(len(report["missing"])),
               unexpected=np.array(len(report["unexpected"])))
    for i, r in enumerate(results):
        det = r.pred_instances
        same = (np.array_equal(det.bboxes.numpy(), z[f"boxes{i}"]) and np.array_equal(det.scores.numpy(), z[f"scores{i}"])
                and np.array_equal(np.packbits(det.masks.numpy(), axis=-1), z[f"masks{i}"]))
        assert same, f"image {i}: init_detector's detections differ from mmdet_reference.npz's"
        out.update({f"boxes{i}": det.bboxes.numpy(), f"scores{i}": det.scores.numpy(), f"labels{i}": det.labels.numpy()})
    np.savez_compressed(EXPORT_REF, **out)
    print(f"init_detector loaded {len(loaded['state_dict'])} tensors, 0 missing, 0 unexpected; detections equal "
          f"mmdet_reference.npz's; wrote {EXPORT_REF} ({EXPORT_REF.stat().st_size / 1e3:.0f} kB)")
    return 0


# ------------------------------------------------------------------ torchvision
def torchvision_file() -> int:
    from torch import nn
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead
    from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(0)
    trunk = ResNet(Bottleneck, [3, 4, 6, 3])  # maskrcnn_resnet50_fpn_v2's trunk, narrowed below
    trunk.inplanes = BASE_CHANNELS
    trunk.conv1 = nn.Conv2d(3, BASE_CHANNELS, 7, 2, 3, bias=False)
    trunk.bn1 = nn.BatchNorm2d(BASE_CHANNELS)
    for k in range(1, 5):
        setattr(trunk, f"layer{k}", trunk._make_layer(Bottleneck, BASE_CHANNELS * 2 ** (k - 1), [3, 4, 6, 3][k - 1],
                                                      stride=1 if k == 1 else 2))
    backbone = BackboneWithFPN(trunk, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                               [BASE_CHANNELS * 4 * 2 ** i for i in range(4)], FPN, extra_blocks=LastLevelMaxPool(),
                               norm_layer=nn.BatchNorm2d)
    # as torchvision's maskrcnn_resnet50_fpn_v2: 2-conv RPN head, 4conv1fc box head and 4-conv mask head with BN
    model = MaskRCNN(backbone, num_classes=None,
                     rpn_head=RPNHead(FPN, 3, conv_depth=2),
                     box_head=FastRCNNConvFCHead((FPN, 7, 7), [HEAD] * 4, [FC], norm_layer=nn.BatchNorm2d),
                     mask_head=MaskRCNNHeads(FPN, [HEAD] * 4, 1, norm_layer=nn.BatchNorm2d),
                     box_predictor=FastRCNNPredictor(FC, len(CLASSES) + 1),
                     mask_predictor=MaskRCNNPredictor(HEAD, HEAD, len(CLASSES) + 1))
    for m in model.modules():  # BN statistics as after training, not the 0 / 1 a fresh model has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), OUT / "torchvision_state_dict.pth")
    sd = torch.load(OUT / "torchvision_state_dict.pth", map_location="cpu", weights_only=True)
    import torchvision
    record("torchvision_state_dict.pth", dict(state_dict_digest=digest(sd), tensors=len(sd),
                                              torchvision_version=torchvision.__version__))
    print("wrote torchvision_state_dict.pth")
    return 0


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else ""
    parts = dict(mmdet3=mmdet3, mmcv1=mmcv1, torchvision=torchvision_file, export=export_check)
    if part not in parts or len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != "--out"):
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(parts)}}} [--out DIR]  (DIR: instead of tests/data/checkpoints "
                 "and, for export, tests/data)")
    if len(sys.argv) == 4:
        OUT = Path(sys.argv[3]).resolve()
        REFERENCE, EXPORT_REF = OUT / "reference.json", OUT / EXPORT_REF.name
        OUT.mkdir(parents=True, exist_ok=True)
    sys.exit(parts[part]())
