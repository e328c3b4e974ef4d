"""The parts of mmdetection's Mask R-CNN that compute differently from torchvision's, as torchvision parts.

Why: the seed recipes are mmdetection configs and its released checkpoints were trained with mmdetection's
arithmetic; ``trainer.model.build_model`` swaps these in where a recipe field says ``"mmdet"`` (the table
in docs/checkpoints.md "mmdetection vs torchvision" lists every difference). Each class names the mmdetection/mmcv code it
follows; ``tests/test_import_weights.py`` checks the whole model against mmdetection's own outputs.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, project_masks_on_boxes
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

# torchvision's BoxCoder clip, log(1000/16), equal to mmdetection's |log(wh_ratio_clip=16/1000)|
WH_CLIP = math.log(1000.0 / 16)


class FixedStrideAnchors(AnchorGenerator):
    """mmdetection's ``AnchorGenerator`` (scales=[8], ratios=[0.5, 1, 2], strides 4..64, center_offset 0):
    base anchors are not rounded to integers, the stride of each level is fixed rather than inferred as
    image size // feature size (torchvision's inference gives 61 instead of 64 on an 800-px-high input,
    whose P6 is 13 cells high), and they are float32 in any dtype. Same order of anchors: per location,
    ratio-major."""

    def __init__(self, sizes: tuple, aspect_ratios: tuple, strides: tuple):
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)  # no .round()

    def forward(self, image_list, feature_maps):
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        # float32 whatever the features' dtype, as mmdetection's ``grid_priors``: under AMP torchvision's
        # anchors would be float16 (coordinates rounded to 0.5 px beyond 512), and which anchors tie for a
        # gt's best IoU (every one of them is matched) would follow the dtype
        dtype, device = torch.float32, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class ClampedBoxCoder(det_utils.BoxCoder):
    """mmdetection's ``DeltaXYWHBBoxCoder.decode`` (``delta2bbox``): dw, dh clamped on both sides to
    +-log(1000/16) (torchvision clamps only from above), arithmetic in mmdetection's order and dtypes: the
    boxes' centres and sizes in their own dtype (float32 anchors), not cast to the deltas' first (float16
    under AMP, where torchvision's decode rounds the anchors)."""

    def decode_single(self, rel_codes, boxes):
        stds = rel_codes.new_tensor([1.0 / w for w in self.weights])
        d = rel_codes.reshape(rel_codes.shape[0], -1, 4) * stds
        pxy = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
        pwh = (boxes[:, 2:] - boxes[:, :2])[:, None]
        gxy = pxy + pwh * d[..., :2]
        gwh = pwh * d[..., 2:].clamp(-WH_CLIP, WH_CLIP).exp()
        return torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1).flatten(1)


class MaxIoUMatcher(det_utils.Matcher):
    """mmdetection's ``MaxIoUAssigner`` (gt_max_assign_all): IoU < low -> negative, >= high -> the best
    gt; then for each gt in order whose best IoU is >= ``min_pos_iou``, every prediction with that IoU is
    matched to it (a later gt wins). torchvision's low-quality rule has no ``min_pos_iou`` (a tiny object
    whose best anchor has IoU 0.1 still gets it) and keeps each prediction's own best gt."""

    def __init__(self, high: float, low: float, min_pos_iou: float, low_quality: bool = True):
        super().__init__(high, low, allow_low_quality_matches=False)
        self.min_pos_iou, self.low_quality = min_pos_iou, low_quality

    def __call__(self, q):
        if q.numel() == 0:
            return super().__call__(q)
        vals, best = q.max(dim=0)
        matches = torch.full_like(best, self.BETWEEN_THRESHOLDS)
        matches[vals < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        pos = vals >= self.high_threshold
        matches[pos] = best[pos]
        if self.low_quality:
            gt_max = q.max(dim=1).values[:, None]
            hit = (q == gt_max) & (gt_max >= self.min_pos_iou)
            last = q.shape[0] - 1 - hit.flip(0).to(torch.uint8).argmax(dim=0)
            any_hit = hit.any(dim=0)
            matches[any_hit] = last[any_hit]
        return matches


class LevelRoIAlign(nn.Module):
    """mmdetection's ``SingleRoIExtractor`` with mmcv ``RoIAlign(aligned=True, sampling_ratio=0)``: level
    floor(log2(sqrt(area) / 56 + 1e-6)) clamped to the ``strides`` given (P2-P5)."""

    def __init__(self, featmap_names: list, output_size: int, strides=(4, 8, 16, 32), sampling_ratio: int = 0,
                 aligned: bool = True, finest_scale: int = 56):
        super().__init__()
        self.featmap_names, self.output_size = list(featmap_names), (output_size, output_size)
        self.strides, self.sampling_ratio, self.aligned, self.finest_scale = strides, sampling_ratio, aligned, finest_scale

    def forward(self, x: dict, boxes: list, image_shapes=None):
        feats = [x[k] for k in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        lvls = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(feats) - 1).long()
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + self.output_size)
        for i, (f, s) in enumerate(zip(feats, self.strides)):
            idx = torch.where(lvls == i)[0]
            if idx.numel():
                out[idx] = roi_align(f, rois[idx], self.output_size, 1.0 / s, self.sampling_ratio, self.aligned)
        return out


