"""What the GPU stages cost per batch - kernels launched, blocking host syncs, device memory - measured
without a GPU through the CuPy stand-in (``dali_scp.cupy_standin``), or on a GPU with ``--device gpu``.

Why: the GPU stages run inside DALI's ``python_function``, holding the GIL in the training process;
every host sync stalls that thread and every extra kernel or byte competes with the model. These counts
follow from the code path alone, so CI holds them to a budget (``tests/test_gpu_budget.py``).

    python -m pipelines.gpu_budget --batch-size 8 --instances 30 [--size 1024] [--json FILE] [--device gpu]
    python -m pipelines.gpu_budget --device gpu --batch-size 32 --instances 90 --under-training r50_ssj_scp_90k

``--under-training RECIPE`` also times the stages while that recipe's model trains in the same process
(a thread, as DALI's stages share the trainer's process and GIL), and the training step with and
without the stages beside it.

The batch is COCO-like: up to N instances per image (one image has exactly N), object areas from tiny
to large, 10-60-vertex polygons, a fifth of the objects in 2-3 parts, some cut by the canvas edge.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from dali_scp.cupy_standin import StandIn
from dali_scp.presets import CopyPaste
from dali_scp.synthetic import star_polygon
from pipelines.stages import CopyPasteStage, RasterizeStage, raise_if_failed

STAGES = ("masks", "copy_paste")


@dataclass
class HostBatch:
    """One batch as DALI hands it to the mask stage, on the host."""
    polygons: list  # [P_i, 3] int32: instance, first vertex, end vertex
    vertices: list  # [V_i, 2] float32, output pixels
    cat_ids: list   # [n_i] int32 dataset category ids
    images: list    # [S, S, 3] uint8


def coco_like_batch(batch_size: int, instances: int, size: int = 1024, seed: int = 0) -> HostBatch:
    rng = np.random.default_rng(seed)
    polys, verts, cat_ids, images = [], [], [], []
    for b in range(batch_size):
        n = instances if b == 0 else int(rng.integers((instances + 1) // 2, instances + 1))
        p, v, off = [], [], 0
        for i in range(n):
            r = float(np.exp(rng.uniform(np.log(3), np.log(size * 0.3))))
            cx, cy = rng.uniform(-0.05, 1.05, 2) * size
            for _ in range(int(rng.choice([1, 2, 3], p=[0.8, 0.15, 0.05]))):
                q = star_polygon(rng, cx + rng.uniform(-r, r), cy + rng.uniform(-r, r), r, int(rng.integers(10, 61)))
                p.append([i, off, off + len(q)])
                v.append(q)
                off += len(q)
        polys.append(np.array(p, np.int32).reshape(-1, 3))
        verts.append(np.concatenate(v).astype(np.float32) if v else np.zeros((0, 2), np.float32))
        cat_ids.append(rng.integers(1, 91, n).astype(np.int32))
        images.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return HostBatch(polys, verts, cat_ids, images)


def _device(batch: HostBatch, xp):
    up = lambda xs: [xp.asarray(x) for x in xs]  # noqa: E731
    return up(batch.polygons), up(batch.vertices), up(batch.cat_ids), up(batch.images)


def measure_standin(batch: HostBatch, size: int, cp_cfg: CopyPaste | None = None, seed: int = 0) -> dict:
    """Run both GPU stages through the stand-in; counts per stage, inputs from 'DALI' excluded."""
    xp = StandIn()
    polygons, vertices, cat_ids, images = _device(batch, xp)
    out = {}
    xp.meter.reset()
    masks, boxes, kept_ids = RasterizeStage(size, size)(polygons, vertices, cat_ids)
    raise_if_failed()
    out["masks"] = xp.meter.summary()
    xp.meter.reset()  # the mask stage's outputs are the next stage's inputs (DALI's buffers)
    result = CopyPasteStage(cp_cfg or CopyPaste(), seed=seed)(images, masks, boxes, kept_ids)
    raise_if_failed()
    out["copy_paste"] = xp.meter.summary()
    del result
    return out


def measure_gpu(batch: HostBatch, size: int, cp_cfg: CopyPaste | None = None, seed: int = 0, repeats: int = 10) -> dict:
    """The same on CuPy: the memory pool's peak (pool emptied first) and milliseconds per stage."""
    import cupy as cp
    pool = cp.get_default_memory_pool()
    polygons, vertices, cat_ids, images = _device(batch, cp)
    ras, cps = RasterizeStage(size, size), CopyPasteStage(cp_cfg or CopyPaste(), seed=seed)
    res = {}

    def timed(stage):
        def fn():
            out = stage()
            raise_if_failed()
            return out
        fn()  # warm-up: kernel compilation, pool growth
        cp.cuda.Device().synchronize()
        pool.free_all_blocks()
        base = pool.total_bytes()
        r = fn()
        cp.cuda.Device().synchronize()
        peak = pool.total_bytes() - base
        t = time.perf_counter()
        for _ in range(repeats):
            r = fn()
        cp.cuda.Device().synchronize()
        return r, {"pool_peak_bytes": int(peak), "ms": (time.perf_counter() - t) / repeats * 1e3}

    (masks, boxes, kept_ids), res["masks"] = timed(lambda: ras(polygons, vertices, cat_ids))
    _, res["copy_paste"] = timed(lambda: cps(images, masks, boxes, kept_ids))
    return res


