"""mmdetection's own training step and samplers, for ``tests/test_train_step.py``.

    PYTHONPATH=$PWD /work/venvs/mmdet/bin/python scripts/mmdet_train_reference.py   # rewrites tests/data/mmdet_train_reference.npz (--out: elsewhere)

Side environment as ``scripts/mmdet_reference.py`` (mmdet 3.3, mmengine, mmcv-lite; mmcv's nms and RoIAlign
kernels stood in by torchvision's, RoIAlign's backward too), whose narrowed model, seeded weights and stand-ins
this script reuses. ``PYTHONPATH`` puts this project on the path: the batch comes from its own ``ssj_scp``
pipeline (DALI, CPU), read from the system site-packages the side venv sees.

What it records, in train mode, for the seed config's model narrowed as the inference reference is (FPN and
heads 32 channels, box-head fc 128, SyncBN -> BN) and further to ResNet-50 at 1/8 of its width
(``base_channels`` 8: the same bottleneck blocks, strides and norms, 0.37 M instead of 23.5 M backbone
parameters, so that *every* parameter's gradient fits a small file):

- the batch: ``BATCH`` images of ``IMAGE_SIZE``^2 from ``ssj_scp`` on a COCO-like synthetic set (pasted
  objects, boxes recomputed from masks, objects from under 8 to over 96 px, one image holding a single small
  object);
- every loss term of ``model.loss`` (``loss_rpn_cls`` and ``loss_rpn_bbox`` summed over levels, ``loss_cls``,
  ``loss_bbox``, ``loss_mask``) and ``acc``; the RPN's training proposals; which gt every anchor and every
  RoI candidate is assigned to; the sampled candidates;
- the gradient of every parameter for the summed loss (``pack_gradient``: per tensor, integers of
  max|g| / 2^GRAD_BITS, byte planes, deflated: exact to 2^-21 = 4.8e-7 of the tensor's max-norm, 200x below
  the test's 1e-4; full float32 would be 2.9 MB, full width 100 MB); BN running statistics after the step;
- the real ``RandomSampler``s drawn ``DRAWS`` times (torch's RNG) on the step's anchors and proposals and on
  ``dense_cases`` (where the samplers' caps bind, and occluded objects): per draw and image, the numbers of
  positives and negatives and what they are made of (``sample_stats``); the assignment of every dense
  candidate; the assignment thresholds and sampler settings as the seed config states them.

The network runs in ``DTYPE`` (float64, see there), pixels normalised and anchors made in float32 as in
training.

The one device that makes the random choices the same on both sides: every ``RandomSampler.random_choice``
takes, of the candidates it is offered, those of lowest rank in ``sample_keys(stage, image, n)`` (a seeded
permutation of the image's candidates: anchors for the RPN, [gt; proposals] for the box head, in
mmdetection's order); ``sample`` itself and everything else is mmdetection's unmodified code. The test gives
its own samplers the same keys (``ranked_choice``).
"""
from __future__ import annotations

import json
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmdet_reference as inference_ref  # noqa: E402  (narrowed model, seeded weights, kernel stand-ins)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "mmdet_train_reference.npz"
SEED = inference_ref.SEED
IMAGE_SIZE = 320
BATCH = 3
BACKBONE_WIDTH = 8     # ResNet-50's base_channels (64 in the seed)
DATA_SEED = 5          # the synthetic images and the pipeline's random stream
SMALL = 32.0           # COCO's small: sqrt(area) below 32 px
DRAWS = 200
GRAD_BITS = 20
# The network in float64 on both sides. In float32 the two sides agree bit for bit up to the heads' sums
# (gradients to 5e-6), but a float32 step of this seeded, untrained, train-mode-BN network is chaotic: a
# 1-ulp change of the input moves some gradients by several % (the normalisation's rounding did, before
# ``Recipe.normalize``), so a CPU that sums a convolution in another order would fail a float32 reference.
# Pixels are normalised in float32 and anchors are float32, as in training (``float32_anchors``).
DTYPE = torch.float64
STAGES = ("rpn", "rcnn")
SETTINGS = ("rpn", "rpn_dense", "rcnn", "rcnn_dense", "rcnn_nested")  # sampler draws (``dense_cases``)
# per draw, image and stage: (positives, negatives, distinct gts among the positives, gt boxes among the
# positives, mean IoU of the positives with their best gt, mean IoU of the negatives with their best gt)
SAMPLE_STATS = ("pos", "neg", "gts_hit", "gt_boxes", "pos_iou", "neg_iou")