def box_regression_loss(kind: str, pred, target):
    """Summed over elements; mmdetection's ``L1Loss`` or torchvision's smooth L1 with beta 1/9."""
    if kind == "mmdet":
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum")


class SeedRPN(RegionProposalNetwork):
    """torchvision's RPN with the recipe's box loss (``compute_loss`` as torchvision's, the loss swapped) and
    proposal selection (``select``)."""

    box_loss = "torchvision"
    select = "torchvision"

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """``select == "mmdet"``: as mmdetection's ``RPNHead`` selects - per level the ``pre_nms_top_n`` best by
        a descending sort of the sigmoid scores, boxes clipped, those with w or h of 0 dropped, one NMS over all
        levels kept apart by coordinate offsets, the first ``post_nms_top_n``. The same set as torchvision's
        (top-k of the logits, NMS per level, merged by a sort) except where scores tie exactly - a weakly
        trained RPN gives hundreds of anchors the same score - which here break as in mmdetection."""
        if self.select != "mmdet":
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        scores_all = objectness.detach().reshape(proposals.shape[0], -1).sigmoid()
        starts, k = list(itertools.accumulate([0] + num_anchors_per_level[:-1])), self.pre_nms_top_n()
        final_boxes, final_scores = [], []
        for boxes, scores, shape in zip(proposals, scores_all, image_shapes):
            idx, lvl = [], []
            for level, (s, start) in enumerate(zip(scores.split(num_anchors_per_level), starts)):
                top = s.sort(descending=True)[1][:k] + start
                idx.append(top)
                lvl.append(torch.full_like(top, level))
            idx, lvl = torch.cat(idx), torch.cat(lvl)
            boxes, scores = box_ops.clip_boxes_to_image(boxes[idx], shape), scores[idx]
            keep = torch.where((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            offsets = lvl.to(boxes) * (boxes.max() + 1) if len(boxes) else lvl.to(boxes)
            keep = box_ops.nms(boxes + offsets[:, None], scores, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos_inds, sampled_neg_inds = self.fg_bg_sampler(labels)
        sampled_pos_inds = torch.where(torch.cat(sampled_pos_inds, dim=0))[0]
        sampled_neg_inds = torch.where(torch.cat(sampled_neg_inds, dim=0))[0]
        sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds], dim=0)
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = box_regression_loss(self.box_loss, pred_bbox_deltas[sampled_pos_inds],
                                       regression_targets[sampled_pos_inds]) / sampled_inds.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled_inds], labels[sampled_inds])
        return objectness_loss, box_loss


