"""Every recipe number lives here, once: augmentation presets and the training schedules.

Why one file: the point of the project is that ``--preset r50_ssj_scp_270k`` *is* the mmdetection
recipe behind the target table (Mask R-CNN R-50-FPN, batch 64, SyncBN, 1024^2; Ghiasi et al. 2021).
Pipelines, trainer, profiler and tests read these objects; nothing re-types a number.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(frozen=True)
class Jitter:
    """Scale jittering as in mmdetection's SSJ/LSJ configs: resize so the image fits a square of
    side ``out_size * s`` (s ~ U(scale_range)) keeping aspect, random crop of at most out_size^2,
    horizontal flip, pad bottom/right to out_size^2."""
    out_size: int = 1024
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.5
    pad_value: int = 0


@dataclass(frozen=True)
class CopyPaste:
    """Simple Copy-Paste between samples of a batch (mmdetection ``CopyPaste`` defaults)."""
    max_num_pasted: int = 100
    paste_prob: float = 1.0
    bbox_occluded_thr: float = 10.0
    mask_occluded_thr: int = 300
    blend_sigma: float = 0.0  # the paper's Gaussian alpha blending; off in mmdetection


@dataclass(frozen=True)
class PipelinePreset:
    """An input pipeline by name (``ssj_scp`` ...): jitter + optional copy-paste. Not to be confused with
    a training ``Recipe``, which the CLI's ``--preset`` names; a recipe names its pipeline, and its
    ``image_size`` becomes ``jitter.out_size`` here (the trainer passes it as ``out_size``)."""
    name: str
    jitter: Jitter
    copy_paste: CopyPaste | None = None


SSJ_RANGE = (0.8, 1.25)
LSJ_RANGE = (0.1, 2.0)

PIPELINES: dict[str, PipelinePreset] = {
    "none": PipelinePreset("none", Jitter(scale_range=(1.0, 1.0))),
    "ssj": PipelinePreset("ssj", Jitter(scale_range=SSJ_RANGE)),
    "lsj": PipelinePreset("lsj", Jitter(scale_range=LSJ_RANGE)),
    "ssj_scp": PipelinePreset("ssj_scp", Jitter(scale_range=SSJ_RANGE), CopyPaste()),
    "lsj_scp": PipelinePreset("lsj_scp", Jitter(scale_range=LSJ_RANGE), CopyPaste()),
}


def pipeline_preset(name: str, out_size: int | None = None) -> PipelinePreset:
    if out_size is not None and out_size % 8:
        raise ValueError(f"out_size must be a multiple of 8 (masks are bit-packed), not {out_size}")
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    p = PIPELINES[name]
    if out_size is not None and out_size != p.jitter.out_size:
        p = replace(p, jitter=replace(p.jitter, out_size=out_size))
    return p


# How the test-time resize resamples (``EvalResize.method``): "antialias" - DALI's linear filter, widened
# when shrinking so every source pixel counts; "opencv" - OpenCV's INTER_LINEAR as mmdetection's test
# pipeline resizes, bit for bit (bilinear from the 2 x 2 nearest pixels, no antialiasing, 11-bit weights;
# ``pipelines.opencv_resize``). Where an image is shrunk they differ by several grey levels, elsewhere by
# DALI's float rounding (docs/checkpoints.md).
RESIZE_METHODS = ("antialias", "opencv")

# Who resamples the training jitter's pixels (``pipelines.blocks.resample_window``): DALI's fn.resize (the
# GPU pipelines) or torch's antialiased uint8 kernels (the CPU pipelines' default, ``dali_scp.resample``).
RESAMPLERS = ("dali", "torch")


@dataclass(frozen=True)
class EvalResize:
    """Test-time resize keeping aspect (mmdetection: scale=(1333, 800), keep_ratio=True), pad to a
    multiple of ``pad_divisor``. ``method``: one of RESIZE_METHODS; the default is what checkpoints
    written before the field existed were evaluated with."""
    max_long: int = 1333
    max_short: int = 800
    pad_divisor: int = 32
    method: str = "antialias"

    def __post_init__(self):
        if self.method not in RESIZE_METHODS:
            raise ValueError(f"eval resize method {self.method!r}: choose one of {', '.join(RESIZE_METHODS)}")


# The Recipe fields that choose between mmdetection's and torchvision's arithmetic.
MODEL_FIELDS = ("normalize", "roi_align", "box_loss", "matcher", "sampler", "mask_targets", "anchors", "box_decode",
                "mask_paste", "init")


@dataclass(frozen=True)
class Recipe:
    """A training schedule. ``lr`` is for ``total_batch``; other batch sizes scale it linearly."""
    name: str
    pipeline: str
    max_iters: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 4e-5
    total_batch: int = 64
    image_size: int = 1024
    warmup_iters: int = 500
    warmup_factor: float = 0.067
    steps: tuple[int, ...] = (81000, 85500, 87750)
    gamma: float = 0.1
    norm: str = "SyncBN"
    backbone: str = "resnet50"
    backbone_width: int = 64       # resnet50's stem / first-stage width (mmdetection's base_channels); narrower in tests
    trainable_layers: int = 5
    fpn_channels: int = 256        # torchvision / mmdetection defaults below; only `demo` shrinks them
    head_channels: int = 256
    rpn_post_nms_train: int = 2000
    rois_per_image: int = 512
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per FPN level (P2-P6), 3 aspect ratios each
    repeat_threshold: float = 0.0  # repeat-factor sampling's t (LVIS: 0.001); 0 reads every image once an epoch
    detections_per_image: int = 100   # test time: COCOeval scores 100 per image, LVIS 300
    score_threshold: float = 0.05      # test time: detections kept above this (torchvision's default; LVIS 1e-4)
    # Where mmdetection's Mask R-CNN and torchvision's compute differently: "mmdet" or "torchvision" each
    # (docs/checkpoints.md "mmdetection vs torchvision"; trainer/mmdet_style.py). The defaults are torchvision's so a
    # checkpoint written before these fields existed rebuilds the model it was trained as; the seed
    # recipes set all of them to "mmdet" (_SEED_MODEL).
    normalize: str = "torchvision"     # mmdet: minus 255 x mean, over 255 x std / scaled to 0-1 first (equal but for rounding)
    roi_align: str = "torchvision"     # mmdet: aligned=True, sampling_ratio=0 / aligned=False, 2
    box_loss: str = "torchvision"      # RPN and box head - mmdet: L1 / smooth L1, beta 1/9
    matcher: str = "torchvision"       # mmdet: MaxIoUAssigner low-quality matches with min IoU 0.3 (RPN), 0.5 (box head)
    sampler: str = "torchvision"       # mmdet: gt joins the RoI candidates after matching, first, as its own match; RandomSampler / before matching
    mask_targets: str = "torchvision"  # mmdet: aligned RoIAlign of the gt mask, binarised / unaligned, soft
    anchors: str = "torchvision"       # mmdet: not rounded, fixed strides 4..64 / rounded, strides inferred
    box_decode: str = "torchvision"    # mmdet: dw, dh clamped both ways, no 0.01-px detection filter / upper clamp, filter
    mask_paste: str = "torchvision"    # mmdet: grid_sample onto the float box / resize onto the integer box
    init: str = "torchvision"          # mmdet: zero-init residual BN, Xavier FPN and fc, N(0, .01/.001) predictors
    eval_resize: EvalResize = field(default_factory=EvalResize)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 20

    def __post_init__(self):
        for f in MODEL_FIELDS:
            if getattr(self, f) not in ("mmdet", "torchvision"):
                raise ValueError(f"recipe {self.name}: {f} must be 'mmdet' or 'torchvision', not {getattr(self, f)!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The inverse of ``as_dict`` (checkpoints store the recipe as plain JSON-like data: tuples come
        back as lists, ``eval_resize`` as a dict)."""
        d = dict(d)
        d["eval_resize"] = EvalResize(**_checked(EvalResize, d["eval_resize"]))
        for k in ("steps", "anchor_sizes"):  # anchor_sizes: absent from checkpoints before it existed
            if k in d:
                d[k] = tuple(d[k])
        return cls(**_checked(cls, d))


