"""Train Mask R-CNN with a DALI input pipeline (scale jittering, optionally Simple Copy-Paste).

    python -m trainer.run --pipeline ssj_scp                      # embedded demo: synthetic data, minutes on a CPU
    python -m trainer.run --preset r50_ssj_scp_270k --coco-root /data/coco --out runs/scp270k
    torchrun --nproc_per_node 8 -m trainer.run --preset r50_ssj_scp_90k --coco-root /data/coco --amp

Without --preset: the ``demo`` recipe on the synthetic dataset when no --coco-root is given, else
``r50_{pipeline}_90k``; with ``--dataset lvis``, ``demo_lvis`` on the synthetic LVIS-like set, else
``r50_lsj_scp_lvis``. The per-process batch defaults to the recipe's total batch / world size; any
other total batch scales the learning rate linearly (logged). Checkpoints are written atomically every
``checkpoint_every`` iterations; --resume continues the latest one exactly (model, optimiser, scheduler,
AMP scaler, RNG and the DALI data stream).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

from dali_scp.files import atomic_write
from dali_scp.presets import PIPELINES, RECIPES, Recipe
from trainer import checkpoint as ckpt
from trainer import distributed as dist_utils
from trainer import hooks
from trainer.config import RunConfig, resolve_recipe  # noqa: F401 - resolve_recipe: part of this CLI's API
from trainer.hooks import NonFiniteLoss
from trainer.metrics_log import MetricsLog
from trainer.model import build_model, shape_mismatches, to_model_inputs
from trainer.train_loop import Trainer

log = logging.getLogger("trainer")


def parse_args(argv=None):
    from dali_scp import cli
    p = cli.ArgumentParser(prog="python -m trainer.run", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", choices=list(PIPELINES), default=None,
                   help="input pipeline (default: the preset's)")
    p.add_argument("--preset", choices=list(RECIPES), default=None, help="training recipe (see dali_scp/presets.py)")
    p.add_argument("--coco-root", default=None, help="COCO root; default: the embedded synthetic demo dataset (python -m dali_scp.synthetic --demo)")
    cli.add_dataset_flag(p)
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>_<pipeline>)")
    p.add_argument("--max-iters", type=cli.COUNT, default=None, help="stop after this many iterations (schedule unchanged)")
    p.add_argument("--batch-size", type=cli.COUNT, default=None, help="images per process (default: total batch / world)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--backbone-weights", default=None, help="local ImageNet checkpoint for the backbone")
    init.add_argument("--init-from", default=None,
                      help="start from this checkpoint's weights (trainer.import_weights output or a run's "
                           "checkpoint); fresh optimiser and schedule; a different class count re-initialises "
                           "the class-specific predictors")
    p.add_argument("--seed", type=cli.SEED, default=0,
                   help="seeds the model's initialisation, the training order (a fresh permutation of the "
                        "dataset every epoch) and every augmentation")
    p.add_argument("--repeat-threshold", type=cli.Number(float, 0), default=None,
                   help="repeat-factor sampling threshold t (LVIS recipes: 0.001; 0 = off; default: the recipe's)")
    p.add_argument("--threads", type=cli.COUNT, default=None, help="DALI CPU threads per process (default: cores / procs)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--checkpoint-every", type=cli.COUNT, default=None, help="override the recipe's checkpoint interval")
    p.add_argument("--eval-every", type=cli.NON_NEGATIVE, default=0, metavar="N",
                   help="evaluate val2017 every N iterations while training: box/mask AP to metrics.jsonl and "
                        "TensorBoard (val/*), the weights with the best mask AP in best.pth (default 0: off)")
    p.add_argument("--record-image-ids", action="store_true",
                   help="write the image ids each rank trained on and a digest of its final weights to "
                        "rank<R>_debug.json (checks sharding and DDP sync)")
    cli.add_debug_flag(p)
    return p.parse_args(argv)


def lr_lambda(r: Recipe):
    """The learning-rate factor of iteration ``it`` as mmengine steps the seed's LinearLR (begin 0, end
    ``warmup_iters``) and MultiStepLR: linear from ``warmup_factor`` at 0 to 1 at ``warmup_iters - 1``
    (mmengine divides by end - begin - 1; mmdetection 2.x's warm-up, and detectron2's, reach 1 one
    iteration later), times ``gamma`` per milestone passed."""
    def f(it: int) -> float:
        warm = 1.0 if r.warmup_iters <= 1 else \
            r.warmup_factor + (1 - r.warmup_factor) * min(it / (r.warmup_iters - 1), 1.0)
        return warm * r.gamma ** sum(it >= s for s in r.steps)
    return f


def build_optimizer(model, r: Recipe, lr: float):
    """SGD over every trainable parameter (weight decay on all of them, BN and biases included) and the
    per-iteration schedule, as mmengine builds them from the seed configs (tests/test_schedule.py): ``lr``
    is the recipe's scaled to the run's total batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=r.momentum, weight_decay=r.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(r))


