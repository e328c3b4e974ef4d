"""One loader, timed in its own process (``benchmarks/anchors/run.py`` starts it once per round, in the
environment the loader needs, and reads the one JSON line it prints last).

    python loaders.py LOADER --root COCO --batch 8 --workers 2 --warmup 5 --batches 20 [--vision DIR]

LOADER is ``family:pipeline``:

- ``ours:ssj_scp``, ``ours:ssj`` (dali-scp's CPU pipelines through DALI's PyTorch iterator, as the trainer
  takes them; ``ours-dali-resize:...``: the same with DALI's CPU resize, the resampler before torch's),
  ``ours:decode`` (reader + decoder only);
- ``baseline:ssj_scp``, ``baseline:ssj`` (``pipelines/baseline.py``: the project's own DataLoader form);
- ``mmdet:ssj_scp``, ``mmdet:ssj`` (mmdetection 3.3's seed configs, ``simple_copy_paste/...ssj-scp-90k``
  and ``...ssj-90k`` from its wheel, their ``train_dataloader`` built by mmengine's ``Runner``: with
  ``CopyPaste`` that is the ``MultiImageMixDataset`` wrapper; run by the mmdetection environment);
- ``torchvision:ssj_scp``, ``torchvision:ssj`` (torchvision's ``references/detection`` from the checkout
  given by ``--vision``, wired as its ``train.py`` wires them for Mask R-CNN: ``get_coco`` with the
  ``lsj`` preset (its ``ScaleJitter`` set to SSJ's range 0.8-1.25, as the seed configs), random sampler
  grouped by aspect ratio (factor 3), and for copy-paste ``copypaste_collate_fn``:
  ``SimpleCopyPaste(blending=True, resize_interpolation=BILINEAR)`` over ``utils.collate_fn``).

Every loader reads the same images with the same batch size and worker / thread count, seeded. After
``--warmup`` untimed batches (worker start-up, queues filled and drained) ``--batches`` are timed one by
one; CPU seconds are this process's and its children's (the DataLoader workers) from /proc. Only the
standard library is imported before the loader is chosen: the same file runs in every environment.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("ours", "ours-dali-resize", "baseline", "mmdet", "torchvision")
PIPELINES = ("ssj_scp", "ssj", "decode")
MMDET_CONFIGS = {"ssj_scp": "mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-scp-90k_coco.py",
                 "ssj": "mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-90k_coco.py"}
SSJ_RANGE = (0.8, 1.25)  # dali_scp.presets.SSJ_RANGE; not imported: the mmdetection environment runs this file


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its live descendants (DataLoader workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, children(os.getpid())
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
        todo += children(pid)
    t = os.times()
    return total + t.user + t.system


def versions(mods) -> dict:
    out = {"python": sys.version.split()[0]}
    for m in mods:
        try:
            out[m] = __import__(m, fromlist=["x"]).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is left out, not fatal
            pass
    return out


# ------------------------------------------------------------------ dali-scp (ours) and its baseline
def _our_split(root):
    sys.path.insert(0, str(REPO))
    from dali_scp.check import checked_annotations
    from dali_scp.dataset import resolve
    split = resolve(root, "train2017")
    ann, _ = checked_annotations(split.annotations, split.images_dir, progress=False)
    return split, str(ann)


def ours(pipeline, a, resampler=None):
    split, ann = _our_split(a.root)
    if pipeline == "decode":
        from pipelines.profile import decode_pipeline
        pipe = decode_pipeline(split, "cpu", a.batch, a.workers, ann)
        return pipe.run, versions(["nvidia.dali", "numpy"])
    from dali_scp.presets import pipeline_preset
    from pipelines.iterator import CocoLoader
    it = iter(CocoLoader(pipeline_preset(pipeline), split, batch_size=a.batch, device="cpu", num_threads=a.workers,
                         seed=a.seed, infinite=True, annotations=ann, resampler=resampler))
    return lambda: next(it), versions(["nvidia.dali", "torch", "numpy"])


def baseline(pipeline, a):
    split, ann = _our_split(a.root)
    from dali_scp.presets import pipeline_preset
    from pipelines.baseline import baseline_loader
    loader = baseline_loader(ann, split.images_dir, pipeline_preset(pipeline), a.batch, a.workers, a.seed, check=False)
    it = iter(loader)
    return lambda: next(it), versions(["torch", "PIL", "pycocotools", "numpy"])


# ------------------------------------------------------------------ mmdetection
def _no_compiled_mmcv_kernels():
    """mmcv-lite ships no ``mmcv._ext``, but mmdetection imports ``mmcv.ops`` (for its mask structures'
    RoIAlign) on the way to its datasets. Every compiled kernel becomes one that raises if called: the
    data path must not call any, and here it is seen not to."""
    import types
    from mmcv.utils import ext_loader

    def load_ext(name, funcs):
        def missing(f):
            def call(*_, **__):
                raise RuntimeError(f"mmcv kernel {f} called by the data path")
            return call
        return types.SimpleNamespace(**{f: missing(f) for f in funcs})
    ext_loader.load_ext = load_ext


def mmdet(pipeline, a):
    _no_compiled_mmcv_kernels()
    import mmdet as mmdet_pkg
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import Runner
    register_all_modules()
    cfg = Config.fromfile(str(Path(mmdet_pkg.__file__).parent / ".mim" / "configs" / "simple_copy_paste"
                              / MMDET_CONFIGS[pipeline]))
    dl = cfg.train_dataloader
    dl.batch_size, dl.num_workers = a.batch, a.workers
    dataset = dl.dataset.dataset if dl.dataset.type == "MultiImageMixDataset" else dl.dataset
    dataset.data_root = str(a.root).rstrip("/") + "/"
    # the categories of the file (a custom dataset's ``metainfo``, as mmdetection's docs set it; the
    # config's are COCO's 80 names)
    doc = json.loads((Path(a.root) / "annotations" / "instances_train2017.json").read_text())
    dataset.metainfo = dict(classes=tuple(c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])))
    it = iter(Runner.build_dataloader(dl, seed=a.seed))
    return lambda: next(it), versions(["mmdet", "mmengine", "mmcv", "cv2", "torch", "numpy", "pycocotools"])


# ------------------------------------------------------------------ torchvision's references/detection
class Endless:
    """The reference's batch sampler, epoch after epoch: one DataLoader pass, so the timing never waits
    for its workers to start again (an epoch of COCO is 14,659 batches of 8; of the benchmark set, 64)."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __iter__(self):
        while True:
            yield from self.batch_sampler