# ------------------------------------------------------------------ shared with the test (no mmdet here)
def sample_keys(stage: str, image: int, n: int) -> torch.Tensor:
    """Rank of each of the ``n`` candidates of ``image`` for the ``stage`` sampler (lowest first)."""
    g = torch.Generator().manual_seed(SEED + zlib.crc32(f"{stage}/{image}".encode()))
    return torch.randperm(n, generator=g)


def ranked_choice(keys: torch.Tensor, gallery: torch.Tensor, num: int) -> torch.Tensor:
    """``random_choice(gallery, num)`` of a sampler with its draw replaced by the recorded order."""
    return gallery[torch.argsort(keys[gallery])[:num]]


def pack_gradient(g: np.ndarray) -> tuple[float, np.ndarray]:
    """Gradient -> (step, uint8 [4, n] byte planes of round(g / step)), step = max|g| / 2^GRAD_BITS."""
    m = float(np.abs(g).max())
    step = m / 2 ** GRAD_BITS if m > 0 else 1.0
    q = np.round(g.astype(np.float64).ravel() / step).astype("<i4")
    return step, q.view(np.uint8).reshape(-1, 4).T.copy()


def unpack_gradient(step: float, planes: np.ndarray, shape) -> torch.Tensor:
    q = np.ascontiguousarray(planes.T).view("<i4").ravel()
    return torch.from_numpy((q.astype(np.float64) * step).reshape(shape))


def sample_stats(pos_iou: torch.Tensor, neg_iou: torch.Tensor, pos_gt: torch.Tensor, pos_is_gt: torch.Tensor) -> list:
    """One draw of one image -> the SAMPLE_STATS numbers."""
    mean = lambda t: float(t.double().mean()) if t.numel() else 0.0  # noqa: E731
    return [len(pos_iou), len(neg_iou), len(torch.unique(pos_gt)), int(pos_is_gt.sum()), mean(pos_iou), mean(neg_iou)]


