"""The optimiser and learning-rate schedule of the r50 recipes, against what mmengine builds from the seed configs.

``scripts/mmdet_schedule_reference.py`` built a real mmengine ``Runner`` from each of the four seed configs in the
mmdet 3.3 wheel at a total batch of 64 and of 16 (the config's ``auto_scale_lr``, base 64), ran what
``Runner.train`` runs before its loop, and recorded the learning rate of every iteration of the loop
(``ParamSchedulerHook`` stepping LinearLR + MultiStepLR) and, per parameter, its optimiser settings
(``tests/data/mmdet_schedule.npz``). Here the trainer's own objects - ``RunConfig`` resolving ``--preset`` and
``--batch-size``, ``trainer.run.build_optimizer`` on the recipe's model, ``Trainer.run_step`` - are driven the
same way and compared iteration by iteration, parameter by parameter.
"""
from pathlib import Path

import numpy as np
import pytest
from reference_files import load_reference
import torch

from dali_scp.presets import recipe
from trainer import run as run_mod
from trainer.config import RunConfig
from trainer.import_weights import rename_mmdet
from trainer.model import build_model

REF = Path(__file__).parent / "data" / "mmdet_schedule.npz"
RECIPES = ("r50_ssj_90k", "r50_ssj_scp_90k", "r50_ssj_270k", "r50_ssj_scp_270k")
COCO_CLASSES = 80


@pytest.fixture(scope="module")
def reference():
    return load_reference(REF)


_models = {}


def model_of(name):
    """The recipe's Mask R-CNN for COCO (the seed's 80 classes), built once per recipe."""
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = build_model(recipe(name), COCO_CLASSES + 1)
    return _models[name]


def resolved(name, batch):
    a = run_mod.parse_args(["--preset", name, "--batch-size", str(batch), "--no-eval"])
    return RunConfig.from_args(a, world_size=1, device="cpu")


@pytest.mark.parametrize("batch", [64, 16])
@pytest.mark.parametrize("name", RECIPES)
def test_learning_rate_of_every_iteration_is_mmengines(name, batch, reference):
    cfg = resolved(name, batch)
    assert cfg.total_batch == batch
    opt, sched = run_mod.build_optimizer(model_of(name), cfg.recipe, cfg.lr)
    group = opt.param_groups[0]
    ours = np.empty(cfg.max_iters, np.float64)
    opt.step()  # as the trainer: the optimiser steps before the scheduler (no gradients here: nothing moves)
    for it in range(cfg.max_iters):
        ours[it] = group["lr"]
        sched.step()
    theirs = reference[f"lr_{name}_b{batch}"]
    info = reference["info"]["configs"][f"{name}_b{batch}"]
    assert info["batch"] == batch and info["base_lr"] == pytest.approx(0.1 * batch / 64, rel=1e-12)
    if name.endswith("_90k"):
        # mmdetection 3.3's 90k configs set `max_iters = 90000` and a schedule ending at 90k, but their train
        # loop inherits the 270k base's max_iters: mmengine would go on at the last rate for 180k more
        # iterations. The released 90k weights were trained by mmdetection 2.25, whose config stopped at 90k.
        assert len(theirs) == 270000 and np.all(theirs[90000:] == theirs[89999])
        theirs = theirs[:90000]
    assert len(ours) == len(theirs) == cfg.max_iters
    rel = np.abs(ours - theirs) / theirs
    worst = int(np.argmax(rel))
    assert rel.max() <= 1e-7, f"iteration {worst}: ours {ours[worst]!r}, mmengine {theirs[worst]!r}"


def mmdet_to_ours(mmdet_names):
    """mmdetection parameter name -> ours, through the checkpoint importer's own mapping."""
    mapped, unused = rename_mmdet({n: n for n in mmdet_names})
    assert not unused, unused[:5]
    return {m: ours for ours, m in mapped.items()}


@pytest.mark.parametrize("name", RECIPES)
def test_weight_decay_momentum_and_clipping_are_mmdetections_parameter_by_parameter(name, reference):
    info = reference["info"]["configs"][f"{name}_b64"]
    assert (info["optimizer"], info["wrapper"], info["clip_grad"], info["accumulative_counts"]) == \
        ("SGD", "OptimWrapper", None, 1), "the seed trains with plain SGD, no clipping, no accumulation"
    cfg = resolved(name, 64)
    model = model_of(name)
    opt, _ = run_mod.build_optimizer(model, cfg.recipe, cfg.lr)
    assert type(opt) is torch.optim.SGD
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    ours = dict(model.named_parameters())
    theirs = info["params"]
    to_ours = mmdet_to_ours(theirs)
    assert sorted(to_ours.values()) == sorted(ours), "one of our parameters for each of mmdetection's"
    decayed = 0
    for m_name, t in theirs.items():
        p = ours[to_ours[m_name]]
        g = group_of.get(id(p))
        assert p.requires_grad == t["requires_grad"], m_name
        assert (g is not None and p.requires_grad) == (t["in_optimizer"] and t["requires_grad"]), m_name
        mine = {k: g[k] for k in ("weight_decay", "momentum", "dampening", "nesterov")}
        assert mine == {k: t[k] for k in mine}, (m_name, mine, t)
        decayed += mine["weight_decay"] > 0
    # every parameter decays, as in mmdetection's config (no paramwise_cfg): BN and biases included
    bn = [n for n in theirs if ".bn" in n or "downsample.1" in n or "norm" in n or ".gn" in n]
    assert decayed == len(theirs) and bn and all(theirs[n]["weight_decay"] == 4e-5 for n in bn)


def test_a_training_step_is_plain_sgd_with_momentum_and_weight_decay_no_clipping():
    """Two steps of the trainer's loop on one parameter with a huge gradient: the update is SGD's formula
    at the schedule's first two rates, unclipped (mmengine's OptimWrapper without clip_grad)."""
    from trainer.train_loop import Trainer
    r = recipe("r50_ssj_scp_90k")
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -2.0, 3.0]]))
    opt, sched = run_mod.build_optimizer(model, r, r.lr)
    coef = torch.tensor([1e4, -3e4, 2e5], dtype=torch.float64)  # gradient norm ~2e5
    data = iter([(None, None)] * 2)
    trainer = Trainer(data, lambda *_: {"loss": (model.weight[0] * coef).sum()}, opt, sched,
                      torch.amp.GradScaler("cpu", enabled=False))
    p, buf = model.weight.detach().clone()[0], None
    lam = run_mod.lr_lambda(r)
    for it in range(2):
        trainer.run_step()
        d = coef + r.weight_decay * p
        buf = d if buf is None else r.momentum * buf + d
        p = p - r.lr * lam(it) * buf
        torch.testing.assert_close(model.weight.detach()[0], p, rtol=1e-12, atol=0)
