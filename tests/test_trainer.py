"""Trainer: recipes, one step, DDP over sharded pipelines, kill-and-resume, NaN stop."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from dali_scp.presets import RECIPES, pipeline_preset, recipe
from trainer import checkpoint as ckpt
from trainer import run as run_mod


def test_presets_are_the_seed_recipes():
    for pipe in ("ssj", "ssj_scp", "lsj", "lsj_scp"):
        r90, r270 = recipe(f"r50_{pipe}_90k"), recipe(f"r50_{pipe}_270k")
        for r in (r90, r270):
            assert (r.lr, r.momentum, r.weight_decay, r.total_batch, r.image_size) == (0.1, 0.9, 4e-5, 64, 1024)
            assert (r.backbone, r.norm, r.trainable_layers, r.pipeline) == ("resnet50", "SyncBN", 5, pipe)
            assert (r.eval_resize.max_long, r.eval_resize.max_short) == (1333, 800)
        assert (r90.max_iters, r90.warmup_iters, r90.warmup_factor, r90.steps) == (90000, 500, 0.067, (81000, 85500, 87750))
        assert (r270.max_iters, r270.warmup_iters, r270.warmup_factor, r270.steps) == (
            270000, 1000, 0.001, (243000, 256500, 263250))
    assert pipeline_preset("ssj").jitter.scale_range == (0.8, 1.25)
    assert pipeline_preset("lsj_scp").jitter.scale_range == (0.1, 2.0)
    cp = pipeline_preset("ssj_scp").copy_paste
    assert (cp.max_num_pasted, cp.bbox_occluded_thr, cp.mask_occluded_thr, cp.paste_prob) == (100, 10, 300, 1.0)
    assert pipeline_preset("ssj").copy_paste is None
    f = run_mod.lr_lambda(recipe("r50_ssj_scp_90k"))
    assert f(0) == pytest.approx(0.067) and f(1) == pytest.approx(0.067 + 0.933 / 499)  # mmengine's LinearLR
    assert [f(i) for i in (499, 500, 80999)] == [1.0, 1.0, 1.0]
    assert [f(i) for i in (81000, 85500, 87750)] == pytest.approx([0.1, 0.01, 0.001])
    assert "demo" in RECIPES


def test_default_recipe_follows_the_dataset(syn_root):
    """demo without a dataset, the 90k recipe of the chosen pipeline with one (lr scaling: DDP test)."""
    a = run_mod.parse_args(["--pipeline", "lsj", "--coco-root", str(syn_root)])
    assert run_mod.resolve_recipe(a).name == "r50_lsj_90k"
    a = run_mod.parse_args(["--pipeline", "ssj"])
    r = run_mod.resolve_recipe(a)
    assert r.name == "demo" and r.pipeline == "ssj"


def _train(tmp, syn_root, *extra):
    a = run_mod.parse_args(["--preset", "demo", "--coco-root", str(syn_root), "--no-eval", "--threads", "2",
                            "--out", str(tmp), "--batch-size", "2", *extra])
    return run_mod.train(a)


def _weights(run_dir):
    return ckpt.load(ckpt.latest(run_dir))["model"]


def test_one_step_finite_losses_and_weights_change(syn_train):
    from pipelines.iterator import CocoLoader
    from trainer.model import build_model, to_model_inputs
    from trainer.train_loop import total_loss
    torch.manual_seed(0)
    r = recipe("demo")
    model = build_model(r, syn_train.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = next(iter(CocoLoader("ssj_scp", syn_train, batch_size=2, out_size=r.image_size)))
    imgs, tg = to_model_inputs(images, targets)
    losses = model(imgs, tg)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "acc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 <= float(losses["acc"]) <= 100 and not losses["acc"].requires_grad  # logged, not summed
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    total_loss(losses).backward()
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("backbone.body.conv1" in k for k in changed) and any("mask_head" in k for k in changed)


def test_kill_and_resume_ends_in_the_same_state(small_root, tmp_path):
    """3 images, batch 2: epochs end inside batch 2 (a partial batch), after batch 3 and inside batch 5.
    Killed after batch 2 (one boundary behind it: a one-epoch stream would have run and dropped a
    batch there) and resumed across two more, the run must end bit for bit where the straight one does."""
    root = small_root(3)
    _train(tmp_path / "straight", root, "--max-iters", "5", "--record-image-ids")
    _train(tmp_path / "resumed", root, "--max-iters", "2")
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        _train(tmp_path / "resumed", root, "--max-iters", "5")
    _train(tmp_path / "resumed", root, "--max-iters", "5", "--resume", "--record-image-ids")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    state = ckpt.load(ckpt.latest(tmp_path / "resumed"))
    assert state["iteration"] == 5
    ids = [json.loads((tmp_path / d / "rank0_debug.json").read_text())["image_ids"] for d in ("straight", "resumed")]
    assert ids[1] == ids[0][4:] and len(ids[0]) == 10 and len(set(ids[0])) == 3
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "data_time", "step_time", "images_per_s"} <= set(lines[-1])
    assert (tmp_path / "straight" / "config.json").is_file() and (tmp_path / "straight" / "log.txt").is_file()
    assert list((tmp_path / "straight" / "tb").iterdir())


@pytest.mark.parametrize("n_images,shards,shard,window", [(3, 1, 0, None), (5, 2, 0, None), (5, 2, 1, None),
                                                           (5, 1, 0, 3), (5, 1, 0, 4)])
def test_each_shard_resumes_exactly_across_epoch_boundaries(small_root, n_images, shards, shard, window):
    """What every rank does on --resume: its shard's stream from the loader's state (window of the
    training order, batches taken from it, DALI's checkpoint). Shards of 3 (2 and 3) images with batch 2
    cross epoch boundaries inside batches, before and after the checkpoint; with windows of 3 batches the
    checkpoint (after 4) lies inside the second window, with windows of 4 exactly at a window's end."""
    from dali_scp.dataset import resolve
    from pipelines.iterator import CocoLoader
    split = resolve(small_root(n_images))
    kw = dict(batch_size=2, shard_id=shard, num_shards=shards, seed=4, out_size=64, infinite=True,
              window_batches=window)
    loader = CocoLoader("ssj_scp", split, **kw)
    it = iter(loader)
    straight, state = [], None
    for k in range(8):
        straight.append(next(it))
        if k == 3:
            state = loader.state()
    resumed = CocoLoader("ssj_scp", split, checkpoint=state, **kw)
    it = iter(resumed)
    for k in range(4, 8):
        images, targets = next(it)
        assert torch.equal(images, straight[k][0]), k
        for t, u in zip(targets, straight[k][1]):
            assert t["image_id"] == u["image_id"]
            for key in ("boxes", "labels", "masks", "pasted"):
                assert torch.equal(t[key], u[key]), (k, key)


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_checkpoint(syn_root, tmp_path, monkeypatch):
    real = run_mod.compute_losses
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        if calls["n"] == 3:
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    monkeypatch.setattr(run_mod, "compute_losses", flaky)
    with pytest.raises(run_mod.NonFiniteLoss, match="iteration 3") as e:
        _train(tmp_path, syn_root, "--max-iters", "5", "--checkpoint-every", "2")
    assert "ckpt_00000002.pth" in str(e.value)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["ckpt_00000002.pth"]
    assert ckpt.load(tmp_path / "ckpt_00000002.pth")["iteration"] == 2


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    ckpt.save(tmp_path, 1, {"x": 1}, keep=3)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save(tmp_path, 2, {"x": 2}, keep=3)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["ckpt_00000001.pth"]
    assert ckpt.load(ckpt.latest(tmp_path)) == {"x": 1}


def test_two_process_ddp_disjoint_shards_identical_weights(syn_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "trainer.run", "--preset", "demo", "--coco-root", str(syn_root),
           "--max-iters", "2", "--batch-size", "3", "--no-eval", "--threads", "1", "--record-image-ids",
           "--out", str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}_debug.json").read_text()) for r in (0, 1))
    assert len(r0["image_ids"]) == len(r1["image_ids"]) == 6
    assert not set(r0["image_ids"]) & set(r1["image_ids"])
    assert r0["weights_sha1"] == r1["weights_sha1"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2 and cfg["resolved"]["total_batch"] == 6
    assert cfg["resolved"]["lr"] == pytest.approx(recipe("demo").lr * 6 / 4)
    assert "learning rate scaled linearly" in (tmp_path / "log.txt").read_text()


def test_cli_help():
    p = subprocess.run([sys.executable, "-m", "trainer.run", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--pipeline" in p.stdout and "torchrun" in p.stdout


@pytest.mark.slow
def test_the_readme_demo_learns(tmp_path):
    """The README's first command as a new user runs it (fresh cache, the embedded demo set, the `demo`
    recipe, ~7 min on 2 cores): the loss falls, box and mask AP reach the bottom of the range the README
    states for three seeds, and the run ends naming its picture."""
    env = dict(os.environ, DALI_SCP_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "trainer.run", "--pipeline", "ssj_scp", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]  # one iteration every 20: noisy, compare means
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses
    m = json.loads((out / "eval_val2017" / "metrics.json").read_text())
    assert m["segm"]["AP"] >= 0.55 and m["bbox"]["AP"] >= 0.54, m  # the README's range: 55.2-62.2 / 54.3-60.9
    picture = out / "predictions_val2017.png"
    assert picture.is_file() and str(picture) in p.stdout.strip().splitlines()[-1] + p.stderr


def test_recipe_round_trips_through_its_dict():
    from dali_scp.presets import Recipe
    for r in RECIPES.values():
        d = json.loads(json.dumps(r.as_dict()))  # as a checkpoint or config.json holds it
        assert Recipe.from_dict(d) == r


def test_the_loop_calls_its_hooks_around_a_plain_step():
    """A newcomer's hook sees every moment; after a failure after_train still runs, with finished False."""
    from trainer.train_loop import HookBase, Trainer
    w = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    seen = []

    class Spy(HookBase):
        def before_train(self):
            seen.append(("before", self.trainer.iter))

        def after_forward(self):
            seen.append(("forward", self.trainer.iter, float(self.trainer.loss.detach())))
            if self.trainer.iter == fail_at:
                raise FloatingPointError

        def after_step(self):
            seen.append(("step", self.trainer.iter))

        def after_train(self):
            seen.append(("after", self.trainer.iter, self.trainer.finished))

    def data():
        while True:
            yield torch.tensor(2.0), None

    fail_at = None
    t = Trainer(data(), lambda x, _: {"loss": w * x}, opt, sched, torch.amp.GradScaler("cpu", enabled=False))
    t.register_hooks([Spy()])
    t.train(1, 3)
    assert seen == [("before", 1), ("forward", 1, 2.0), ("step", 2), ("forward", 2, pytest.approx(1.6)), ("step", 3),
                    ("after", 3, True)]
    assert float(w.detach()) == pytest.approx(0.6)
    seen.clear()
    fail_at = 1
    with pytest.raises(FloatingPointError):
        t.train(1, 3)
    assert seen == [("before", 1), ("forward", 1, pytest.approx(1.2)), ("after", 1, False)]
    assert float(w.detach()) == pytest.approx(0.6)  # the failed step changed nothing


def test_the_model_uses_the_recipes_anchors_and_backbone():
    """The demo's anchors (16-256 px, for 256² images) and half-width ResNet-18 reach the model; the
    seed recipes keep torchvision's / mmdetection's 32-512 px anchors."""
    from trainer.model import build_model
    demo = build_model(recipe("demo"), 9)
    assert demo.rpn.anchor_generator.sizes == tuple((s,) for s in recipe("demo").anchor_sizes) == (
        (16,), (32,), (64,), (128,), (256,))
    assert demo.backbone.body.layer4[-1].conv2.out_channels == 256 and demo.backbone.body.conv1.out_channels == 32
    assert recipe("r50_ssj_scp_90k").anchor_sizes == (32, 64, 128, 256, 512)