def _synthetic_training(recipe_name: str, train_batch: int, device: str, image_size: int | None = None):
    """One training step of the recipe's model (AMP on the GPU) on a fixed synthetic batch, as a
    function: what the trainer's step costs without its data."""
    import torch
    from dali_scp.presets import recipe
    from trainer.model import build_model
    from trainer.train_loop import total_loss
    rec = recipe(recipe_name)
    if image_size:
        rec = dataclasses.replace(rec, image_size=image_size)
    s = rec.image_size
    gen = torch.Generator().manual_seed(0)
    model = build_model(rec, num_classes=81).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    amp = device == "cuda"
    scaler = torch.amp.GradScaler(enabled=amp)
    images, targets = [], []
    for _ in range(train_batch):
        images.append(torch.randint(0, 256, (3, s, s), dtype=torch.uint8, generator=gen).to(device))
        xy = torch.rand(12, 2, generator=gen) * s * 0.7
        wh = torch.rand(12, 2, generator=gen) * s * 0.3 + 8
        boxes = torch.cat([xy, xy + wh], 1).floor()
        masks = torch.zeros(12, s, s, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes.to(device), labels=torch.randint(1, 81, (12,), generator=gen).to(device),
                            masks=masks.to(device)))

    def step():
        with torch.autocast(device_type="cuda" if amp else "cpu", enabled=amp):
            losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total_loss(losses)).backward()
        scaler.step(opt)
        scaler.update()
    return step


