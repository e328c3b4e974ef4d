"""The building blocks every pipeline is composed from: reader -> decode -> jitter -> masks ->
copy-paste -> padded outputs. Each function adds nodes to the DALI graph being defined.

Why this shape: DALI's examples define one function per pipeline; ours differ only in the jitter range
and whether copy-paste runs, so they are one composition of these blocks with a preset
(``dali_scp.presets``), never copies of each other.
"""
from __future__ import annotations

from dataclasses import dataclass


from dali_scp.deps import require_dali

require_dali()
import nvidia.dali.math as dmath  # noqa: E402
from nvidia.dali import Pipeline, fn, types  # noqa: E402

from dali_scp import presets  # noqa: E402
from pipelines.stages import CopyPasteStage, RasterizeStage, ResampleStage  # noqa: E402

READER_NAME = "Reader"


@dataclass(frozen=True)
class CocoFiles:
    """Where a split lives; ``annotations`` is the (checked, filtered) JSON the reader uses."""
    images: str
    annotations: str


def coco_reader(files: CocoFiles, shard_id=0, num_shards=1, shuffle=True, seed=-1, images: list | None = None):
    """Crowd annotations are excluded (``include_iscrowd=False``): like mmdetection/torchvision they
    are not training targets. Class ids stay the dataset's own (``avoid_class_remapping``); the
    iterator maps them to contiguous labels. ``images`` (file names as in the JSON) is the exact
    sequence to read, repeats included (training: ``dali_scp.order``); then this process reads all of
    it and the reader neither shuffles nor shards."""
    order = dict(shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, pad_last_batch=not shuffle,
                 stick_to_shard=False) if images is None else dict(images=images, random_shuffle=False)
    jpegs, _boxes, cat_ids, polygons, vertices, image_ids = fn.readers.coco(
        file_root=files.images, annotations_file=files.annotations, polygon_masks=True, image_ids=True,
        include_iscrowd=False, avoid_class_remapping=True, ltrb=True, size_threshold=0.0, seed=seed,
        name=READER_NAME, **order)
    return jpegs, cat_ids, polygons, vertices, image_ids


def decode(jpegs, device: str):
    """``mixed`` = nvJPEG/nvImageCodec on the GPU; the CPU decoder where there is none. Stored pixels,
    EXIF orientation not applied (DALI's default applies it): the checked annotations are in stored
    pixels (``dali_scp.orientation``), as PIL and pycocotools read images."""
    return fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                             adjust_orientation=False)


def stored_shape(jpegs):
    """(h, w) of the stored pixels, as ``decode`` returns them; float64, as mmcv sizes in Python floats."""
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT64, adjust_orientation=False)
    return shape[0], shape[1]


def _fit_scale(h, w, long_side, short_side):
    """Scale that makes an h x w image fit long_side x short_side keeping aspect (as mmdetection)."""
    return dmath.min(long_side / dmath.max(h, w), short_side / dmath.min(h, w))


def _rescale(h, w, long_side, short_side):
    """mmcv's ``rescale_size``: (scale, out h, out w) with sides int(x * scale + 0.5), at least 1."""
    r = _fit_scale(h, w, long_side, short_side)
    return r, dmath.max(dmath.floor(h * r + 0.5), 1.0), dmath.max(dmath.floor(w * r + 0.5), 1.0)


def _stacked(dtype, *values):
    return fn.stack(*(fn.cast(v, dtype=dtype) for v in values))


