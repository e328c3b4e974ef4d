"""The periodic work of a training run, one small object each, called by ``trainer.train_loop.Trainer``:
metrics and the progress bar, the non-finite-loss guard, checkpoints, ``--record-image-ids`` debug
records, ``--eval-every`` evaluations with ``best.pth``, and the final evaluation with its picture.
``trainer.run`` registers them in that order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math

import torch
from tqdm import tqdm

from dali_scp import dataset as ds
from trainer import checkpoint as ckpt
from trainer import distributed as dist_utils
from trainer.config import RunConfig
from trainer.metrics_log import MetricsLog
from trainer.train_loop import HookBase

log = logging.getLogger("trainer")


class NonFiniteLoss(RuntimeError):
    pass


class LogMetrics(HookBase):
    """Progress bar every step; every ``log_every`` iterations (and the last) the mean data and step
    time of the window, the loss terms and throughput, to the log and ``metrics.jsonl``/TensorBoard."""

    def __init__(self, cfg: RunConfig, mlog: MetricsLog, is_main: bool):
        self.cfg, self.mlog, self.is_main = cfg, mlog, is_main
        self.last_loss = float("nan")
        self.bar = None
        self.t_data = self.t_step = 0.0
        self.n_window = 0

    def before_train(self):
        r = self.cfg.recipe
        self.bar = tqdm(total=self.cfg.max_iters, initial=self.trainer.start_iter, desc=f"train {r.name}/{r.pipeline}",
                        unit="it", disable=not self.is_main, dynamic_ncols=True)

    def after_step(self):
        t, it, max_iters = self.trainer, self.trainer.iter, self.cfg.max_iters
        self.t_data += t.data_time
        self.t_step += t.step_time
        self.n_window += 1
        self.last_loss = float(t.loss.detach())
        lr = t.scheduler.get_last_lr()[0]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lr:.3g}")
        if it % self.cfg.recipe.log_every and it != max_iters:
            return
        dt, st = self.t_data / self.n_window, self.t_step / self.n_window
        m = {k: float(v.detach()) for k, v in t.losses.items()}
        m.update(loss=self.last_loss, lr=lr, data_time=dt, step_time=st,
                 images_per_s=self.cfg.total_batch / max(dt + st, 1e-9), data_share=dt / max(dt + st, 1e-9))
        if self.cfg.device == "cuda":
            m["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.mlog.write(it, m)
        if self.is_main:
            self.bar.write(f"iter {it}/{max_iters}  loss {self.last_loss:.4f} ("
                           + " ".join(f"{k.removeprefix('loss_')} {float(v):.3f}" for k, v in m.items()
                                      if k.startswith("loss_"))
                           + f")  lr {m['lr']:.4g}  data {dt * 1e3:.0f} ms  step {st * 1e3:.0f} ms  "
                           f"{m['images_per_s']:.1f} img/s")
        self.t_data = self.t_step = 0.0
        self.n_window = 0

    def after_train(self):
        if self.bar is not None:
            self.bar.close()


class StopOnNonFiniteLoss(HookBase):
    """Before a non-finite loss reaches the weights, every rank stops (together: the check is a
    collective), naming the iteration, the loss terms and the last good checkpoint."""

    def __init__(self, cfg: RunConfig, d: dist_utils.Dist):
        self.cfg, self.d = cfg, d

    def after_forward(self):
        t = self.trainer
        if dist_utils.all_finite(self.d, t.loss.detach()):
            return
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in t.losses.items())
        good = ckpt.latest(self.cfg.run_dir)
        raise NonFiniteLoss(f"non-finite loss at iteration {t.iter + 1} ({terms}); stopping. The last good "
                            f"checkpoint is {good or 'none (no checkpoint written yet)'}. Lower the learning "
                            "rate or check the data; --resume continues from that checkpoint.")


class Checkpointer(HookBase):
    """Every ``checkpoint_every`` iterations and at the last: everything a resume needs to continue
    bit for bit, with each rank's RNG and DALI data-stream state (gathered to rank 0, which writes)."""

    def __init__(self, cfg: RunConfig, d: dist_utils.Dist, model, loader):
        self.cfg, self.d, self.model, self.loader = cfg, d, model, loader

    def after_step(self):
        it = self.trainer.iter
        if it % self.cfg.recipe.checkpoint_every == 0 or it == self.cfg.max_iters:
            self.save(it)

    def save(self, it: int) -> None:
        t, cfg, d = self.trainer, self.cfg, self.d
        ranks = dist_utils.gather_objects(d, dict(rng=ckpt.rng_state(), data=self.loader.state()))
        if d.is_main:
            ckpt.save(cfg.run_dir, it, dict(
                model=self.model.state_dict(), optimizer=t.optimizer.state_dict(),
                scheduler=t.scheduler.state_dict(), scaler=t.scaler.state_dict(), iteration=it, ranks=ranks,
                recipe=cfg.recipe.as_dict(), num_classes=cfg.split.num_classes, cat_ids=cfg.split.cat_ids,
                class_names=list(cfg.split.cat_names), config=cfg.as_json()), cfg.recipe.keep_checkpoints)
        dist_utils.barrier(d)