def compute_losses(model, images, targets, amp: bool, device: str) -> dict:
    with torch.autocast(device_type=device, enabled=amp):
        return model(images, targets)


def setup_logging(run_dir: Path, main: bool) -> None:
    level = logging.INFO if main else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def start_run_dir(cfg: RunConfig, d: dist_utils.Dist) -> None:
    """The run directory, its log, and config.json; a new run never mixes with an old one's checkpoints."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.run_dir, d.is_main)
    if not cfg.resume and ckpt.latest(cfg.run_dir) is not None:
        raise SystemExit(f"error: {cfg.run_dir} already holds checkpoints; pass --resume to continue that run "
                         "or --out to start a new one")
    if cfg.resume and ckpt.latest(cfg.run_dir) is None:
        raise SystemExit(f"error: --resume: no checkpoint in {cfg.run_dir}")
    if not d.is_main:
        return
    config, r = cfg.as_json(), cfg.recipe
    print(json.dumps(config, indent=1))
    if not cfg.resume:
        atomic_write(cfg.run_dir / "config.json", json.dumps(config, indent=1))
    if cfg.total_batch != r.total_batch:
        log.info("total batch %d differs from the recipe's %d: learning rate scaled linearly %.4g x %d/%d = %.4g",
                 cfg.total_batch, r.total_batch, r.lr, cfg.total_batch, r.total_batch, cfg.lr)
    if r.norm == "SyncBN" and not cfg.sync_bn:
        log.info("SyncBN needs several CUDA processes; using plain BatchNorm here")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def resume(cfg: RunConfig, d: dist_utils.Dist, model, opt, sched, scaler) -> tuple[int, str]:
    """Load the latest checkpoint into the model, optimiser, scheduler, scaler and this rank's RNG;
    returns (iteration, this rank's DALI data-stream state)."""
    path = ckpt.latest(cfg.run_dir)
    state = ckpt.load(path)
    model.load_state_dict(state["model"])
    ckpt.check_optimizer_state(state["optimizer"], [p for g in opt.param_groups for p in g["params"]], path)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    mine = state["ranks"][d.rank] if d.rank < len(state["ranks"]) else None
    if mine is None or len(state["ranks"]) != d.world_size:
        raise SystemExit(f"error: {path} was written by {len(state['ranks'])} processes, this run has {d.world_size}")
    ckpt.set_rng_state(mine["rng"])
    log.info("resumed from %s at iteration %d", path, state["iteration"])
    return state["iteration"], mine["data"]


CLASS_SPECIFIC = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


def init_from(model, path: str, r: Recipe) -> None:
    """Weights only (``--init-from``): the run's optimiser, schedule and data stream start fresh. Fine-tuning
    on a dataset with another class count keeps everything but the class-specific predictors."""
    from dataclasses import asdict
    from dali_scp.presets import MODEL_FIELDS
    state = ckpt.load(Path(path))
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ckpt.CheckpointError(f"--init-from {path}: not a dali-scp checkpoint (run trainer.import_weights "
                                   "on released mmdetection / torchvision weights first)")
    theirs, mine = state["model"], model.state_dict()
    wrong = shape_mismatches(mine, theirs)
    skipped = [k for k in wrong if k.startswith(CLASS_SPECIFIC) and torch.is_tensor(theirs.get(k))]
    wrong = [k for k in wrong if k not in skipped]
    if wrong:
        k = wrong[0]
        got = tuple(theirs[k].shape) if torch.is_tensor(theirs.get(k)) else "nothing"
        raise ckpt.CheckpointError(f"--init-from {path}: does not fit recipe {r.name}'s model ({len(wrong)} tensors, "
                                   f"e.g. {k}: checkpoint has {got}, model needs {tuple(mine[k].shape)})")
    model.load_state_dict({k: (mine[k] if k in skipped else theirs[k]) for k in mine})
    was = state.get("recipe") or {}
    differ = [f for f in MODEL_FIELDS if was.get(f, "torchvision") != asdict(r)[f]]
    log.info("initialised from %s (weights only; %d class-specific tensors re-initialised for %d classes)%s",
             path, len(skipped), model.roi_heads.box_predictor.cls_score.out_features - 1,
             f"; the checkpoint's model computed {', '.join(differ)} differently from this recipe" if differ else "")


def on_device(batches, device: str):
    """The loader's batches on the model's device (a no-op when the pipeline already ran there)."""
    for images, targets in batches:
        if device == "cuda" and not images.is_cuda:
            images = images.to(device, non_blocking=True)
            targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
        yield images, targets


def train(a) -> dict:
    """One run of the command line ``a`` (``parse_args``); returns its summary (run_dir, iteration,
    last loss, and after an evaluation its metrics and picture)."""
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = dist_utils.init(device)
    cfg = RunConfig.from_args(a, d.world_size, device)
    start_run_dir(cfg, d)
    r = cfg.recipe

    seed_everything(cfg.seed + d.rank)
    model = build_model(r, cfg.split.num_classes, cfg.backbone_weights)
    if cfg.init_from and not cfg.resume:
        init_from(model, cfg.init_from, r)
    model = model.to(device)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt, sched = build_optimizer(model, r, cfg.lr)
    scaler = torch.amp.GradScaler(device, enabled=cfg.amp_enabled)
    start, data_state = resume(cfg, d, model, opt, sched, scaler) if cfg.resume else (0, None)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if device == "cuda" else None) \
        if d.enabled else model

    from pipelines.iterator import CocoLoader
    loader = CocoLoader(r.pipeline, cfg.split, batch_size=cfg.batch_per_process, device=cfg.pipeline_device,
                        num_threads=cfg.threads, shard_id=d.rank, num_shards=d.world_size, seed=cfg.seed,
                        out_size=r.image_size, device_id=d.local_rank, infinite=True, checkpoint=data_state,
                        repeat_threshold=cfg.repeat_threshold)

    def losses_of(images, targets):
        imgs, tg = to_model_inputs(images, targets)
        return compute_losses(ddp, imgs, tg, cfg.amp_enabled, device)

    mlog = MetricsLog(cfg.run_dir, d.is_main)
    trainer = Trainer(on_device(iter(loader), device), losses_of, opt, sched, scaler,
                      sync=torch.cuda.synchronize if device == "cuda" else None)
    metrics = hooks.LogMetrics(cfg, mlog, d.is_main)
    best = hooks.BestCheckpoint(cfg, model, d.is_main) if cfg.eval_every else None
    evaluation = hooks.FinalEvaluation(cfg, d, model, mlog, best) if cfg.evaluate else None
    trainer.register_hooks([metrics, hooks.StopOnNonFiniteLoss(cfg, d), hooks.Checkpointer(cfg, d, model, loader)]
                           + ([hooks.RecordImageIds(cfg, d.rank, model)] if cfg.record_image_ids else [])
                           + ([hooks.PeriodicEvaluation(cfg, d, model, mlog, best)] if cfg.eval_every else [])
                           + ([evaluation] if evaluation else []))
    model.train()
    trainer.train(start, cfg.max_iters)

    summary = dict(run_dir=str(cfg.run_dir), iteration=trainer.iter, loss=metrics.last_loss)
    if evaluation:
        if d.is_main:
            summary["picture"] = evaluation.picture
        summary["metrics"] = evaluation.metrics
    mlog.close()
    dist_utils.cleanup(d)
    return summary


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    a = parse_args(argv)
    try:
        train(a)
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