class RandomSampler(det_utils.BalancedPositiveNegativeSampler):
    """mmdetection's ``RandomSampler`` (``neg_pos_ub=-1``) behind torchvision's interface (per image, labels
    > 0 positive, 0 negative, -1 ignored -> masks of the sampled): up to ``int(num * pos_fraction)``
    positives, then negatives up to ``num`` in all - torchvision's counts too. The draws are mmdetection's:
    ``random_choice`` (a ``randperm``) only where there are more candidates than wanted, and it is the one
    place a draw happens (tests/test_train_step.py makes it take mmdetection's recorded order)."""

    def __call__(self, matched_idxs):
        pos_masks, neg_masks = [], []
        for image, labels in enumerate(matched_idxs):
            pos, neg = torch.where(labels >= 1)[0], torch.where(labels == 0)[0]
            num_pos = int(self.batch_size_per_image * self.positive_fraction)
            if pos.numel() > num_pos:
                pos = self.random_choice(pos, num_pos, image)
            num_neg = self.batch_size_per_image - pos.numel()
            if neg.numel() > num_neg:
                neg = self.random_choice(neg, num_neg, image)
            for inds, out in ((pos, pos_masks), (neg, neg_masks)):
                m = torch.zeros_like(labels, dtype=torch.uint8)
                m[inds] = 1
                out.append(m)
        return pos_masks, neg_masks

    def random_choice(self, gallery, num: int, image: int):
        """``num`` of ``gallery`` uniformly at random (``image``: its index in the batch)."""
        return gallery[torch.randperm(gallery.numel(), device=gallery.device)[:num]]


def aligned_mask_targets(gt_masks, boxes, matched_idxs, m: int):
    """mmdetection's ``BitmapMasks.crop_and_resize``: RoIAlign(aligned=True, sampling_ratio=0) of the gt
    mask over the proposal, binarised at 0.5 (torchvision: unaligned, soft targets)."""
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    t = roi_align(gt_masks[:, None].to(rois), rois, (m, m), 1.0, 0, True)[:, 0]
    return (t >= 0.5).to(rois.dtype)


