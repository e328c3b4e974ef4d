"""The instance-segmentation input pipelines, selected by name (``none``, ``ssj``, ``lsj``,
``ssj_scp``, ``lsj_scp``; see ``dali_scp.presets``).

    reader -> decode -> scale jitter (image + polygons) -> rasterised masks -> [copy-paste] -> pad

Outputs: ``pipelines.outputs.OUTPUTS`` (names, order and shapes; ``Geometry`` for the geometry vector).
``pipelines.iterator`` turns them into torchvision-style targets.
"""
from __future__ import annotations

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
                                   stages: list | None = None):
    jpegs, cat_ids, polygons, vertices, image_ids = blocks.coco_reader(files, shard_id, num_shards, shuffle)
    images = blocks.decode(jpegs, device)
    images, vertices, geometry = blocks.scale_jitter(jpegs, images, vertices, preset.jitter)
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


def build(pipeline: str | PipelinePreset, split: CocoSplit, batch_size: int = 8, device: str = "cpu",
          num_threads: int = 2, shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle: bool = True,
          out_size: int | None = None, device_id: int | None = None, prefetch_queue_depth: int = 2,
          annotations: str | None = None, checkpoint: str | None = None, start_batch: int = 0,
          stream_id: int | None = None, stages: list | None = None):
    """Build (not yet run) a pipeline. ``seed`` fixes every random choice, so the same seed gives the
    same batches; each stream (default: each shard; ``stream_id`` when processes share a shard) gets its
    own random choices. ``annotations`` overrides the JSON the reader uses (the dataset check passes its
    filtered copy). ``checkpoint`` (from ``CocoLoader.state()``) and ``start_batch`` (the number of
    batches the pipeline has run before it) resume the exact data stream of an interrupted run.
    ``stages`` (a list) receives the pipeline's custom stage objects, whose timers are this pipeline's
    alone."""
    preset = pipeline if isinstance(pipeline, PipelinePreset) else pipeline_preset(pipeline, out_size)
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    files = blocks.CocoFiles(str(split.images_dir), str(annotations or split.annotations))
    stream = shard_id if stream_id is None else stream_id
    pipe = instance_segmentation_pipeline(
        files=files, preset=preset, device=device, shard_id=shard_id, num_shards=num_shards, shuffle=shuffle,
        cp_seed=seed * 1000 + stream, start_batch=start_batch, stages=stages, batch_size=batch_size, num_threads=num_threads,
        device_id=dali_device_id(device, device_id), seed=seed * 1000 + stream + 1,
        prefetch_queue_depth=prefetch_queue_depth, enable_checkpointing=True, checkpoint=checkpoint)
    pipe.build()
    return pipe