# ------------------------------------------------------------------ the batch (this project's pipeline)
def reference_batch(workdir: Path):
    """A COCO-like synthetic set of 11 images plus one holding a single small object, read by ``ssj_scp`` at
    ``IMAGE_SIZE``: the first batch in the stream that has the single-object image with its one object
    kept and nothing pasted onto it, at least 3 pasted objects, and objects from under 8 to over 96 px."""
    from dali_scp.dataset import resolve
    from dali_scp.synthetic import CATEGORIES, draw_images
    from pipelines.iterator import CocoLoader
    root = workdir / "syn"
    images, anns = draw_images(root, "train2017", 11, DATA_SEED, first_id=1)
    one, one_anns = draw_images(root, "train2017", 1, DATA_SEED + 1, first_id=12, max_objects=1,
                                size_classes=[((14, 20), 1.0)], empty_prob=0.0, crowd_prob=0.0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    doc = dict(images=images + one, annotations=anns + one_anns,
               categories=[dict(id=c, name=n, supercategory="synthetic") for c, n in CATEGORIES])
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    split = resolve(root, "train2017")
    loader = CocoLoader("ssj_scp", split, batch_size=BATCH, out_size=IMAGE_SIZE, seed=DATA_SEED, num_threads=1,
                        infinite=True)
    for k, (imgs, targets) in enumerate(loader):
        sizes = torch.cat([((t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1)).sqrt() for t in targets])
        single = [t for t in targets if t["image_id"] == 12]
        if (single and len(single[0]["boxes"]) == 1 and sizes.numel() and float(single[0]["boxes"][:, 2:].sub(
                single[0]["boxes"][:, :2]).prod(1).sqrt()) < SMALL and sum(int(t["pasted"].sum()) for t in targets) >= 3
                and float(sizes.min()) < 8 and float(sizes.max()) > 96):
            print(f"batch {k} of the stream: images {[t['image_id'] for t in targets]}, objects "
                  f"{[len(t['boxes']) for t in targets]}, pasted {[int(t['pasted'].sum()) for t in targets]}")
            return imgs, targets, len(CATEGORIES)
        if k > 500:
            raise RuntimeError("no batch with the wanted properties in 500")


# ------------------------------------------------------------------ mmdetection side
def float32_anchors(model) -> None:
    """mmdetection makes anchors in float32 for the targets (``get_anchors``) but in the features' dtype for
    the proposals (``predict_by_feat``); in float32 training, which this reference stands for, both are
    float32. In the float64 network they stay float32: ``grid_priors``' dtype argument is ignored."""
    grid = model.rpn_head.prior_generator.grid_priors
    model.rpn_head.prior_generator.grid_priors = lambda sizes, dtype=None, device="cuda": grid(
        sizes, dtype=torch.float32, device=device)


def draw_in_recorded_order(sampler, stage: str, log: list) -> None:
    """The device: ``sampler.random_choice`` takes the lowest ``sample_keys`` ranks; ``sample`` (called
    once per image, in order) is mmdetection's, wrapped to know the image and to log what it took."""
    original = sampler.sample
    state = dict(image=0)

    def sample(assign_result, pred_instances, gt_instances, **kw):
        n = len(pred_instances.priors) + (len(gt_instances) if sampler.add_gt_as_proposals else 0)
        state["keys"] = sample_keys(stage, state["image"], n)
        state["image"] += 1
        res = original(assign_result, pred_instances, gt_instances, **kw)
        log.append(dict(assigned=assign_result.gt_inds.clone(), pos=res.pos_inds.clone(), neg=res.neg_inds.clone()))
        return res

    sampler.sample = sample
    sampler.random_choice = lambda gallery, num: ranked_choice(state["keys"], gallery, num)


def mmdet_batch(imgs, targets):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    samples = []
    for i, t in enumerate(targets):
        s = DetDataSample(metainfo=dict(img_id=i, img_shape=(IMAGE_SIZE, IMAGE_SIZE), ori_shape=(IMAGE_SIZE, IMAGE_SIZE),
                                        pad_shape=(IMAGE_SIZE, IMAGE_SIZE), scale_factor=(1.0, 1.0)))
        s.gt_instances = InstanceData(bboxes=t["boxes"].to(DTYPE).clone(), labels=t["labels"].long() - 1,
                                      masks=BitmapMasks(t["masks"].numpy().astype(np.uint8), IMAGE_SIZE, IMAGE_SIZE))
        s.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        samples.append(s)
    # the pipeline's RGB -> BGR, as mmdetection's loader (cv2) delivers images
    return dict(inputs=[im.permute(2, 0, 1).flip(0).contiguous() for im in imgs], data_samples=samples)


def training_step(model, batch) -> dict:
    """One train-mode forward and backward of mmdetection's model with the recorded-order samplers."""
    logs = dict(rpn=[], rcnn=[])
    draw_in_recorded_order(model.rpn_head.sampler, "rpn", logs["rpn"])
    draw_in_recorded_order(model.roi_head.bbox_sampler, "rcnn", logs["rcnn"])
    proposals = []
    roi_loss = model.roi_head.loss

    def record_proposals(x, rpn_results_list, samples):
        proposals.extend(r.bboxes.detach().clone() for r in rpn_results_list)
        return roi_loss(x, rpn_results_list, samples)

    model.roi_head.loss = record_proposals
    model.train()
    model.zero_grad()
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data["inputs"].to(DTYPE), data["data_samples"])  # normalised in float32, as mmdetection does
    total, log_vars = model.parse_losses(losses)  # mmengine's sum of every "loss" key
    total.backward()
    terms = {k: float((sum(v) if isinstance(v, list) else v).detach()) for k, v in losses.items()}
    return dict(terms=terms, total=float(total), proposals=proposals, logs=logs, log_vars=dict(log_vars))


