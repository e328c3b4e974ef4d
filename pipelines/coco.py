"""The instance-segmentation input pipelines, selected by name (``none``, ``ssj``, ``lsj``,
``ssj_scp``, ``lsj_scp``; see ``dali_scp.presets``).

    reader -> decode -> scale jitter (image + polygons) -> rasterised masks -> [copy-paste] -> pad

Outputs: ``pipelines.outputs.OUTPUTS`` (names, order and shapes; ``Geometry`` for the geometry vector).
``pipelines.iterator`` turns them into torchvision-style targets.
"""
from __future__ import annotations

import numpy as np

from dali_scp.dataset import CocoSplit
from dali_scp.deps import require_dali
from dali_scp.presets import EvalResize, PipelinePreset, pipeline_preset

require_dali()
from nvidia.dali import pipeline_def  # noqa: E402

from pipelines import blocks  # noqa: E402
from pipelines.devices import dali_device_id  # noqa: E402
from pipelines.outputs import EVAL_OUTPUTS, OUTPUTS, ordered  # noqa: E402,F401 - the iterators name outputs with these


@pipeline_def
def instance_segmentation_pipeline(files: blocks.CocoFiles, preset: PipelinePreset, device: str,
                                   shard_id: int, num_shards: int, shuffle: bool, cp_seed: int, start_batch: int = 0,
                                   stages: list | None = None, images: list | None = None, resampler: str = "dali"):
    jpegs, cat_ids, polygons, vertices, image_ids = blocks.coco_reader(files, shard_id, num_shards, shuffle,
                                                                       images=images)
    images = blocks.decode(jpegs, device)
    images, vertices, geometry = blocks.scale_jitter(jpegs, images, vertices, preset.jitter, resampler, stages)
    masks, boxes, cat_ids = blocks.instance_masks(polygons, vertices, cat_ids, preset.jitter.out_size, device, stages)
    if preset.copy_paste is not None:
        images, masks, boxes, cat_ids, pasted = blocks.copy_paste(images, masks, boxes, cat_ids, preset.copy_paste,
                                                                  preset.jitter.out_size, device, cp_seed, start_batch,
                                                                  stages)
    else:
        pasted = blocks.no_paste_flags(cat_ids)
    masks, boxes, cat_ids, pasted, counts = blocks.padded_targets(masks, boxes, cat_ids, pasted)
    return ordered(OUTPUTS, images=images, masks=masks, boxes=boxes, cat_ids=cat_ids, pasted=pasted, counts=counts,
                   image_ids=image_ids, geometry=geometry)


@pipeline_def
def evaluation_pipeline(files: blocks.CocoFiles, resize: EvalResize, device: str, shard_id: int, num_shards: int):
    jpegs, _, _, _, image_ids = blocks.coco_reader(files, shard_id, num_shards, shuffle=False)
    images = blocks.decode(jpegs, device)
    images, geometry, orig_size = blocks.fit_resize(jpegs, images, resize)
    return ordered(EVAL_OUTPUTS, images=images, image_ids=image_ids, geometry=geometry, orig_size=orig_size)


def build_eval(split: CocoSplit, resize: EvalResize, batch_size: int = 4, device: str = "cpu",
               num_threads: int = 2, shard_id: int = 0, num_shards: int = 1, device_id: int | None = None,
               annotations: str | None = None):
    files = blocks.CocoFiles(str(split.images_dir), str(annotations or split.annotations))
    pipe = evaluation_pipeline(files=files, resize=resize, device=device, shard_id=shard_id, num_shards=num_shards,
                               batch_size=batch_size, num_threads=num_threads,
                               device_id=dali_device_id(device, device_id))
    pipe.build()
    return pipe


def stream_seeds(seed: int, stream: int, window: int = 0) -> tuple[int, int]:
    """DALI's pipeline seed and the copy-paste stage's seed for one (run seed, process stream, window):
    independent streams for every combination (NumPy's SeedSequence), not ``seed * 1000 + stream``,
    which collides (seed 1 stream 0 == seed 0 stream 1000)."""
    a, b = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(window)]).generate_state(2)
    return int(a) & 0x7FFFFFFF, int(b) & 0x7FFFFFFF


def build(pipeline: str | PipelinePreset, split: CocoSplit, batch_size: int = 8, device: str = "cpu",
          num_threads: int = 2, shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle: bool = True,
          out_size: int | None = None, device_id: int | None = None, prefetch_queue_depth: int = 2,
          annotations: str | None = None, checkpoint: str | None = None, start_batch: int = 0,
          stream_id: int | None = None, stages: list | None = None, images: list | None = None, window: int = 0,
          resampler: str | None = None):
    """Build (not yet run) a pipeline. ``seed`` fixes every random choice, so the same seed gives the
    same batches; each stream (default: each shard; ``stream_id`` when processes share a shard) and each
    ``window`` of a training stream gets its own random choices. ``images``: the file names to read, in
    order (``dali_scp.order``); else the reader's own order and sharding. ``annotations`` overrides the
    JSON the reader uses (the dataset check passes its filtered copy). ``checkpoint`` (DALI's, of this
    pipeline) and ``start_batch`` (the number of batches it has run before) resume its exact data stream.
    ``stages`` (a list) receives the pipeline's custom stage objects, whose timers are this pipeline's
    alone. ``resampler`` (``presets.RESAMPLERS``): who resamples the jittered images, by default torch on
    the CPU and DALI on the GPU (``blocks.resample_window``)."""
    preset = pipeline if isinstance(pipeline, PipelinePreset) else pipeline_preset(pipeline, out_size)
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    files = blocks.CocoFiles(str(split.images_dir), str(annotations or split.annotations))
    stream = shard_id if stream_id is None else stream_id
    pipe_seed, cp_seed = stream_seeds(seed, stream, window)
    pipe = instance_segmentation_pipeline(
        files=files, preset=preset, device=device, shard_id=shard_id, num_shards=num_shards, shuffle=shuffle,
        cp_seed=cp_seed, start_batch=start_batch, stages=stages, images=images, batch_size=batch_size,
        resampler=resampler or ("torch" if device == "cpu" else "dali"),
        num_threads=num_threads, device_id=dali_device_id(device, device_id), seed=pipe_seed,
        prefetch_queue_depth=prefetch_queue_depth, enable_checkpointing=True, checkpoint=checkpoint)
    pipe.build()
    return pipe
