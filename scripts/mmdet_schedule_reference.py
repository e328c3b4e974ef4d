"""The optimiser and learning-rate schedule mmengine builds from the four seed configs, for
``tests/test_schedule.py``.

    /work/venvs/mmdet/bin/python scripts/mmdet_schedule_reference.py   # rewrites tests/data/mmdet_schedule.npz

Why a side environment: mmdetection and mmengine stay out of the project's install and tests (see
``scripts/mmdet_reference.py``). The test reads the small file this script writes.

What it does, per seed config (``CONFIGS``, shipped in the mmdet wheel) and total batch (``BATCHES``: the
recipe's 64 and 16, one process): sets the training dataloader's batch size and turns on the config's own
``auto_scale_lr`` (base_batch_size 64), builds a real ``mmengine.runner.Runner`` from the config (its dataset
pointed at a 4-image synthetic set; one gloo process, which MMSyncBN needs to be built), and then does what
``Runner.train`` does before its loop - ``build_train_loop`` (the dataloader is built, never iterated),
``build_optim_wrapper``, ``scale_lr``, ``build_param_scheduler`` - and what the loop does to the learning
rate: for every iteration of the loop's ``max_iters`` it records the learning rate the optimiser holds, then
calls ``ParamSchedulerHook.after_train_iter`` (every iteration-based scheduler steps). Recorded: the learning
rate of every iteration (float64, compressed: the schedule is piecewise constant after the warm-up); per
parameter of the model (mmdetection's names) requires_grad, whether the optimiser holds it, and the weight
decay, momentum, dampening and nesterov of its group; the optimiser wrapper's type, gradient clipping and
accumulation.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "r50_ssj_90k": "simple_copy_paste/mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-90k_coco.py",
    "r50_ssj_scp_90k": "simple_copy_paste/mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-scp-90k_coco.py",
    "r50_ssj_270k": "simple_copy_paste/mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-270k_coco.py",
    "r50_ssj_scp_270k": "simple_copy_paste/mask-rcnn_r50_fpn_rpn-2conv_4conv1fc_syncbn-all_32xb2-ssj-scp-270k_coco.py",
}
BATCHES = (64, 16)
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mmdet_schedule.npz"


def build_runner(config: str, batch: int, work_dir: str, data_root: Path):
    from mmengine.config import Config
    from mmengine.runner import Runner
    from dali_scp.synthetic import CATEGORIES
    from mmdet_reference import seed_config
    cfg = Config.fromfile(str(seed_config(config)))
    cfg.work_dir = work_dir
    cfg.experiment_name = f"{Path(config).stem}_b{batch}"   # one visualizer instance per runner (named by it)
    d = cfg.train_dataloader.dataset
    d = d.dataset if d.type == "MultiImageMixDataset" else d
    d.data_root = str(data_root) + "/"   # the loop's dataloader is built (its length is asked), never iterated
    d.metainfo = dict(classes=tuple(name for _, name in sorted(CATEGORIES)))
    cfg.train_dataloader.batch_size = batch
    cfg.auto_scale_lr.enable = True   # what `tools/train.py --auto-scale-lr` does
    cfg.log_level = "WARNING"
    return cfg, Runner.from_cfg(cfg)


def record(config: str, batch: int, data_root: Path) -> tuple[np.ndarray, dict]:
    from mmengine.hooks import ParamSchedulerHook
    cfg, runner = build_runner(config, batch, str(data_root.parent / "work_dirs"), data_root)
    # Runner.train, before its loop (mmengine 0.10)
    runner._train_loop = runner.build_train_loop(runner._train_loop)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
    runner.param_schedulers = runner.build_param_scheduler(runner.param_schedulers)
    opt = runner.optim_wrapper.optimizer
    max_iters = int(cfg.train_cfg.max_iters)
    hook = ParamSchedulerHook()
    lrs = np.empty(max_iters, np.float64)
    groups = opt.param_groups
    assert len({g["lr"] for g in groups}) == 1
    for it in range(max_iters):
        lrs[it] = groups[0]["lr"]
        hook.after_train_iter(runner, it)
        if it and it % 50000 == 0:
            print(f"  {it}/{max_iters}", flush=True)
    assert all(g["lr"] == groups[0]["lr"] for g in groups)
    group_of = {id(p): g for g in groups for p in g["params"]}
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    params = {}
    for name, p in model.named_parameters():
        g = group_of.get(id(p))
        params[name] = dict(requires_grad=bool(p.requires_grad), in_optimizer=g is not None, **(
            {k: g[k] for k in ("weight_decay", "momentum", "dampening", "nesterov")} if g else {}))
    ow = runner.optim_wrapper
    info = dict(optimizer=type(opt).__name__, wrapper=type(ow).__name__,
                clip_grad=getattr(ow, "clip_grad_kwargs", None) or None,
                accumulative_counts=int(getattr(ow, "_accumulative_counts", 1)),
                base_lr=float(opt.param_groups[0]["initial_lr"]), max_iters=max_iters,
                schedulers=[type(s).__name__ for s in runner.param_schedulers],
                param_scheduler_cfg=[dict(s) for s in cfg.param_scheduler], auto_scale_lr=dict(cfg.auto_scale_lr),
                optim_wrapper_cfg=cfg.optim_wrapper.to_dict() if hasattr(cfg.optim_wrapper, "to_dict")
                else dict(cfg.optim_wrapper), params=params)
    return lrs, info


def single_process_group() -> None:
    """MMSyncBN (the seed's head norm) asks for the process group's size when it is built: one gloo process."""
    import os
    import torch.distributed as dist
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=0, world_size=1)


def setup() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mmdet_reference import _stand_in_kernels
    _stand_in_kernels()  # mmcv-lite: the model's modules import mmcv.ops (no kernel runs here)
    single_process_group()
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    a = p.parse_args(argv)
    setup()
    import mmdet
    import mmengine
    import torch
    from dali_scp.synthetic import generate
    arrays, infos = {}, {}
    tmp = tempfile.TemporaryDirectory()
    data_root = generate(Path(tmp.name) / "syn", train=4, val=1, seed=0)
    for name, config in CONFIGS.items():
        for batch in BATCHES:
            t0 = time.time()
            lrs, info = record(config, batch, data_root)
            arrays[f"lr_{name}_b{batch}"] = lrs
            infos[f"{name}_b{batch}"] = dict(info, config=config, batch=batch)
            print(f"{name} batch {batch}: base lr {info['base_lr']:.6g}, {len(lrs)} iterations, "
                  f"schedulers {info['schedulers']}, {time.time() - t0:.0f} s", flush=True)
    meta = dict(configs=infos, versions=dict(mmdet=mmdet.__version__, mmengine=mmengine.__version__,
                                             torch=torch.__version__))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **arrays, info=np.array(json.dumps(meta, default=str)))
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