def scale_jitter(jpegs, images, vertices, cfg: presets.Jitter, resampler: str = "dali", stages: list | None = None):
    """Resize + random crop + flip in *one* resampling pass, and the same affine map for the polygon
    vertices. The crop window is expressed as a (possibly flipped) ROI of the source image, so only
    the pixels that survive the crop are resampled (``resample_window``: which library does it).
    Returns padded images (S x S), the transformed vertices and the per-sample geometry
    (``pipelines.outputs.Geometry``: resize factor, valid height/width, flip, crop offset).

    The numbers are mmdetection's (RandomResize, Resize keep_ratio, RandomCrop absolute_range, RandomFlip;
    tests/test_ssj_statistics.py compares their statistics with its pipeline's): the square's side is
    int(S * s); the image is resized to int(x * r + 0.5) per axis, so each axis has its own scale
    (mmdetection's ``scale_factor``); the crop offset is uniform over 0..margin *inclusive* (numpy's
    randint(0, margin + 1)). Sizes in float64, as mmcv computes them in Python floats."""
    S = float(cfg.out_size)
    h, w = stored_shape(jpegs)
    lo, hi = cfg.scale_range
    s = fn.random.uniform(range=[lo, hi]) if hi > lo else lo
    side = dmath.floor(fn.cast(S * s, dtype=types.FLOAT64)) if hi > lo else float(int(S * lo))
    r, nh, nw = _rescale(h, w, side, side)  # the resized image
    ky, kx = nh / h, nw / w
    oh, ow = dmath.min(nh, S), dmath.min(nw, S)  # the crop window
    oy = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (nh - oh + 1.0)), nh - oh)
    ox = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (nw - ow + 1.0)), nw - ow)
    y0, y1 = oy / ky, (oy + oh) / ky
    x0, x1 = ox / kx, (ox + ow) / kx
    flip = fn.cast(fn.random.coin_flip(probability=cfg.flip_prob), dtype=types.FLOAT64) if cfg.flip_prob > 0 else 0.0
    xs = x0 + flip * (x1 - x0)
    xe = x1 - flip * (x1 - x0)
    window = _stacked(types.FLOAT64, y1, xe, y0, xs, oh, ow, ky, kx, oy, ox, flip)
    images = resample_window(images, window, cfg, resampler, stages)
    kx = (1.0 - 2.0 * flip) * kx  # x' = kx * (x - x0), mirrored: kx * (x1 - x)
    vertices = vertices * _stacked(types.FLOAT, kx, ky) - _stacked(types.FLOAT, xs * kx, y0 * ky)
    geometry = _stacked(types.FLOAT, r, oh, ow, flip, oy, ox)
    return images, vertices, geometry


def resample_window(images, window, cfg: presets.Jitter, resampler: str, stages: list | None = None):
    """The jitter's pixels from ``window``, a ``dali_scp.resample.Window`` vector per sample (float64: a
    region of the source, and the same region as whole pixels of the image resized by a scale per axis).
    ``dali``: DALI's ``fn.resize`` over the region (the GPU pipelines); ``torch``: the CPU pipelines' ``ResampleStage``,
    several times faster there (``dali_scp.resample``; its stage object is appended to ``stages``). Both
    antialiased bilinear, padded bottom/right to S x S with ``cfg.pad_value``.
    Both read the random draws through the one ``window`` node: DALI seeds its random operators by
    their position in the graph, so the draws (and the masks and boxes) are the same whichever resampler
    runs, and the CPU and GPU pipelines of one seed agree."""
    if resampler == "torch":
        stage = ResampleStage(cfg.out_size, cfg.pad_value, threads=Pipeline.current().num_threads)
        if stages is not None:
            stages.append(stage)
        return fn.python_function(images, window, function=stage, batch_processing=True,
                                  bytes_per_sample_hint=[cfg.out_size * cfg.out_size * 3])
    if resampler != "dali":
        raise ValueError(f"resampler must be one of {', '.join(presets.RESAMPLERS)}, not {resampler!r}")
    f32 = lambda v: fn.cast(v, dtype=types.FLOAT)  # noqa: E731
    images = fn.resize(images, size=f32(window[4:6]), roi_start=f32(window[2:4]), roi_end=f32(window[0:2]),
                       interp_type=types.INTERP_LINEAR, antialias=True)
    # pad bottom/right to S x S: a crop window anchored at the origin that extends past the image
    # (crop_mirror_normalize's padding is ~3x cheaper on the CPU than fn.pad)
    return fn.crop_mirror_normalize(images, crop=(cfg.out_size, cfg.out_size), crop_pos_x=0.0, crop_pos_y=0.0,
                                    out_of_bounds_policy="pad", fill_values=float(cfg.pad_value),
                                    dtype=types.UINT8, output_layout="HWC", mean=0.0, std=1.0)


def fit_size(h, w, cfg: presets.EvalResize):
    """mmcv's ``rescale_size``: scale min(long / max(h, w), short / min(h, w)), sides int(x * scale + 0.5),
    in float64 as Python computes it (float32 rounds e.g. 320 x 640's 666.5 down to 666). Returns
    (scale, out h, out w)."""
    return _rescale(h, w, float(cfg.max_long), float(cfg.max_short))