def dense_cases(targets) -> dict:
    """Candidates on which the samplers' caps bind (the batch's do not: an untrained RPN finds few positives):
    ``dense_gt``, 49 anchor-like boxes in a 7 x 7 grid (32 or 64 px, ratios 0.5-2, jittered) for the RPN,
    and per image ``dense{i}``, 30 jittered copies of every gt box, which join the RPN's proposals as a
    trained RPN's would crowd around objects; and ``nested``, occluded objects (below)."""
    g = torch.Generator().manual_seed(SEED + 1)
    cell = IMAGE_SIZE / 7
    c = (torch.arange(7) + 0.5) * cell
    cy, cx = [v.reshape(-1) for v in torch.meshgrid(c, c, indexing="ij")]
    cx, cy = cx + (torch.rand(49, generator=g) - 0.5) * cell * 0.4, cy + (torch.rand(49, generator=g) - 0.5) * cell * 0.4
    side = torch.where(torch.rand(49, generator=g) < 0.5, 32.0, 64.0) * (1 + 0.1 * torch.randn(49, generator=g))
    ratio = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (49,), generator=g)]
    w, h = side / ratio.sqrt(), side * ratio.sqrt()
    out = dict(dense_gt=torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).clamp(0, IMAGE_SIZE).to(DTYPE))
    for i, t in enumerate(targets):
        b = t["boxes"].to(DTYPE).repeat_interleave(30, 0)
        wh = (b[:, 2:] - b[:, :2]).repeat(1, 2)
        out[f"dense{i}"] = (b + 0.12 * wh * torch.randn(b.shape, generator=g, dtype=DTYPE)).clamp(0, IMAGE_SIZE)
    # occluded objects: 8 boxes, each with a part of itself (55-80 % of one side: what an object occluded by a
    # pasted one keeps); as proposals, 20 jittered copies of each whole and 3 boxes between whole and part, none
    # near the part alone - whose best proposal then overlaps the whole more (mmdetection's low-quality rule
    # gives it to the part; with the gt among the candidates, the part's best match is its own gt box)
    whole = torch.rand(8, 2, generator=g, dtype=DTYPE) * 180 + 10
    whole = torch.cat([whole, whole + 40 + torch.rand(8, 2, generator=g, dtype=DTYPE) * 80], 1)
    part, side = whole.clone(), torch.randint(0, 4, (8,), generator=g)
    keep = 0.55 + 0.25 * torch.rand(8, generator=g, dtype=DTYPE)
    for k in range(8):
        lo, hi = side[k] % 2, side[k] % 2 + 2  # x or y edges
        span = whole[k, hi] - whole[k, lo]
        if side[k] < 2:
            part[k, hi] = whole[k, lo] + keep[k] * span
        else:
            part[k, lo] = whole[k, hi] - keep[k] * span
    gt = torch.stack([whole, part], 1).reshape(16, 4)
    b = whole.repeat_interleave(20, 0)
    wh = (b[:, 2:] - b[:, :2]).repeat(1, 2)
    t = torch.tensor([0.5, 0.65, 0.8], dtype=DTYPE)[None, :, None]
    between = (whole[:, None] * t + part[:, None] * (1 - t)).reshape(-1, 4)
    out.update(nested_gt=gt, nested_labels=torch.randint(0, 8, (16,), generator=g),
               nested=torch.cat([b + 0.08 * wh * torch.randn(b.shape, generator=g, dtype=DTYPE), between]))
    return out


