"""Reference outputs of mmdetection's own seed model, for ``tests/test_import_weights.py``.

    python3 -m venv --system-site-packages /work/venvs/mmdet
    /work/venvs/mmdet/bin/pip install mmengine mmcv-lite==2.1.0 mmdet==3.3.0
    /work/venvs/mmdet/bin/python scripts/mmdet_reference.py          # rewrites tests/data/mmdet_reference.npz (--out: elsewhere)

Why a side environment: mmdetection is heavy and pins old mmcv, so it stays out of the project's install and
tests. The test reads the small file this script writes (images, outputs, the checkpoint's key list and
digest), never mmdetection.

What it does: builds the model of ``mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-scp-90k_coco.py``
from the config shipped in the mmdet wheel, narrowed so the reference stays small (ResNet-50 kept; FPN and
heads 32 channels, box-head fc 128, 8 classes; SyncBN -> BN, same keys), fills every tensor of its state dict
(BN running statistics too) from ``seeded_state_dict`` - a function of the key, its shape and SEED, which the
test calls to rebuild the same checkpoint bit for bit (checked by ``state_dict_digest``) - saves it with
mmengine's ``save_checkpoint`` as mmdetection does, loads it back, and records on a batch of two already
resized images (the pipeline is not under test): FPN outputs, RPN objectness and deltas, proposals after NMS,
final boxes, scores, labels, binary masks and the 28x28 mask probabilities of the top detections.

mmcv-lite ships mmcv's Python ops without their compiled kernels. The two kernels this model calls are
stood in by torchvision's, which compute the same thing: ``nms`` (offset 0) by ``torchvision.ops.nms``, and
``roi_align_forward`` (avg pooling) by ``torchvision.ops.roi_align`` with the same aligned / sampling-ratio
arguments. mmcv's Python around them (``batched_nms``, ``RoIAlign``, ``multiclass_nms``, the RoI
extractors) is mmcv's and mmdetection's own code. Every other kernel raises if called.
"""
from __future__ import annotations

import hashlib
import json
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import torch

SEED = 20250117
NUM_CLASSES = 8
NARROW = dict(fpn_channels=32, head_channels=32, fc_channels=128)
CLASS_NAMES = ("disc", "triangle", "square", "star", "ring", "bar", "cross", "crescent")
TOP_MASKS = 20  # 28x28 probabilities kept for the top detections of each image (all binary masks are kept)
IMAGE_SIZES = ((160, 224), (128, 192))  # (h, w) valid regions; the batch is padded to 160x224
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mmdet_reference.npz"
CONFIG = "simple_copy_paste/mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-scp-90k_coco.py"


# ------------------------------------------------------------------ shared with the test (no mmdet here)
def seeded_tensor(key: str, shape: tuple, dtype: torch.dtype, seed: int = SEED) -> torch.Tensor:
    """A random value for state-dict entry ``key`` that depends only on (key, shape, seed). Scales keep a
    50-layer network's activations in range, so scores are spread out and rank orders are stable."""
    g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_mean":
        return (torch.randn(shape, generator=g) * 0.1).to(dtype)
    if leaf == "running_var":
        return (torch.rand(shape, generator=g) * 1.5 + 0.5).to(dtype)
    if len(shape) == 1:  # BN weight/bias, conv/linear bias
        if leaf == "weight":
            return (torch.rand(shape, generator=g) * 0.5 + 0.5).to(dtype)
        return (torch.randn(shape, generator=g) * 0.1).to(dtype)
    fan_in = int(np.prod(shape[1:]))
    if "upsample" in key:  # ConvTranspose2d weight: [in, out, k, k]
        fan_in = shape[0]
    gain = 3.0 if ("fc_cls" in key or "conv_logits" in key) else 1.0
    return (torch.randn(shape, generator=g) * gain * (2.0 / fan_in) ** 0.5).to(dtype)


def seeded_state_dict(spec: list, seed: int = SEED) -> dict:
    """``spec``: [(key, shape, dtype name)] in the checkpoint's order -> the state dict."""
    from collections import OrderedDict
    return OrderedDict((k, seeded_tensor(k, tuple(s), getattr(torch, d), seed)) for k, s, d in spec)