def measure_under_training(batch: HostBatch, size: int, recipe_name: str = "r50_ssj_scp_90k", train_batch: int = 8,
                           repeats: int = 10, device: str = "cuda", cp_cfg: CopyPaste | None = None,
                           train_image_size: int | None = None) -> dict:
    """Median milliseconds per stage and per training step, each alone and then both at once: the
    training step in a thread on its own CUDA stream, the stages in this thread on another (DALI runs
    them on its own stream, in the trainer's process). Each side waits for its own stream only.
    ``device="cpu"`` runs the same with the stages through the stand-in and the model on the CPU."""
    import torch
    cuda = device == "cuda"
    if cuda:
        import cupy as cp
        xp, s_stream, t_stream = cp, cp.cuda.Stream(non_blocking=True), torch.cuda.Stream()
        s_ctx, t_ctx = (lambda: s_stream), (lambda: torch.cuda.stream(t_stream))
        s_sync, t_sync = s_stream.synchronize, t_stream.synchronize
    else:
        xp, s_ctx, t_ctx = StandIn(), contextlib.nullcontext, contextlib.nullcontext
        s_sync = t_sync = (lambda: None)
    with s_ctx():
        polygons, vertices, cat_ids, images = _device(batch, xp)
    ras, cps = RasterizeStage(size, size), CopyPasteStage(cp_cfg or CopyPaste())
    step = _synthetic_training(recipe_name, train_batch, device, train_image_size)
    if device == "cuda":  # the inputs were copied on the default stream; training runs on t_stream
        torch.cuda.synchronize()

    def stages(n):
        ms = {k: [] for k in STAGES}
        with s_ctx():
            for _ in range(n):
                t = time.perf_counter()
                masks = ras(polygons, vertices, cat_ids)
                raise_if_failed()
                s_sync()
                ms["masks"].append(1e3 * (time.perf_counter() - t))
                t = time.perf_counter()
                cps(images, *masks)
                raise_if_failed()
                s_sync()
                ms["copy_paste"].append(1e3 * (time.perf_counter() - t))
        return {k: statistics.median(v) for k, v in ms.items()}

    def train(out: list, n: int | None = None, stop: threading.Event | None = None):
        """Steps until ``n`` are done or ``stop`` is set; ``out`` gets (start, end) of each."""
        with t_ctx():
            while (n is None or len(out) < n) and not (stop is not None and stop.is_set()):
                t = time.perf_counter()
                step()
                t_sync()
                out.append((t, time.perf_counter()))

    ms = lambda spans: [1e3 * (b - a) for a, b in spans]  # noqa: E731
    stages(1)          # warm-up: kernel compilation, memory pools
    train([], 2)
    alone_stages = stages(repeats)
    alone_train: list = []
    train(alone_train, max(3, repeats // 2))
    steps: list = []
    stop = threading.Event()
    worker = threading.Thread(target=train, args=(steps,), kwargs=dict(stop=stop), daemon=True)
    worker.start()
    while not steps and worker.is_alive():  # one step done: the training loop is in full swing
        time.sleep(0.01)
    t0 = time.perf_counter()
    under = stages(repeats)
    t1 = time.perf_counter()
    stop.set()
    worker.join()
    beside = [(a, b) for a, b in steps if b > t0 and a < t1]  # steps that ran while the stages did
    covered = sum(min(b, t1) - max(a, t0) for a, b in beside)
    return dict(recipe=recipe_name, train_batch=train_batch, repeats=repeats,
                stages_alone_ms=alone_stages, stages_under_training_ms=under,
                train_step_ms=statistics.median(ms(alone_train)),
                train_step_beside_stages_ms=statistics.median(ms(beside)) if beside else None,
                train_steps_beside_stages=len(beside),
                training_share_of_stage_window=covered / (t1 - t0))


def _mib(n):
    return f"{n / 2**20:.1f} MiB"


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    ap = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=cli.COUNT, default=8)
    ap.add_argument("--instances", type=cli.COUNT, default=30, help="up to N instances per image (one image has N)")
    ap.add_argument("--size", type=cli.Number(int, 8, multiple_of=8), default=1024, help="canvas side (multiple of 8)")
    ap.add_argument("--seed", type=cli.SEED, default=0)
    ap.add_argument("--device", choices=("standin", "gpu"), default="standin",
                    help="standin: count through the NumPy-backed CuPy stand-in (no GPU needed); "
                         "gpu: the same and then the real thing on CuPy (pool peak, ms)")
    ap.add_argument("--under-training", metavar="RECIPE", default=None,
                    help="with --device gpu: also time the stages while RECIPE's model trains in this process "
                         "(e.g. r50_ssj_scp_90k), and the training step with and without them")
    ap.add_argument("--train-batch", type=cli.COUNT, default=8, help="images per training step for --under-training")
    ap.add_argument("--json", help="write {'stages': {'masks': {...}, 'copy_paste': {...}}} here")
    cli.add_debug_flag(ap)
    a = ap.parse_args(argv)
    if a.under_training and a.device != "gpu":
        ap.error("--under-training needs --device gpu")
    if a.under_training:
        from dali_scp.presets import RECIPES
        if a.under_training not in RECIPES:
            ap.error(f"--under-training: unknown recipe {a.under_training!r}; choose one of {', '.join(RECIPES)}")
    batch = coco_like_batch(a.batch_size, a.instances, a.size, a.seed)
    stages = measure_standin(batch, a.size)
    if a.device == "gpu":
        from dali_scp.deps import gpu_available
        if not gpu_available():
            print("error: --device gpu needs CuPy and a CUDA device; none is usable here", file=sys.stderr)
            return 2
        for k, v in measure_gpu(batch, a.size).items():
            stages[k].update(v)
    under = None
    if a.under_training:
        under = measure_under_training(batch, a.size, a.under_training, a.train_batch)
    print(f"batch {a.batch_size} x up to {a.instances} instances, {a.size}^2 canvas ({a.device})")
    print(f"{'stage':<12}{'host_syncs':>11}{'kernels':>9}{'h2d':>5}{'peak':>13}"
          + (f"{'pool peak':>13}{'ms':>8}" if a.device == "gpu" else ""))
    for name in STAGES:
        s = stages[name]
        line = f"{name:<12}{s['host_syncs']:>11}{s['kernels']:>9}{s['h2d']:>5}{_mib(s['peak_bytes']):>13}"
        if a.device == "gpu":
            line += f"{_mib(s['pool_peak_bytes']):>13}{s['ms']:>8.2f}"
        print(line)
    if under:
        print(f"beside a training step of {under['recipe']} ({under['train_batch']} images, AMP), ms:")
        for name in STAGES:
            print(f"  {name:<12} alone {under['stages_alone_ms'][name]:8.2f}   under training "
                  f"{under['stages_under_training_ms'][name]:8.2f}")
        beside = under["train_step_beside_stages_ms"]
        print(f"  training step alone {under['train_step_ms']:.1f}, beside the stages "
              + (f"{beside:.1f}" if beside is not None else "n/a (no step finished while they ran)")
              + f" ({under['train_steps_beside_stages']} steps; training ran "
              f"{100 * under['training_share_of_stage_window']:.0f}% of the stages' time)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"batch_size": a.batch_size, "instances": a.instances, "size": a.size, "device": a.device,
                       "stages": stages, **({"under_training": under} if under else {})}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