def sampler_draws(model, batch, proposals, dense) -> dict:
    """The seed's RandomSamplers as they draw (torch's RNG), ``DRAWS`` times on fixed assignments: per setting
    ``draws_<setting>`` [DRAWS, images, SAMPLE_STATS] and, for the dense ones, the assignment of every
    candidate (``<setting>_assigned<i>``: gt index, -1 negative, -2 ignored)."""
    from mmdet.models.task_modules import RandomSampler
    from mmdet.structures.bbox import bbox_overlaps
    from mmengine.structures import InstanceData
    data = model.data_preprocessor(batch, True)
    with torch.no_grad():
        feats = model.extract_feat(data["inputs"].to(DTYPE))
    anchors = torch.cat(model.rpn_head.prior_generator.grid_priors([f.shape[-2:] for f in feats], device="cpu"))
    tc, head = model.train_cfg, model.roi_head
    gts = [s.gt_instances for s in data["data_samples"]]
    zero = lambda b: InstanceData(bboxes=b, labels=torch.zeros(len(b), dtype=torch.long))  # noqa: E731  RPN's gt
    settings = dict(rpn=[(anchors, zero(g.bboxes)) for g in gts], rpn_dense=[(anchors, zero(dense["dense_gt"]))],
                    rcnn=[(p, g) for p, g in zip(proposals, gts)],
                    rcnn_dense=[(torch.cat([p, dense[f"dense{i}"]]), g) for i, (p, g) in enumerate(zip(proposals, gts))],
                    rcnn_nested=[(dense["nested"], InstanceData(bboxes=dense["nested_gt"], labels=dense["nested_labels"]))])
    torch.manual_seed(SEED)
    out = {}
    for name, cases in settings.items():
        stage = name.split("_")[0]
        assigner = model.rpn_head.assigner if stage == "rpn" else head.bbox_assigner
        sampler = RandomSampler(**{k: v for k, v in tc[stage].sampler.items() if k != "type"})
        draws = np.zeros((DRAWS, len(cases), len(SAMPLE_STATS)))
        for i, (cands, gt) in enumerate(cases):
            a = assigner.assign(InstanceData(priors=cands), gt)
            for d in range(DRAWS):
                if sampler.add_gt_as_proposals:  # sample() adds the gt to the assignment: a fresh one each draw
                    a = assigner.assign(InstanceData(priors=cands), gt)
                r = sampler.sample(a, InstanceData(priors=cands), gt)
                iou = a.max_overlaps if sampler.add_gt_as_proposals else bbox_overlaps(gt.bboxes, cands).max(0).values
                draws[d, i] = sample_stats(iou[r.pos_inds], iou[r.neg_inds], r.pos_assigned_gt_inds, r.pos_is_gt.bool())
            if name.endswith(("dense", "nested")):
                out[f"{name}_assigned{i}"] = (a.gt_inds - 1).numpy().astype(np.int16)
        out[f"draws_{name}"] = draws
    return out


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    out_path = p.parse_args(argv).out
    import mmdet
    import mmengine
    with tempfile.TemporaryDirectory() as tmp:
        imgs, targets, num_classes = reference_batch(Path(tmp))
    cfg, model = inference_ref.build_mmdet_model(BACKBONE_WIDTH, IMAGE_SIZE, num_classes)
    spec = inference_ref.seed_model(model)
    digest = inference_ref.state_dict_digest(model.state_dict())
    model.to(DTYPE)
    model.data_preprocessor.float()  # pixels normalised in float32 as in training, the network run in DTYPE
    float32_anchors(model)
    batch = mmdet_batch(imgs, targets)

    step = training_step(model, batch)
    print("losses:", {k: round(v, 6) for k, v in step["terms"].items()})
    out = dict(images=imgs.numpy(), counts=np.array([len(t["boxes"]) for t in targets]),
               boxes=np.concatenate([t["boxes"].numpy() for t in targets]),
               labels=np.concatenate([t["labels"].numpy() for t in targets]),
               pasted=np.concatenate([t["pasted"].numpy() for t in targets]),
               masks=np.packbits(np.concatenate([t["masks"].numpy() for t in targets]), axis=-1))
    for i, p in enumerate(step["proposals"]):
        out[f"proposals{i}"] = p.numpy()
    for stage in STAGES:
        for i, rec in enumerate(step["logs"][stage]):
            out[f"{stage}_assigned{i}"] = (rec["assigned"] - 1).numpy().astype(np.int16)  # -1 negative, -2 ignored
            out[f"{stage}_pos{i}"], out[f"{stage}_neg{i}"] = rec["pos"].numpy(), rec["neg"].numpy()
    grads, steps = [], {}
    for k, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        steps[k], planes = pack_gradient(g.numpy())
        grads.append(planes)
    out["grad_planes"] = np.concatenate(grads, axis=1)
    out["buffers"] = np.concatenate([v.numpy().ravel().astype(np.float64) for k, v in model.state_dict().items()
                                     if "running" in k or "num_batches" in k])
    dense = dense_cases(targets)
    out.update({k: v.numpy() for k, v in dense.items()})
    out.update(sampler_draws(model, batch, step["proposals"], dense))
    tc = model.train_cfg
    info = dict(seed=SEED, dtype=str(DTYPE).removeprefix("torch."), image_size=IMAGE_SIZE, backbone_width=BACKBONE_WIDTH, num_classes=num_classes,
                narrow=inference_ref.NARROW, config=inference_ref.CONFIG, spec=spec,
                digest=digest, losses=step["terms"], total=step["total"],
                params=[[k, list(p.shape)] for k, p in model.named_parameters()], grad_steps=steps,
                buffer_keys=[[k, list(v.shape)] for k, v in model.state_dict().items()
                             if "running" in k or "num_batches" in k],
                draws=DRAWS, sample_stats=SAMPLE_STATS, grad_bits=GRAD_BITS,
                assigners={s: {k: tc[s].assigner[k] for k in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou",
                                                               "match_low_quality")} for s in STAGES},
                samplers={s: {k: tc[s].sampler[k] for k in ("num", "pos_fraction", "neg_pos_ub",
                                                             "add_gt_as_proposals")} for s in STAGES},
                rpn_proposal=dict(tc.rpn_proposal),
                versions=dict(mmdet=mmdet.__version__, mmengine=mmengine.__version__, torch=torch.__version__),
                stand_ins="mmcv kernels nms, roi_align_forward and roi_align_backward: torchvision's")
    out["info"] = np.array(json.dumps(info))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