# A recipe read from a file (a checkpoint anyone may have written): every field of its declared type, and the
# sizes that decide what evaluation allocates in range, before anything is built from it.
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "tuple[int, ...]": (tuple,),
          "tuple[float, float]": (tuple,)}
_SIZES = dict(image_size=(32, 16384), max_long=(32, 16384), max_short=(32, 16384), pad_divisor=(1, 1024),
              detections_per_image=(1, 100000))


def _checked(kind: type, d) -> dict:
    if not isinstance(d, dict):
        raise TypeError(f"{kind.__name__} stored as {type(d).__name__}, not a dict")
    for f in fields(kind):
        v = d.get(f.name)
        if f.name not in d or f.type not in _KINDS:
            continue
        if type(v) not in _KINDS[f.type] or type(v) is str and len(v) > 200 or type(v) is tuple and (
                len(v) > 64 or not all(type(x) in (int, float) for x in v)):
            raise TypeError(f"recipe field {f.name} is a {type(v).__name__}, not {f.type}")
        low, high = _SIZES.get(f.name, (-2 ** 62, 2 ** 62)) if type(v) is int else (None, None)
        if low is not None and not low <= v <= high:
            raise ValueError(f"recipe field {f.name} = {v} is outside [{low}, {high}]")
    return d


_90K = dict(max_iters=90000, warmup_iters=500, warmup_factor=0.067, steps=(81000, 85500, 87750))
_270K = dict(max_iters=270000, warmup_iters=1000, warmup_factor=0.001, steps=(243000, 256500, 263250))