class RecordImageIds(HookBase):
    """``--record-image-ids``: the image ids this rank trained on and a digest of its final weights, in
    ``rank<R>_debug.json`` (the tests check sharding and DDP sync with them)."""

    def __init__(self, cfg: RunConfig, rank: int, model):
        self.cfg, self.rank, self.model = cfg, rank, model
        self.image_ids: list = []

    def after_step(self):
        self.image_ids += [t["image_id"] for t in self.trainer.targets]

    def after_train(self):
        if not self.trainer.finished:
            return
        digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in self.model.parameters())).hexdigest()
        (self.cfg.run_dir / f"rank{self.rank}_debug.json").write_text(
            json.dumps(dict(image_ids=self.image_ids, weights_sha1=digest)))


class BestCheckpoint:
    """``best.pth``: the weights of the evaluation with the highest mask AP so far, in the form
    ``trainer.evaluate --checkpoint`` reads (model, recipe, classes) plus the iteration and metrics.
    A resumed run starts from the AP its ``best.pth`` records; a new run ignores an old file."""

    def __init__(self, cfg: RunConfig, model, is_main: bool = True):
        self.cfg, self.model = cfg, model
        self.ap = -math.inf
        path = cfg.run_dir / ckpt.BEST
        if cfg.resume and is_main and path.is_file():
            self.ap = float(ckpt.load(path).get("metrics", {}).get("segm", {}).get("AP", -math.inf))

    def update(self, it: int, metrics: dict) -> None:
        """Rank 0, after an evaluation: write best.pth if mask AP beats the best so far."""
        ap = metrics.get("segm", {}).get("AP", -math.inf)
        if not ap > self.ap:
            return
        self.ap = ap
        cfg = self.cfg
        path = ckpt.save_best(cfg.run_dir, dict(
            model=self.model.state_dict(), recipe=cfg.recipe.as_dict(), num_classes=cfg.split.num_classes,
            cat_ids=cfg.split.cat_ids, class_names=list(cfg.split.cat_names), iteration=it, metrics=metrics,
            config=cfg.as_json()))
        log.info("%s: mask AP %.1f at iteration %d, the best so far", path, 100 * ap, it)


def evaluate_val(cfg: RunConfig, d: dist_utils.Dist, model, mlog: MetricsLog, it: int, best: BestCheckpoint | None,
                 out_dir=None) -> tuple[dict | None, ds.CocoSplit]:
    """Box and mask AP on val2017 (every rank predicts its shard; rank 0 gets the metrics, logs them
    with the prefix ``val`` and updates best.pth). Returns (metrics or None off rank 0, the split)."""
    from trainer.evaluate import evaluate_model
    val = ds.resolve(cfg.coco_root, "val2017", cfg.dataset, demo=True)
    metrics, _ = evaluate_model(model, val, cfg.recipe.eval_resize, cfg.device, max(cfg.batch_per_process, 1), d,
                                out_dir, progress=d.is_main)
    if d.is_main:
        mlog.write(it, {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()}, prefix="val")
        if best is not None:
            best.update(it, metrics)
    return metrics, val


class PeriodicEvaluation(HookBase):
    """``--eval-every N``: box and mask AP on val2017 after every N-th iteration (the last one is the
    final evaluation's, unless --no-eval), logged and kept in best.pth by mask AP. Training then goes
    on as if nothing happened: the model back in train mode and every RNG state put back (evaluation
    runs its own DALI pipeline and draws no training randomness, but a resume must not depend on it)."""

    def __init__(self, cfg: RunConfig, d: dist_utils.Dist, model, mlog: MetricsLog, best: BestCheckpoint):
        self.cfg, self.d, self.model, self.mlog, self.best = cfg, d, model, mlog, best
        self.metrics = None

    def after_step(self):
        it, cfg = self.trainer.iter, self.cfg
        if it % cfg.eval_every or (it == cfg.max_iters and cfg.evaluate):
            return
        rng = ckpt.rng_state()
        self.metrics, _ = evaluate_val(cfg, self.d, self.model, self.mlog, it, self.best)
        self.model.train()
        ckpt.set_rng_state(rng)
        if self.d.is_main:
            from trainer.evaluate import format_table
            log.info("evaluation on val2017 after %d iterations:\n%s", it, format_table(self.metrics))


class FinalEvaluation(HookBase):
    """COCO box and mask AP on val2017 after the last iteration (every rank scores its shard), the
    table printed and logged, best.pth updated (with --eval-every), and the ground truth | predictions
    picture."""

    def __init__(self, cfg: RunConfig, d: dist_utils.Dist, model, mlog: MetricsLog, best: BestCheckpoint | None = None):
        self.cfg, self.d, self.model, self.mlog, self.best = cfg, d, model, mlog, best
        self.metrics = self.picture = None

    def after_train(self):
        if not self.trainer.finished:
            return
        from trainer.evaluate import scoring
        cfg, it = self.cfg, self.trainer.iter
        self.metrics, val = evaluate_val(cfg, self.d, self.model, self.mlog, it, self.best,
                                         cfg.run_dir / "eval_val2017")
        if self.d.is_main:
            print(f"\n{cfg.dataset.upper()} evaluation on {val.root.name}/val2017 after {it} iterations:")
            print(scoring(cfg.dataset).format_table(self.metrics))
            from trainer.showcase import after_evaluation
            self.picture = after_evaluation(val, cfg.run_dir)
