"""--eval-every: val AP during training in metrics.jsonl and TensorBoard, best.pth by mask AP (loadable
by trainer.evaluate, never taken for a resume checkpoint), and training bit for bit as without it,
also across a kill and resume."""
import json

import pytest
import torch

from test_trainer import _train, _weights
from trainer import checkpoint as ckpt
from trainer import run as run_mod


def test_eval_every_logs_keeps_best_and_leaves_training_exact(small_root, tmp_path):
    root = small_root(3)
    _train(tmp_path / "evaluated", root, "--max-iters", "4", "--eval-every", "2")
    _train(tmp_path / "plain", root, "--max-iters", "4")
    _train(tmp_path / "resumed", root, "--max-iters", "2", "--eval-every", "2")
    _train(tmp_path / "resumed", root, "--max-iters", "4", "--eval-every", "2", "--resume")
    a = _weights(tmp_path / "evaluated")
    for other in ("plain", "resumed"):  # evaluation changed nothing: model back in train mode, RNG untouched
        b = _weights(tmp_path / other)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{other}: {k}")

    run = tmp_path / "evaluated"
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in val if "segm_AP" in x]
    assert [x["iter"] for x in val] == [2, 4] and all("bbox_AP50" in x for x in val)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"]
    assert "val/segm_AP" in tags and "val/bbox_AP" in tags
    assert json.loads((run / "config.json").read_text())["resolved"]["eval_every"] == 2

    best = run / "best.pth"
    assert best.is_file() and ckpt.latest(run).name == "ckpt_00000004.pth" and best not in ckpt.checkpoints(run)
    state = ckpt.load(best)
    assert state["iteration"] in (2, 4)
    assert state["metrics"]["segm"]["AP"] == max(x["segm_AP"] for x in val)
    from trainer import evaluate as ev
    assert ev.main(["--checkpoint", str(best), "--coco-root", str(root), "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["segm"]["AP"] == pytest.approx(state["metrics"]["segm"]["AP"])  # the same weights


def test_best_checkpoint_keeps_the_highest_mask_ap_and_survives_a_resume(syn_root, tmp_path, capsys):
    from trainer.config import RunConfig
    from trainer.hooks import BestCheckpoint
    args = ["--preset", "demo", "--coco-root", str(syn_root), "--out", str(tmp_path), "--eval-every", "5"]
    cfg = RunConfig.from_args(run_mod.parse_args(args), 1, "cpu")
    model = torch.nn.Linear(2, 1)
    best = BestCheckpoint(cfg, model)
    for it, ap in [(5, 0.3), (10, 0.2), (15, 0.5), (20, 0.5)]:
        with torch.no_grad():
            model.weight.fill_(it)
        best.update(it, {"segm": {"AP": ap}, "bbox": {"AP": 0.9}})
    state = ckpt.load(tmp_path / "best.pth")
    assert state["iteration"] == 15 and float(state["model"]["weight"][0, 0]) == 15
    resumed = BestCheckpoint(RunConfig.from_args(run_mod.parse_args(args + ["--resume"]), 1, "cpu"), model)
    resumed.update(25, {"segm": {"AP": 0.4}})
    assert ckpt.load(tmp_path / "best.pth")["iteration"] == 15
    assert BestCheckpoint(cfg, model).ap == float("-inf")  # a new run does not inherit an old file
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's range (tests/test_cli_numbers.py)
        run_mod.parse_args(args[:-1] + ["-1"])
    assert e.value.code == 2 and "argument --eval-every" in capsys.readouterr().err
