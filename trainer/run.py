"""Train Mask R-CNN with a DALI input pipeline (scale jittering, optionally Simple Copy-Paste).

    python -m trainer.run --pipeline ssj_scp                      # embedded demo: synthetic data, minutes on a CPU
    python -m trainer.run --preset r50_ssj_scp_270k --coco-root /data/coco --out runs/scp270k
    torchrun --nproc_per_node 8 -m trainer.run --preset r50_ssj_scp_90k --coco-root /data/coco --amp

Without --preset: the ``demo`` recipe on the synthetic dataset when no --coco-root is given, else
``r50_{pipeline}_90k``. The per-process batch defaults to the recipe's total batch / world size; any
other total batch scales the learning rate linearly (logged). Checkpoints are written atomically every
``checkpoint_every`` iterations; --resume continues the latest one exactly (model, optimiser, scheduler,
AMP scaler, RNG and the DALI data stream).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dali_scp import dataset as ds
from dali_scp.presets import PIPELINES, RECIPES, Recipe, recipe as get_recipe
from trainer import checkpoint as ckpt
from trainer import distributed as dist_utils
from trainer.metrics_log import MetricsLog
from trainer.model import build_model, to_model_inputs

log = logging.getLogger("trainer")


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", choices=list(PIPELINES), default=None,
                   help="input pipeline (default: the preset's)")
    p.add_argument("--preset", choices=list(RECIPES), default=None, help="training recipe (see dali_scp/presets.py)")
    p.add_argument("--coco-root", default=None, help="COCO root; default: the embedded synthetic dataset")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>_<pipeline>)")
    p.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (schedule unchanged)")
    p.add_argument("--batch-size", type=int, default=None, help="images per process (default: total batch / world)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--backbone-weights", default=None, help="local ImageNet checkpoint for the backbone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads per process (default: cores / procs)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--checkpoint-every", type=int, default=None, help="override the recipe's checkpoint interval")
    p.add_argument("--record-image-ids", action="store_true",
                   help="write the image ids each rank trained on and a digest of its final weights to "
                        "rank<R>_debug.json (checks sharding and DDP sync)")
    from dali_scp import cli
    cli.add_debug_flag(p)
    return p.parse_args(argv)


def resolve_recipe(a) -> Recipe:
    if a.preset:
        r = get_recipe(a.preset)
    elif a.coco_root is None:
        r = get_recipe("demo")
    else:
        r = get_recipe(f"r50_{a.pipeline or 'ssj_scp'}_90k")
    if a.pipeline and a.pipeline != r.pipeline:
        if a.preset:
            log.warning("--pipeline %s replaces the preset's pipeline %s", a.pipeline, r.pipeline)
        r = replace(r, pipeline=a.pipeline)
    return r


def lr_lambda(r: Recipe):
    def f(it: int) -> float:
        warm = r.warmup_factor + (1 - r.warmup_factor) * it / r.warmup_iters if it < r.warmup_iters else 1.0
        return warm * r.gamma ** sum(it >= s for s in r.steps)
    return f


def compute_losses(model, images, targets, amp: bool, device: str) -> dict:
    with torch.autocast(device_type=device, enabled=amp):
        return model(images, targets)


def rng_state() -> dict:
    s = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def setup_logging(run_dir: Path, main: bool) -> None:
    level = logging.INFO if main else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def train(a) -> dict:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = dist_utils.init(device)
    r = resolve_recipe(a)
    split = ds.resolve(a.coco_root, "train2017")  # before creating anything: a wrong path fails first
    run_dir = Path(a.out or f"runs/{r.name}_{r.pipeline}")
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, d.is_main)
    if not a.resume and ckpt.latest(run_dir) is not None:
        raise SystemExit(f"error: {run_dir} already holds checkpoints; pass --resume to continue that run "
                         "or --out to start a new one")
    if a.resume and ckpt.latest(run_dir) is None:
        raise SystemExit(f"error: --resume: no checkpoint in {run_dir}")
    max_iters = a.max_iters or r.max_iters
    if a.checkpoint_every:
        r = replace(r, checkpoint_every=a.checkpoint_every)
    per_proc = a.batch_size or max(r.total_batch // d.world_size, 1)
    total = per_proc * d.world_size
    lr = r.lr * total / r.total_batch
    config = dict(recipe=r.as_dict(), resolved=dict(
        pipeline=r.pipeline, device=device, world_size=d.world_size, batch_per_process=per_proc, total_batch=total,
        lr=lr, max_iters=max_iters, amp=a.amp, seed=a.seed, dataset=str(split.root), synthetic=split.synthetic,
        num_classes=split.num_classes, sync_bn=r.norm == "SyncBN" and d.enabled and device == "cuda"))
    if d.is_main:
        print(json.dumps(config, indent=1))
        if not a.resume:
            from dali_scp.files import atomic_write
            atomic_write(run_dir / "config.json", json.dumps(config, indent=1))
        if total != r.total_batch:
            log.info("total batch %d differs from the recipe's %d: learning rate scaled linearly %.4g x %d/%d = %.4g",
                     total, r.total_batch, r.lr, total, r.total_batch, lr)
        if r.norm == "SyncBN" and not config["resolved"]["sync_bn"]:
            log.info("SyncBN needs several CUDA processes; using plain BatchNorm here")

    torch.manual_seed(a.seed + d.rank)
    np.random.seed(a.seed + d.rank)
    random.seed(a.seed + d.rank)
    model = build_model(r, split.num_classes, a.backbone_weights).to(device)
    if config["resolved"]["sync_bn"]:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=r.momentum, weight_decay=r.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(r))
    scaler = torch.amp.GradScaler(device, enabled=a.amp and device == "cuda")
    start, data_state = 0, None
    if a.resume:
        path = ckpt.latest(run_dir)
        state = ckpt.load(path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = state["iteration"]
        mine = state["ranks"][d.rank] if d.rank < len(state["ranks"]) else None
        if mine is None or len(state["ranks"]) != d.world_size:
            raise SystemExit(f"error: {path} was written by {len(state['ranks'])} processes, this run has {d.world_size}")
        set_rng_state(mine["rng"])
        data_state = mine["data"]
        log.info("resumed from %s at iteration %d", path, start)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if device == "cuda" else None) \
        if d.enabled else model

    from pipelines.iterator import CocoLoader
    threads = a.threads or max((os.cpu_count() or 2) // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1), 1)
    loader = CocoLoader(r.pipeline, split, batch_size=per_proc, device="gpu" if device == "cuda" else "cpu",
                        num_threads=threads, shard_id=d.rank, num_shards=d.world_size, seed=a.seed,
                        out_size=r.image_size, device_id=d.local_rank, infinite=True, checkpoint=data_state,
                        start_batch=start)
    stream = iter(loader)
    mlog = MetricsLog(run_dir, d.is_main)
    seen_ids: list = []
    last_loss = float("nan")

    def save(it):
        ranks = dist_utils.gather_objects(d, dict(rng=rng_state(), data=loader.state()))
        if d.is_main:
            ckpt.save(run_dir, it, dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                        scheduler=sched.state_dict(), scaler=scaler.state_dict(), iteration=it,
                                        ranks=ranks, recipe=r.as_dict(), num_classes=split.num_classes,
                                        cat_ids=split.cat_ids, config=config), r.keep_checkpoints)
        dist_utils.barrier(d)

    model.train()
    bar = tqdm(total=max_iters, initial=start, desc=f"train {r.name}/{r.pipeline}", unit="it", disable=not d.is_main,
               dynamic_ncols=True)
    t_data = t_step = 0.0
    n_window = 0
    it = start
    while it < max_iters:
        t0 = time.perf_counter()
        images, targets = next(stream)
        if device == "cuda" and not images.is_cuda:
            images = images.to(device, non_blocking=True)
            targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
        if a.record_image_ids:
            seen_ids += [t["image_id"] for t in targets]
        t1 = time.perf_counter()
        imgs, tg = to_model_inputs(images, targets)
        losses = compute_losses(ddp, imgs, tg, a.amp and device == "cuda", device)
        loss = sum(losses.values())
        if not dist_utils.all_finite(d, loss.detach()):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            good = ckpt.latest(run_dir)
            bar.close()
            raise NonFiniteLoss(f"non-finite loss at iteration {it + 1} ({terms}); stopping. The last good "
                                f"checkpoint is {good or 'none (no checkpoint written yet)'}. Lower the learning "
                                "rate or check the data; --resume continues from that checkpoint.")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        it += 1
        t_data += t1 - t0
        t_step += t2 - t1
        n_window += 1
        last_loss = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{sched.get_last_lr()[0]:.3g}")
        if it % r.log_every == 0 or it == max_iters:
            dt, st = t_data / n_window, t_step / n_window
            m = {k: float(v.detach()) for k, v in losses.items()}
            m.update(loss=last_loss, lr=sched.get_last_lr()[0], data_time=dt, step_time=st,
                     images_per_s=total / max(dt + st, 1e-9), data_share=dt / max(dt + st, 1e-9))
            if device == "cuda":
                m["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            mlog.write(it, m)
            if d.is_main:
                bar.write(f"iter {it}/{max_iters}  loss {last_loss:.4f} ("
                          + " ".join(f"{k.removeprefix('loss_')} {float(v):.3f}" for k, v in m.items() if k.startswith("loss_"))
                          + f")  lr {m['lr']:.4g}  data {dt * 1e3:.0f} ms  step {st * 1e3:.0f} ms  "
                          f"{m['images_per_s']:.1f} img/s")
            t_data = t_step = 0.0
            n_window = 0
        if it % r.checkpoint_every == 0 or it == max_iters:
            save(it)
    bar.close()
    if a.record_image_ids:
        digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        (run_dir / f"rank{d.rank}_debug.json").write_text(json.dumps(dict(image_ids=seen_ids, weights_sha1=digest)))
    summary = dict(run_dir=str(run_dir), iteration=it, loss=last_loss)
    if not a.no_eval:
        from trainer.evaluate import evaluate_model, format_table
        val = ds.resolve(a.coco_root, "val2017")
        metrics, _ = evaluate_model(model, val, r.eval_resize, device, max(per_proc, 1), d, run_dir / "eval_val2017")
        if d.is_main:
            print(f"\nCOCO evaluation on {val.root.name}/val2017 after {it} iterations:")
            print(format_table(metrics))
            mlog.write(it, {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()}, prefix="val")
            from trainer.showcase import after_evaluation
            summary["picture"] = after_evaluation(val, run_dir)
        summary["metrics"] = metrics
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