def state_dict_digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode() + str(v.dtype).encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_images() -> list:
    """Two RGB uint8 images [h, w, 3] with structure (gradients, discs, boxes), deterministic."""
    rng = np.random.default_rng(7)
    out = []
    for h, w in IMAGE_SIZES:
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        img = np.stack([60 + 120 * xx / w, 40 + 150 * yy / h, 90 + 60 * np.sin(xx / 9.0)], -1)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 40)
            colour = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                m = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
            else:
                m = (abs(xx - cx) < r) & (abs(yy - cy) < 0.6 * r)
            img[m] = colour
        img += rng.normal(0, 4, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


# ------------------------------------------------------------------ mmdetection side
def _stand_in_kernels():
    """mmcv-lite has no ``mmcv._ext``: give mmcv's Python ops torchvision's kernels for nms and RoIAlign
    (forward and backward)."""
    import torchvision
    from mmcv.utils import ext_loader

    def nms(boxes, scores, iou_threshold, offset):
        assert offset == 0, "the stand-in computes IoU without the legacy +1"
        return torchvision.ops.nms(boxes, scores, iou_threshold)

    def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                          spatial_scale, sampling_ratio, pool_mode, aligned):
        assert pool_mode == 1, "avg pooling only"
        output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                                               sampling_ratio, aligned))

    def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width,
                           spatial_scale, sampling_ratio, pool_mode, aligned):
        """torchvision's RoIAlign is linear in its input, so its vector-Jacobian product is mmcv's backward."""
        assert pool_mode == 1, "avg pooling only"
        x = torch.zeros_like(grad_input, requires_grad=True)
        with torch.enable_grad():
            y = torchvision.ops.roi_align(x, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio,
                                          aligned)
            (gx,) = torch.autograd.grad(y, x, grad_output)
        grad_input.copy_(gx)

    impl = dict(nms=nms, roi_align_forward=roi_align_forward, roi_align_backward=roi_align_backward)

    def load_ext(name, funcs):
        ext = types.SimpleNamespace()
        for f in funcs:
            setattr(ext, f, impl.get(f, _missing(f)))
        return ext

    ext_loader.load_ext = load_ext


def _missing(name):
    def f(*a, **k):
        raise NotImplementedError(f"mmcv kernel {name} has no stand-in")
    return f


def seed_config(name: str = CONFIG) -> Path:
    """A config shipped in the mmdet wheel (``name`` relative to its ``configs`` folder)."""
    import mmdet
    return Path(mmdet.__file__).parent / ".mim" / "configs" / name


def narrow_model_cfg(m, backbone_width: int | None = None, pad_size: int | None = None,
                     num_classes: int = NUM_CLASSES, narrow: dict = NARROW) -> None:
    """The seed config's ``model`` narrowed in place (``narrow``: FPN, head-conv and box-head fc widths; BN for
    SyncBN: one CPU process); keys and layer counts unchanged. ``backbone_width``: ResNet-50's
    ``base_channels`` (64 in the seed) and the FPN's in_channels with it; ``pad_size``: the side of the
    config's ``BatchFixedSizePad`` (1024 in the seed)."""
    m.backbone.norm_cfg = m.neck.norm_cfg = dict(type="BN", requires_grad=True)   # single CPU process
    m.roi_head.bbox_head.norm_cfg = m.roi_head.mask_head.norm_cfg = dict(type="BN", requires_grad=True)
    c, hc = narrow["fpn_channels"], narrow["head_channels"]
    m.neck.out_channels = c
    m.rpn_head.in_channels = m.rpn_head.feat_channels = c
    m.roi_head.bbox_roi_extractor.out_channels = m.roi_head.mask_roi_extractor.out_channels = c
    m.roi_head.bbox_head.update(in_channels=c, conv_out_channels=hc, fc_out_channels=narrow["fc_channels"],
                                num_classes=num_classes)
    m.roi_head.mask_head.update(in_channels=c, conv_out_channels=hc, num_classes=num_classes)
    if backbone_width is not None:
        m.backbone.base_channels = backbone_width
        m.neck.in_channels = [backbone_width * 4 * 2 ** i for i in range(4)]
    if pad_size is not None:
        for aug in m.data_preprocessor.batch_augments:
            aug.size = (pad_size, pad_size)


