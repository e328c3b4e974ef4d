"""Mask R-CNN in the shape of the seed configs (mmdetection ``mask-rcnn_r50_fpn`` with SyncBN, RPN of 2
convs, 4conv1fc box head and 4-conv mask head, both normalised): torchvision's ``maskrcnn_resnet50_fpn_v2``
layout, with the backbone's norm layers trainable and converted to SyncBN under DDP.

Why a custom transform: the DALI pipeline already resized and padded every image; torchvision's
``GeneralizedRCNNTransform`` would resize again (and resample the masks). Ours only normalises uint8
pixels once, on the device, and batches - no second resize.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from dali_scp.presets import Recipe
from trainer import mmdet_style as mm

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MMDET_MEAN = (123.675, 116.28, 103.53)  # the same on the 0-255 scale, as mmdetection's configs state them
MMDET_STD = (58.395, 57.12, 57.375)


class PipelineTransform(GeneralizedRCNNTransform):
    """Normalise and batch, never resize (the input pipeline owns geometry)."""

    def __init__(self, *args, mask_paste: str = "torchvision", normalize: str = "torchvision", **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_paste, self.pixel_arith = mask_paste, normalize

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training or self.mask_paste != "mmdet":
            return super().postprocess(result, image_shapes, original_image_sizes)
        for r, shape, orig in zip(result, image_shapes, original_image_sizes):
            r["boxes"] = resize_boxes(r["boxes"], shape, orig)
            if "masks" in r:
                r["masks"] = mm.paste_masks(r["masks"], r["boxes"], *orig)
        return result

    def normalize(self, image):
        if image.dtype == torch.uint8 and self.pixel_arith == "mmdet":  # DetDataPreprocessor's float32 arithmetic
            mean = torch.tensor(MMDET_MEAN, device=image.device)[:, None, None]
            std = torch.tensor(MMDET_STD, device=image.device)[:, None, None]
            return (image.float() - mean) / std
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        return super().normalize(image)


def narrow(trunk, width: int, norm_layer=nn.BatchNorm2d):
    """``trunk`` rebuilt with its first stage ``width`` channels wide (stages ``width`` x 1, 2, 4, 8, as
    mmdetection's ResNet ``base_channels``), the same blocks, strides and norms, torchvision's
    initialisation. What lets a CPU run the recipes' ResNet-50 (``Recipe.backbone_width``) and the demo
    its half-width ResNet-18."""
    block = type(trunk.layer1[0])
    trunk.inplanes = width
    trunk.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    trunk.bn1 = norm_layer(width)
    for k in range(1, 5):
        n = len(getattr(trunk, f"layer{k}"))
        setattr(trunk, f"layer{k}", trunk._make_layer(block, width * 2 ** (k - 1), n, stride=1 if k == 1 else 2))
    for m in trunk.modules():  # torchvision ResNet's own initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return trunk


def resnet18_half(weights=None, norm_layer=nn.BatchNorm2d):
    """ResNet-18 at half width (32-64-128-256 channels): a quarter of its convolution work. The ``demo``
    recipe's backbone, trained from scratch in minutes on a 2-core CPU; no pretrained weights exist."""
    if weights is not None:
        raise ValueError("resnet18_half has no pretrained weights")
    return narrow(resnet18(weights=None, norm_layer=norm_layer), 32, norm_layer)


BACKBONES = {"resnet50": resnet50, "resnet18": resnet18, "resnet18_half": resnet18_half}


def shape_mismatches(expected: dict, got: dict) -> list[str]:
    """Keys of ``expected`` that ``got`` lacks, holds as something other than a tensor, or holds with another
    shape: what a checkpoint read as data must pass before ``load_state_dict`` sees it."""
    return [k for k, v in expected.items() if not (torch.is_tensor(got.get(k)) and got[k].shape == v.shape)]


def build_model(recipe: Recipe, num_classes: int, backbone_weights: str | None = None) -> MaskRCNN:
    norm = nn.BatchNorm2d
    trunk = BACKBONES[recipe.backbone](weights=None, norm_layer=norm)
    if recipe.backbone_width != 64:
        trunk = narrow(trunk, recipe.backbone_width, norm)
    if backbone_weights:
        load_backbone_weights(trunk, backbone_weights)
    backbone = fpn_backbone(trunk, recipe.trainable_layers, recipe.fpn_channels, norm)
    sizes, ratios = tuple((int(s),) for s in recipe.anchor_sizes), ((0.5, 1.0, 2.0),) * len(recipe.anchor_sizes)
    if recipe.anchors == "mmdet":  # mmdetection: anchor size = 8 x stride
        anchors = mm.FixedStrideAnchors(sizes, ratios, tuple(s // 8 for s in recipe.anchor_sizes))
    else:
        anchors = AnchorGenerator(sizes, ratios)
    hc = recipe.head_channels
    model = MaskRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((backbone.out_channels, 7, 7), [hc] * 4, [4 * hc], norm_layer=norm),
        mask_head=MaskRCNNHeads(backbone.out_channels, [hc] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(hc, hc, num_classes),
        box_predictor=FastRCNNPredictor(4 * hc, num_classes),
        rpn_post_nms_top_n_train=recipe.rpn_post_nms_train, box_batch_size_per_image=recipe.rois_per_image,
        box_detections_per_img=recipe.detections_per_image, box_score_thresh=recipe.score_threshold,
        min_size=recipe.image_size, max_size=recipe.image_size)
    seed_style(model, recipe)
    model.transform = PipelineTransform(recipe.image_size, recipe.image_size, IMAGENET_MEAN, IMAGENET_STD,
                                        size_divisible=32, mask_paste=recipe.mask_paste,
                                        normalize=recipe.normalize)
    return model


def seed_style(model: MaskRCNN, recipe: Recipe) -> None:
    """Swap in mmdetection's arithmetic where the recipe says "mmdet" (``trainer.mmdet_style``); the RPN
    and RoI heads become subclasses that read their choices, the rest is torchvision's as built."""
    rpn, heads = model.rpn, model.roi_heads
    if recipe.roi_align == "mmdet":  # mmdetection's SingleRoIExtractor over P2-P5 (MaskRCNN type-checks, so here)
        heads.box_roi_pool = mm.LevelRoIAlign(["0", "1", "2", "3"], 7)
        heads.mask_roi_pool = mm.LevelRoIAlign(["0", "1", "2", "3"], 14)
    rpn.__class__, heads.__class__ = mm.SeedRPN, mm.SeedRoIHeads
    rpn.box_loss = heads.box_loss = recipe.box_loss
    heads.mask_targets = recipe.mask_targets
    heads.sampler = recipe.sampler
    if recipe.sampler == "mmdet":  # mask-rcnn_r50_fpn.py train_cfg: RandomSampler 256 / 0.5 (RPN), 512 / 0.25 (box head)
        for stage in (rpn, heads):
            s = stage.fg_bg_sampler
            stage.fg_bg_sampler = mm.RandomSampler(s.batch_size_per_image, s.positive_fraction)
    if recipe.matcher == "mmdet":  # mask-rcnn_r50_fpn.py train_cfg: rpn / rcnn MaxIoUAssigner
        rpn.proposal_matcher = mm.MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)
        heads.proposal_matcher = mm.MaxIoUMatcher(0.5, 0.5, min_pos_iou=0.5)
    if recipe.box_decode == "mmdet":
        rpn.box_coder = mm.ClampedBoxCoder(rpn.box_coder.weights)
        heads.box_coder = mm.ClampedBoxCoder(heads.box_coder.weights)
        rpn.min_size = torch.finfo(torch.float32).tiny  # keeps w, h > 0 (min_bbox_size=0), torchvision: >= 1e-3
        rpn.select = "mmdet"  # which proposals survive exact score ties, as mmdetection's RPNHead
        heads.drop_small = False
    if recipe.init == "mmdet":
        mm.mmdet_init(model)


def inference(model, images: list, original_sizes: list) -> list:
    """Detections for a list of [3, h, w] images (the valid region of each padded pipeline image):
    torchvision's Mask R-CNN forward, except that postprocessing maps boxes and pastes masks into the
    *original* image size (the pipeline's resize is undone here, not by a second resize)."""
    m = model.module if hasattr(model, "module") else model
    image_list, _ = m.transform(images)
    features = m.backbone(image_list.tensors)
    proposals, _ = m.rpn(image_list, features)
    detections, _ = m.roi_heads(features, proposals, image_list.image_sizes)
    return m.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def fpn_backbone(trunk, trainable_layers: int, out_channels: int, norm) -> BackboneWithFPN:
    """torchvision's ``_resnet_fpn_extractor`` with the FPN width as a parameter (256 in every recipe
    but ``demo``)."""
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers.append("bn1")
    for name, p in trunk.named_parameters():
        if all(not name.startswith(layer) for layer in layers):
            p.requires_grad_(False)
    in_ch = trunk.inplanes // 8
    return BackboneWithFPN(trunk, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                           [in_ch * 2 ** i for i in range(4)], out_channels, extra_blocks=LastLevelMaxPool(),
                           norm_layer=norm)


def load_backbone_weights(trunk: nn.Module, path: str) -> None:
    """A local ImageNet checkpoint (torchvision's ``resnet50-*.pth`` or a dict with ``state_dict``);
    never downloaded."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--backbone-weights {path}: file not found (weights are never downloaded; "
                                "pass a local torchvision ResNet checkpoint)")
    from trainer.checkpoint_reader import read, state_dict_of
    obj = read(p).obj
    sd = state_dict_of(obj)
    if sd is None:
        raise ValueError(f"--backbone-weights {path}: not a state dict (a {type(obj).__name__})")
    sd = {k.removeprefix("backbone.body."): v for k, v in sd.items()}
    missing, unexpected = trunk.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise ValueError(f"--backbone-weights {path}: not a matching ResNet checkpoint; missing {missing[:5]}...")
    log.info("loaded backbone weights from %s (%d tensors ignored: %s)", path, len(unexpected), unexpected[:3])


def to_model_inputs(images: torch.Tensor, targets=None):
    """uint8 [B, H, W, 3] from the pipeline -> list of [3, H, W] (normalised inside the model)."""
    imgs = list(images.permute(0, 3, 1, 2))
    if targets is None:
        return imgs
    t = [dict(boxes=x["boxes"].float(), labels=x["labels"].long(), masks=x["masks"]) for x in targets]
    return imgs, t