def _without_crowd_only_images(dataset):
    """The reference keeps images whose only annotations are crowd regions, then drops those regions
    (``ConvertCocoPolysToMask``), and its ``ScaleJitter`` cannot resize an empty mask tensor (torch's
    interpolate refuses it): such images are left out here (COCO has some; the benchmark set too)."""
    import torch
    coco = dataset.dataset.coco
    keep = [i for i, j in enumerate(dataset.indices)
            if any(not o["iscrowd"] for o in coco.loadAnns(coco.getAnnIds(imgIds=dataset.dataset.ids[j])))]
    return torch.utils.data.Subset(dataset, keep)


def torchvision_reference(pipeline, a):
    import inspect

    import torch
    from torchvision.transforms import InterpolationMode
    ref = Path(a.vision) / "references" / "detection"
    sys.path.insert(0, str(ref))
    import presets  # noqa: E402 - the reference's own modules
    import utils
    from coco_utils import get_coco
    from group_by_aspect_ratio import GroupedBatchSampler, create_aspect_ratio_groups
    from transforms import ScaleJitter, SimpleCopyPaste
    torch.manual_seed(a.seed)
    transform = presets.DetectionPresetTrain(data_augmentation="lsj")
    jitters = [t for t in transform.transforms.transforms if isinstance(t, ScaleJitter)]
    if len(jitters) != 1:
        raise RuntimeError(f"{ref}/presets.py: expected one ScaleJitter in the lsj preset, found {len(jitters)}")
    jitters[0].scale_range = SSJ_RANGE
    kw = {k: v for k, v in dict(use_v2=False, with_masks=True).items()
          if k in inspect.signature(get_coco).parameters}
    dataset = get_coco(str(a.root), image_set="train", transforms=transform, mode="instances", **kw)
    dataset = _without_crowd_only_images(dataset)
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(a.seed))
    batches = GroupedBatchSampler(sampler, create_aspect_ratio_groups(dataset, k=3), a.batch)
    if pipeline == "ssj_scp":
        copypaste = SimpleCopyPaste(blending=True, resize_interpolation=InterpolationMode.BILINEAR)

        def collate(batch):
            return copypaste(*utils.collate_fn(batch))
    else:
        collate = utils.collate_fn
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=Endless(batches), num_workers=a.workers,
                                         collate_fn=collate)
    it = iter(loader)
    return lambda: next(it), versions(["torchvision", "torch", "PIL", "pycocotools", "numpy"])


# ------------------------------------------------------------------ timing
def build(loader: str, a):
    family, _, pipeline = loader.partition(":")
    if family not in FAMILIES or pipeline not in PIPELINES or (pipeline == "decode" and family != "ours"):
        raise SystemExit(f"unknown loader {loader!r}")
    if family == "ours":
        return ours(pipeline, a)
    if family == "ours-dali-resize":
        return ours(pipeline, a, resampler="dali")
    if family == "baseline":
        return baseline(pipeline, a)
    if family == "mmdet":
        return mmdet(pipeline, a)
    return torchvision_reference(pipeline, a)


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from dali_scp import cli  # the standard library only: runs in every environment

    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("loader", help="family:pipeline, e.g. ours:ssj_scp, mmdet:ssj, torchvision:ssj_scp")
    p.add_argument("--root", required=True, help="COCO layout: train2017/ and annotations/instances_train2017.json")
    p.add_argument("--batch", type=cli.COUNT, default=8)
    p.add_argument("--workers", type=cli.COUNT, default=2, help="DataLoader workers = DALI threads")
    p.add_argument("--warmup", type=cli.NON_NEGATIVE, default=5)
    p.add_argument("--batches", type=cli.COUNT, default=20)
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--vision", default=None, help="torchvision source checkout (torchvision loaders)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    next_batch, vers = build(a.loader, a)
    for _ in range(a.warmup):
        next_batch()
    start = time.perf_counter() - t0
    lat = []
    cpu0, w0 = tree_cpu_seconds(), time.perf_counter()
    for _ in range(a.batches):
        t = time.perf_counter()
        next_batch()
        lat.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - w0, tree_cpu_seconds() - cpu0
    print(json.dumps(dict(loader=a.loader, batch=a.batch, workers=a.workers, batches=a.batches, wall_s=wall,
                          cpu_s=cpu, images_per_s=a.batch * a.batches / wall, batch_s=lat, startup_s=start,
                          versions=vers)))
    sys.stdout.flush()
    for pid in children(os.getpid()):  # the workers go now, not at their next check on this process
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    os._exit(0)  # no waiting for DALI's threads to wind down


if __name__ == "__main__":
    sys.exit(main())