def build_mmdet_model(backbone_width: int | None = None, pad_size: int | None = None, num_classes: int = NUM_CLASSES):
    """The seed config's model, narrowed (``narrow_model_cfg``: ``NARROW``; BN for SyncBN). ``backbone_width``:
    ResNet-50's ``base_channels`` (64 in the seed; ``scripts/mmdet_train_reference.py`` narrows it to keep
    every gradient storable); ``pad_size``: the side of the config's ``BatchFixedSizePad`` (1024 in the seed)."""
    _stand_in_kernels()
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    cfg = Config.fromfile(str(seed_config()))
    init_default_scope("mmdet")
    narrow_model_cfg(cfg.model, backbone_width, pad_size, num_classes)
    model = MODELS.build(cfg.model)
    model.eval()
    return cfg, model


def seed_model(model, seed: int = SEED) -> list:
    """Fills ``model``'s state dict from ``seeded_state_dict``; returns its spec [(key, shape, dtype name)]."""
    spec = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    model.load_state_dict(seeded_state_dict(spec, seed))
    return spec


def reference_inputs(imgs: list) -> dict:
    """``test_images()``-like RGB uint8 images -> the model's ``data`` (BGR, as cv2 reads; one DetDataSample each,
    already at their size)."""
    from mmdet.structures import DetDataSample
    samples = []
    for i, im in enumerate(imgs):
        h, w = im.shape[:2]
        samples.append(DetDataSample(metainfo=dict(img_id=i, img_shape=(h, w), ori_shape=(h, w),
                                                   scale_factor=(1.0, 1.0))))
    return dict(inputs=[torch.from_numpy(im[..., ::-1].copy()).permute(2, 0, 1) for im in imgs],  # BGR, as cv2 reads
                data_samples=samples)


def init_stats() -> dict:
    """Mean and std of every weight after mmdetection's own ``init_weights()`` (the recipes train from
    scratch, so the initialisation is part of the recipe)."""
    torch.manual_seed(0)
    _, model = build_mmdet_model()
    model.init_weights()
    return {k: [float(v.float().mean()), float(v.float().std())] for k, v in model.state_dict().items()
            if v.dtype.is_floating_point and "running" not in k and v.numel() > 1}