class SeedRoIHeads(RoIHeads):
    """torchvision's box and mask heads (no keypoints) with the recipe's choices: box loss, mask targets,
    and whether detections narrower than 0.01 px are dropped before NMS (torchvision) or kept (mmdet)."""

    box_loss = "torchvision"
    mask_targets = "torchvision"
    sampler = "torchvision"
    drop_small = True

    def select_training_samples(self, proposals, targets):
        """mmdetection's ``StandardRoIHead``: proposals are matched to the gt first; then the gt boxes join
        them, ahead, each matched to itself (``add_gt_as_proposals``), and the sampled come positives
        first. torchvision appends the gt before matching, so a gt box takes part in the low-quality rule
        (every gt's best IoU is 1, with itself) and a proposal that is some gt's best match keeps its
        own best gt instead."""
        if self.sampler != "mmdet":
            return super().select_training_samples(proposals, targets)
        self.check_targets(targets)
        cands, matched, labels = [], [], []
        for props, t in zip(proposals, targets):
            gt_boxes, gt_labels = t["boxes"].to(props.dtype), t["labels"]
            m = self.proposal_matcher(box_ops.box_iou(gt_boxes, props)) if len(gt_boxes) else \
                torch.full((len(props),), self.proposal_matcher.BELOW_LOW_THRESHOLD, device=props.device)
            m = torch.cat([torch.arange(len(gt_boxes), device=m.device), m])
            lab = gt_labels[m.clamp(min=0)] if len(gt_boxes) else torch.zeros_like(m)
            lab[m == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
            lab[m == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            cands.append(torch.cat([gt_boxes, props]))
            matched.append(m.clamp(min=0))
            labels.append(lab)
        pos, neg = self.fg_bg_sampler(labels)
        keep = [torch.cat([torch.where(p)[0], torch.where(n)[0]]) for p, n in zip(pos, neg)]
        proposals = [c[k] for c, k in zip(cands, keep)]
        matched = [m[k] for m, k in zip(matched, keep)]
        labels = [lab[k] for lab, k in zip(labels, keep)]
        gts = [t["boxes"].to(p.dtype) if len(t["boxes"]) else p.new_zeros((1, 4)) for t, p in zip(targets, proposals)]
        regression_targets = self.box_coder.encode([g[m] for g, m in zip(gts, matched)], proposals)
        return proposals, matched, labels, regression_targets

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        if self.drop_small:
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        boxes_per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(boxes_per_image)
        pred_scores = F.softmax(class_logits, -1).split(boxes_per_image)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(scores.shape[1], device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        result, losses = [], {}
        if self.training:
            losses = dict(zip(("loss_classifier", "loss_box_reg"),
                              self.box_losses(class_logits, box_regression, labels, regression_targets)))
            losses["acc"] = accuracy(class_logits.detach(), torch.cat(labels))
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, pos)]
            pos_matched = [m[i] for m, i in zip(matched_idxs, pos)]
        else:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            result = [dict(boxes=b, labels=lab, scores=s) for b, s, lab in zip(boxes, scores, labels)]
            mask_proposals = [r["boxes"] for r in result]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        if self.training:
            losses["loss_mask"] = self.mask_loss(mask_logits, mask_proposals, targets, pos_matched)
        else:
            for prob, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = prob
        return result, losses

    def box_losses(self, class_logits, box_regression, labels, regression_targets):
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        cls_loss = F.cross_entropy(class_logits, labels)
        pos = torch.where(labels > 0)[0]
        box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
        box_loss = box_regression_loss(self.box_loss, box_regression[pos, labels[pos]], regression_targets[pos])
        return cls_loss, box_loss / labels.numel()

    def mask_loss(self, mask_logits, proposals, targets, matched_idxs):
        m = mask_logits.shape[-1]
        project = aligned_mask_targets if self.mask_targets == "mmdet" else project_masks_on_boxes
        labels = torch.cat([t["labels"][i] for t, i in zip(targets, matched_idxs)])
        mask_targets = torch.cat([project(t["masks"], p, i, m) for t, p, i in zip(targets, proposals, matched_idxs)])
        if mask_targets.numel() == 0:
            return mask_logits.sum() * 0
        return F.binary_cross_entropy_with_logits(mask_logits[torch.arange(labels.shape[0]), labels], mask_targets)


def accuracy(class_logits, labels):
    """mmdetection's ``acc``: the share of sampled RoIs (background included) whose top class is their
    label, in percent. A metric, not a loss: the step sums only the terms named ``loss*``."""
    return (class_logits.argmax(dim=1) == labels).sum() * (100.0 / max(labels.numel(), 1))


def paste_masks(masks, boxes, img_h: int, img_w: int):
    """mmdetection's ``_do_paste_mask`` (``FCNMaskHead``, CPU path): each [28, 28] probability map is
    resampled with ``grid_sample`` onto its float box, within the box's integer bounds +- 1 px; zero
    elsewhere. torchvision pastes onto an integer box after padding the map by one cell. Returns
    [N, 1, img_h, img_w] probabilities."""
    out = masks.new_zeros((masks.shape[0], 1, img_h, img_w))
    for i in range(masks.shape[0]):
        b = boxes[i:i + 1]
        x0 = int(torch.clamp(b[0, 0].floor() - 1, min=0))
        y0 = int(torch.clamp(b[0, 1].floor() - 1, min=0))
        x1 = int(torch.clamp(b[0, 2].ceil() + 1, max=img_w))
        y1 = int(torch.clamp(b[0, 3].ceil() + 1, max=img_h))
        if x1 <= x0 or y1 <= y0:
            continue
        bx0, by0, bx1, by1 = torch.split(b, 1, dim=1)
        img_y = torch.arange(y0, y1, device=masks.device, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0, x1, device=masks.device, dtype=torch.float32) + 0.5
        img_y = (img_y - by0) / (by1 - by0) * 2 - 1
        img_x = (img_x - bx0) / (bx1 - bx0) * 2 - 1
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        out[i, 0, y0:y1, x0:x1] = F.grid_sample(masks[i:i + 1].float(), grid, align_corners=False)[0, 0]
    return out


def mmdet_init(model) -> None:
    """mmdetection's initialisation of this architecture (the recipes train from scratch, so it matters):
    the residual branch's last BN starts at 0 (ResNet ``zero_init_residual``), FPN convs Xavier-uniform,
    the box head's fc Xavier-uniform, its classifier N(0, 0.01) and regressor N(0, 0.001), biases 0 (the
    mask predictor's too). The rest (Kaiming fan-out convs, BN 1/0, RPN N(0, 0.01), mask head) is the same in torchvision."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    for m in model.backbone.body.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    for m in model.backbone.fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.roi_heads.box_head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    mp = model.roi_heads.mask_predictor  # torchvision leaves these biases at PyTorch's default
    nn.init.zeros_(mp.conv5_mask.bias)
    nn.init.zeros_(mp.mask_fcn_logits.bias)
    pred = model.roi_heads.box_predictor
    nn.init.normal_(pred.cls_score.weight, std=0.01)
    nn.init.normal_(pred.bbox_pred.weight, std=0.001)
    nn.init.zeros_(pred.cls_score.bias)
    nn.init.zeros_(pred.bbox_pred.bias)