def fit_resize(jpegs, images, cfg: presets.EvalResize):
    """Test-time geometry: resize keeping aspect to fit max_long x max_short (``fit_size``), pad bottom/right
    to the batch's largest size rounded up to ``pad_divisor``. Returns images, geometry (scale, valid h,
    valid w, 0) and the original (h, w). ``cfg.method`` "antialias" resizes here; "opencv" leaves the
    decoded image at its size for ``pipelines.iterator.EvalLoader`` to resize as OpenCV does
    (``pipelines.opencv_resize``: integer arithmetic DALI's filters do not offer)."""
    h, w = stored_shape(jpegs)
    r, oh, ow = fit_size(h, w, cfg)
    if cfg.method == "antialias":
        size = fn.cast(fn.stack(oh, ow), dtype=types.FLOAT)  # whole numbers: exact in float32
        images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.pad(images, axis_names="HW", align=[cfg.pad_divisor, cfg.pad_divisor])
    return images, fn.cast(fn.stack(r, oh, ow, 0.0 * r), dtype=types.FLOAT), fn.cast(fn.stack(h, w), dtype=types.FLOAT)


# COCO train2017's most crowded image has 93 instances: the worst case the output hints are sized for.
# (DALI 2.x's default dynamic executor sizes python_function outputs itself and ignores the hints; the
# legacy executor preallocates from them.)
MAX_INSTANCES = 93


def _hints(out_size: int, rows: int, image: bool = False) -> list:
    masks = rows * out_size * (out_size // 8)
    per_object = [rows * 16, rows * 4] + ([rows] if image else [])  # boxes, ids, pasted flags
    return ([out_size * out_size * 3] if image else []) + [masks] + per_object


def instance_masks(polygons, vertices, cat_ids, out_size: int, device: str, stages: list | None = None):
    """Rasterise every instance at the output resolution; drop those cropped away. Returns masks
    (bit-packed [Kmax, S, S/8], padded to the batch's largest count), tight boxes and the kept objects'
    ``cat_ids``. The stage object is appended to ``stages`` (its timer: ``pipelines.profile``)."""
    stage = RasterizeStage(out_size, out_size)
    if stages is not None:
        stages.append(stage)
    if device == "gpu":
        polygons, vertices, cat_ids = polygons.gpu(), vertices.gpu(), cat_ids.gpu()
    return fn.python_function(polygons, vertices, cat_ids, function=stage, num_outputs=3,
                              bytes_per_sample_hint=_hints(out_size, MAX_INSTANCES),
                              batch_processing=True, device=device)


def copy_paste(images, masks, boxes, cat_ids, cfg: presets.CopyPaste, out_size: int, device: str, seed: int,
               start_batch: int = 0, stages: list | None = None):
    """Returns images, masks (bit-packed, padded), boxes, category ids and the ``pasted`` flags. The
    stage object is appended to ``stages``."""
    stage = CopyPasteStage(cfg, seed=seed, start_batch=start_batch, threads=Pipeline.current().num_threads)
    if stages is not None:
        stages.append(stage)
    rows = MAX_INSTANCES + min(MAX_INSTANCES, cfg.max_num_pasted)  # a destination's own + pasted objects
    return fn.python_function(images, masks, boxes, cat_ids, function=stage, num_outputs=5,
                              bytes_per_sample_hint=_hints(out_size, rows, image=True),
                              batch_processing=True, device=device)


def no_paste_flags(cat_ids):
    """All-zero ``pasted`` flags when no copy-paste runs (one per object)."""
    return fn.cast(cat_ids * 0, dtype=types.UINT8)


def padded_targets(masks, boxes, cat_ids, pasted):
    """The PyTorch iterator wants one dense tensor per output: pad along the instance axis and report
    how many rows of each sample are real. Masks arrive padded already (the stages write them into
    one padded batch array: padding 1024^2 masks here would be one more full copy)."""
    counts = fn.cast(cat_ids.shape(), dtype=types.INT32)
    return (masks, fn.pad(boxes, axes=(0,), fill_value=0.0),
            fn.pad(cat_ids, axes=(0,), fill_value=-1), fn.pad(pasted, axes=(0,), fill_value=0), counts)