def component_cases() -> dict:
    """Training-side parts on crafted inputs that the forward pass above does not reach: the box coder on
    deltas beyond its clip, MaxIoUAssigner (RPN and box-head settings) with a tiny object and ties, and the
    mask targets (``BitmapMasks.crop_and_resize``, binarised)."""
    from mmdet.models.task_modules import DeltaXYWHBBoxCoder, MaxIoUAssigner
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(1)
    out = {}
    xy = torch.rand(64, 2, generator=g) * 150
    rois = torch.cat([xy, xy + 4 + torch.rand(64, 2, generator=g) * 60], 1)
    gts = torch.tensor([[10., 10., 60., 50.], [12., 12., 58., 52.], [100., 40., 103., 44.], [30., 80., 130., 150.]])
    near = gts.repeat(4, 1) + torch.randn(16, 4, generator=g) * torch.tensor([0., 2., 5., 12.]).repeat_interleave(4)[:, None]
    rois[48:] = torch.cat([near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 1)], 1)
    rois[47] = rois[48]  # a tie: two predictions with the same IoU
    deltas = torch.randn(64, 4 * 3, generator=g) * 3  # 3 classes, some dw, dh beyond +-4.135 after x 0.2
    deltas[:8, 2::4] = torch.randn(8, 3, generator=g) * 40
    out["coder_rois"], out["coder_deltas"] = rois, deltas
    out["coder_rpn"] = DeltaXYWHBBoxCoder(target_stds=[1.0] * 4).decode(rois, deltas[:, :4] * 3, max_shape=(160, 224))
    out["coder_rcnn"] = DeltaXYWHBBoxCoder(target_stds=[0.1, 0.1, 0.2, 0.2]).decode(
        rois.repeat_interleave(3, 0), deltas.reshape(-1, 4), max_shape=(160, 224)).reshape(64, 12)
    out["assign_gts"] = gts
    for name, thr in (("rpn", (0.7, 0.3, 0.3)), ("rcnn", (0.5, 0.5, 0.5))):
        a = MaxIoUAssigner(pos_iou_thr=thr[0], neg_iou_thr=thr[1], min_pos_iou=thr[2], match_low_quality=True)
        res = a.assign(InstanceData(priors=rois), InstanceData(bboxes=gts, labels=torch.zeros(4, dtype=torch.long)))
        out[f"assign_{name}"] = res.gt_inds - 1  # -1: negative, -2: ignored, else the gt index
    masks = np.zeros((4, 160, 224), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(gts.long().tolist()):
        masks[i, y0:y1, x0:(x0 + x1) // 2 + 1] = 1
        masks[i, y0:(y0 + y1) // 2, x0:x1] = 1
    inds = torch.arange(64) % 4
    out["mask_gt"], out["mask_inds"] = masks, inds
    out["mask_targets"] = BitmapMasks(masks, 160, 224).crop_and_resize(rois, (28, 28), inds, device="cpu",
                                                                        binarize=True).to_tensor(torch.float32, "cpu")
    return {f"case_{k}": (v.numpy() if torch.is_tensor(v) else v) for k, v in out.items()}


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    out_path = p.parse_args(argv).out
    cfg, model = build_mmdet_model()
    import mmdet
    import mmengine
    from mmengine.runner.checkpoint import save_checkpoint

    spec = seed_model(model)
    meta = dict(mmengine_version=mmengine.__version__, mmdet_version=mmdet.__version__, cfg=cfg.pretty_text,
                dataset_meta=dict(classes=CLASS_NAMES), seed=SEED, experiment_name="mmdet_reference",
                epoch=0, iter=0)
    tmp = out_path.with_suffix(".pth")
    save_checkpoint(dict(meta=meta, state_dict=model.state_dict()), str(tmp))  # {'meta', 'state_dict'}
    saved = torch.load(tmp, map_location="cpu", weights_only=True)
    tmp.unlink()
    digest = state_dict_digest(saved["state_dict"])
    model.load_state_dict(saved["state_dict"])

    imgs = test_images()
    data = reference_inputs(imgs)
    mask_logits = []
    model.roi_head.mask_head.register_forward_hook(lambda mod, inp, out: mask_logits.append(out.detach()))
    with torch.no_grad():
        batch = model.data_preprocessor(data, False)
        inputs, samples = batch["inputs"], batch["data_samples"]
        feats = model.extract_feat(inputs)
        rpn_cls, rpn_reg = model.rpn_head(feats)
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
        mask_logits.clear()
        results = model.predict(inputs, samples, rescale=True)
    assert len(mask_logits) == 1, "one mask-head call for the batch"

    out = dict(images=np.stack([np.pad(im, ((0, 160 - im.shape[0]), (0, 224 - im.shape[1]), (0, 0))) for im in imgs]),
               image_sizes=np.array(IMAGE_SIZES))
    for lvl, f in enumerate(feats):
        out[f"fpn{lvl}"] = f.numpy()
        out[f"rpn_cls{lvl}"] = rpn_cls[lvl].numpy()
        out[f"rpn_reg{lvl}"] = rpn_reg[lvl].numpy()
    start = 0
    for i, (p, r) in enumerate(zip(proposals, results)):
        det = r.pred_instances
        n = len(det)
        out[f"proposals{i}"] = p.bboxes.numpy()
        out[f"proposal_scores{i}"] = p.scores.numpy()
        out[f"boxes{i}"] = det.bboxes.numpy()
        out[f"scores{i}"] = det.scores.numpy()
        out[f"labels{i}"] = det.labels.numpy()
        out[f"masks{i}"] = np.packbits(det.masks.numpy(), axis=-1)
        logits = mask_logits[0][start:start + n]
        out[f"mask_probs{i}"] = logits[torch.arange(n), det.labels].sigmoid()[:TOP_MASKS].numpy()
        start += n
        print(f"image {i}: {len(p)} proposals, {n} detections, top scores {det.scores[:5].numpy().round(4)}")
    info = dict(seed=SEED, num_classes=NUM_CLASSES, narrow=NARROW, class_names=CLASS_NAMES, config=CONFIG,
                spec=spec, digest=digest, meta=meta, versions=dict(mmdet=mmdet.__version__, mmengine=mmengine.__version__,
                                                                     torch=torch.__version__),
                stand_ins="mmcv kernels nms and roi_align_forward: torchvision.ops.nms / roi_align")
    info["init_stats"] = init_stats()
    out.update(component_cases())
    out["info"] = np.array(json.dumps(info))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