# mmdetection's model (mask-rcnn_r50_fpn + the seed config): its arithmetic everywhere it differs from
# torchvision's, and its RPN keeps 1000 proposals per image in training (rpn_proposal.max_per_img).
_SEED_MODEL = dict({f: "mmdet" for f in MODEL_FIELDS}, rpn_post_nms_train=1000)
# ... and its test: 1333 x 800 resized as OpenCV resizes (no antialiasing), so its checkpoints score here as
# mmdetection's own test scores them (docs/checkpoints.md, "The test-time path").
_SEED_MODEL["eval_resize"] = EvalResize(method="opencv")

RECIPES: dict[str, Recipe] = {}
for _pipe in ("ssj", "ssj_scp", "lsj", "lsj_scp"):
    for _tag, _sched in (("90k", _90K), ("270k", _270K)):
        _name = f"r50_{_pipe}_{_tag}"
        RECIPES[_name] = Recipe(name=_name, pipeline=_pipe, **_sched, **_SEED_MODEL)

# The README's first command: trained from scratch on a 2-core CPU in about 6 minutes on the demo set
# (`python -m dali_scp.synthetic --demo`: few medium-to-large objects of four shapes), where it ends near
# a plateau (seed 0 on 2026-12-05: mask AP 42 after 400 iterations, 54 after 500, 57 after 600; three seeds
# in the README). On the COCO-like benchmark set the same 600 iterations stop on the steep part of the curve
# (mask AP 18-25, moving with library versions). Half-width ResNet-18, 32-channel heads, 64 RoIs per
# image: ~2x cheaper per iteration than the first demo recipe; anchors of 16-256 px for 256^2 images. It
# keeps torchvision's arithmetic in every MODEL_FIELDS choice: its AP was measured with them, and
# torchvision's RoIAlign with 2 samples per bin is the cheaper one.
RECIPES["demo"] = Recipe(
    name="demo", pipeline="ssj_scp", max_iters=600, lr=0.02, total_batch=4, image_size=256,
    warmup_iters=20, warmup_factor=0.1, steps=(480,), norm="BN", backbone="resnet18_half", trainable_layers=5,
    fpn_channels=64, head_channels=32, rpn_post_nms_train=300, rois_per_image=64,
    anchor_sizes=(16, 32, 64, 128, 256),
    eval_resize=EvalResize(max_long=256, max_short=256, pad_divisor=32), checkpoint_every=100,
    keep_checkpoints=2, log_every=20, weight_decay=1e-4,
)


# r50_ssj_scp_90k shrunk to a 2-core CPU: its model with every mmdetection choice, its pipeline, optimiser and
# schedule shape (linear warmup from 0.067, steps at 90 / 95 / 97.5 % of the iterations), at 256^2 with
# ResNet-50 at 1/8 of its width, FPN and heads of 32 channels, 128 RoIs per image (positive fraction still
# 0.25), batch 2 (the learning rate scaled linearly from 0.1 at 64) and 50 iterations with a warmup of 10.
# What a user runs to see the seed's arithmetic train end to end in a minute (tests/test_train_step.py runs it
# on the demo set: the loss falls); it reaches no AP worth reading.
RECIPES["r50_ssj_scp_smoke"] = replace(
    RECIPES["r50_ssj_scp_90k"], name="r50_ssj_scp_smoke", image_size=256, backbone_width=8, fpn_channels=32,
    head_channels=32, rois_per_image=128, total_batch=2, lr=RECIPES["r50_ssj_scp_90k"].lr * 2 / 64, max_iters=50,
    warmup_iters=10, steps=(45, 47, 48), eval_resize=replace(RECIPES["r50_ssj_scp_90k"].eval_resize, max_long=256, max_short=256),
    checkpoint_every=50, log_every=1)

# LVIS v1 (Ghiasi et al. 2021, Table 7: Mask R-CNN R50-FPN at 1024^2 on LVIS v1.0, with and without
# copy-paste). Repeat-factor sampling with t = 0.001 and, at test time, 300 detections per image above a
# score of 1e-4, as detectron2's LVIS configs; the schedule is the COCO 270k recipe's (the paper's LVIS
# schedule could not be confirmed here; see docs/training.md "LVIS v1 recipes").
_LVIS = dict(repeat_threshold=0.001, detections_per_image=300, score_threshold=1e-4)
for _pipe in ("lsj", "lsj_scp"):
    RECIPES[f"r50_{_pipe}_lvis"] = Recipe(name=f"r50_{_pipe}_lvis", pipeline=_pipe, **_270K, **_SEED_MODEL, **_LVIS)

# The demo on the synthetic LVIS-like set (`--dataset lvis` without --coco-root). Its t plays the part of
# LVIS's: there t = 0.001 is 100 of 100,170 training images, LVIS's frequent threshold, so every category
# in fewer than 100 images is repeated; 100 of the synthetic set's 120 training images is t = 0.83. At
# test time it keeps the demo's 100 detections above 0.05 (LVIS's evaluation still caps at 300): 300
# masks per image above 1e-4, pasted at full resolution on a CPU, made its 24-image evaluation 5 minutes.
RECIPES["demo_lvis"] = replace(RECIPES["demo"], name="demo_lvis", repeat_threshold=0.83)


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
