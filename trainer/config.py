"""A training run's configuration, decided once from the command line and the recipe.

Why one object: every number a run uses (batch per process, scaled learning rate, iterations, device,
whether SyncBN applies) follows from the CLI, the recipe and the world size by a few rules. Deciding
them in one place, before anything is built, means the rest of the trainer reads ``cfg.lr`` instead
of re-deriving it from argparse flags, and ``config.json`` records exactly what the run used.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from dali_scp import dataset as ds
from dali_scp.presets import Recipe, recipe as get_recipe
from pipelines.devices import pipeline_device

log = logging.getLogger("trainer")


def resolve_recipe(a) -> Recipe:
    """``--preset``; else ``demo`` without a dataset, the 90k recipe of ``--pipeline`` with one; for
    ``--dataset lvis``: ``demo_lvis`` without one, ``r50_lsj_scp_lvis`` (``r50_lsj_lvis`` for ``--pipeline
    lsj``) with one."""
    lvis = getattr(a, "dataset", "coco") == "lvis"
    if a.preset:
        r = get_recipe(a.preset)
    elif a.coco_root is None:
        r = get_recipe("demo_lvis" if lvis else "demo")
    elif lvis:
        r = get_recipe("r50_lsj_lvis" if a.pipeline == "lsj" else "r50_lsj_scp_lvis")
    else:
        r = get_recipe(f"r50_{a.pipeline or 'ssj_scp'}_90k")
    if a.pipeline and a.pipeline != r.pipeline:
        if a.preset:
            log.warning("--pipeline %s replaces the preset's pipeline %s", a.pipeline, r.pipeline)
        r = replace(r, pipeline=a.pipeline)
    return r


def default_threads() -> int:
    """DALI CPU threads per process: the machine's cores shared by the processes on this node."""
    return max((os.cpu_count() or 2) // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1), 1)


@dataclass(frozen=True)
class RunConfig:
    recipe: Recipe                 # with --pipeline and --checkpoint-every applied
    split: ds.CocoSplit            # the training split
    coco_root: str | None          # None: the embedded synthetic dataset
    dataset: str                   # its layout and evaluation: "coco" or "lvis"
    run_dir: Path
    device: str                    # "cpu" or "cuda"
    world_size: int
    batch_per_process: int
    lr: float                      # the recipe's, scaled linearly to total_batch
    max_iters: int
    amp: bool                      # as asked; amp_enabled says whether it applies
    seed: int
    sync_bn: bool
    resume: bool = False
    threads: int = 1
    backbone_weights: str | None = None
    init_from: str | None = None   # --init-from: weights only, ignored when resuming
    evaluate: bool = True
    record_image_ids: bool = False
    repeat_threshold: float = 0.0  # the recipe's unless --repeat-threshold
    eval_every: int = 0            # --eval-every: val AP every N iterations, best.pth; 0 = off

    @classmethod
    def from_args(cls, a, world_size: int, device: str) -> RunConfig:
        """Resolve the command line (``trainer.run.parse_args``) for ``world_size`` processes on
        ``device``. Resolves the dataset first: a wrong path fails before anything is created."""
        r = resolve_recipe(a)
        dataset = getattr(a, "dataset", "coco")
        split = ds.resolve(a.coco_root, "train2017", dataset, demo=True)
        if a.checkpoint_every:
            r = replace(r, checkpoint_every=a.checkpoint_every)
        if (a.eval_every or 0) < 0:
            raise ValueError(f"--eval-every {a.eval_every}: give a number of iterations (0: off)")
        per_proc = a.batch_size or max(r.total_batch // world_size, 1)
        total = per_proc * world_size
        return cls(recipe=r, split=split, coco_root=a.coco_root, dataset=dataset, run_dir=Path(a.out or f"runs/{r.name}_{r.pipeline}"),
                   device=device, world_size=world_size, batch_per_process=per_proc,
                   lr=r.lr * total / r.total_batch, max_iters=a.max_iters or r.max_iters, amp=a.amp, seed=a.seed,
                   sync_bn=r.norm == "SyncBN" and world_size > 1 and device == "cuda", resume=a.resume,
                   threads=a.threads or default_threads(), backbone_weights=a.backbone_weights,
                   init_from=getattr(a, "init_from", None),
                   evaluate=not a.no_eval, record_image_ids=a.record_image_ids, eval_every=a.eval_every or 0,
                   repeat_threshold=r.repeat_threshold if a.repeat_threshold is None else a.repeat_threshold)

    @property
    def total_batch(self) -> int:
        return self.batch_per_process * self.world_size

    @property
    def amp_enabled(self) -> bool:
        return self.amp and self.device == "cuda"

    @property
    def pipeline_device(self) -> str:
        return pipeline_device(self.device)

    def as_json(self) -> dict:
        """What ``config.json`` (and every checkpoint) records: the recipe and the resolved values."""
        r, split = self.recipe, self.split
        return dict(recipe=r.as_dict(), resolved=dict(
            pipeline=r.pipeline, device=self.device, world_size=self.world_size,
            batch_per_process=self.batch_per_process, total_batch=self.total_batch, lr=self.lr,
            max_iters=self.max_iters, amp=self.amp, seed=self.seed, dataset=str(split.root), dataset_kind=self.dataset,
            synthetic=split.synthetic, num_classes=split.num_classes, sync_bn=self.sync_bn,
            repeat_threshold=self.repeat_threshold, init_from=self.init_from, eval_every=self.eval_every))
