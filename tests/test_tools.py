"""The user-facing tools: synthetic data generator, visualiser, profiler (and its baseline, held to the
same geometric checks as our pipelines)."""
import json
import math
import subprocess
import sys

import numpy as np
from PIL import Image

from geometry_truth import iou, match_annotation, object_pixels, tight_box


def test_synthetic_dataset_is_coco_like(syn_root):
    doc = json.loads((syn_root / "annotations" / "instances_train2017.json").read_text())
    cats = [c["id"] for c in doc["categories"]]
    assert cats != list(range(1, len(cats) + 1)), "category ids must be non-contiguous"
    per_img = {im["id"]: 0 for im in doc["images"]}
    for a in doc["annotations"]:
        per_img[a["image_id"]] += not a["iscrowd"]
    assert max(per_img.values()) <= 30
    polys = [p for a in doc["annotations"] if not a["iscrowd"] for p in a["segmentation"]]
    assert all(10 <= len(p) // 2 <= 60 for p in polys)
    assert any(len(a["segmentation"]) > 1 for a in doc["annotations"] if not a["iscrowd"])
    assert any(a["iscrowd"] and isinstance(a["segmentation"], dict) for a in doc["annotations"])
    areas = [a["area"] for a in doc["annotations"] if not a["iscrowd"]]
    assert min(areas) < 32 ** 2 < 96 ** 2 < max(areas)
    sizes = {(im["width"], im["height"]) for im in doc["images"]}
    assert len(sizes) >= 4
    kb = [(syn_root / "train2017" / im["file_name"]).stat().st_size / 1024 for im in doc["images"]]
    assert 60 < np.median(kb) < 250
    img = np.asarray(Image.open(syn_root / "train2017" / doc["images"][0]["file_name"]), np.float32)
    assert np.abs(np.diff(img, axis=1)).mean() < 20, "smooth content, not noise"


def test_generator_cli(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dali_scp.synthetic", "--out", str(tmp_path), "--train", "3",
                        "--val", "2", "--seed", "5"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "train2017").glob("*.jpg"))) == 3
    assert len(json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())["images"]) == 2


def test_visualiser_draws_a_grid(syn_root, tmp_path):
    out = tmp_path / "grid.png"
    p = subprocess.run([sys.executable, "-m", "pipelines.visualize", "--pipeline", "ssj_scp", "--coco-root",
                        str(syn_root), "--num", "4", "--tile", "160", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    img = np.asarray(Image.open(out))
    assert img.shape[1] == 4 * 160 and img.std() > 20


def test_profiler_writes_positive_finite_figures(syn_root, tmp_path):
    from pipelines import profile
    f = tmp_path / "p.json"
    assert profile.main(["--pipeline", "ssj_scp", "--coco-root", str(syn_root), "--iters", "2", "--warmup", "1",
                         "--batch-size", "4", "--out-size", "256", "--baseline", "--json", str(f)]) == 0
    out = json.loads(f.read_text())
    names = [r["pipeline"] for r in out["results"]]
    assert names == ["decode-only", "ssj_scp", "baseline:ssj_scp"]
    for r in out["results"]:
        for k in ("images_per_s", "ms_median", "ms_p90"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["pipeline"], k)
    ours = out["results"][1]
    assert ours["stage_ms"]["copy_paste"] > 0 and ours["stage_ms"]["masks"] > 0
    assert out["results"][2]["ours_over_baseline"] > 0 and out["machine"]["cpu_count"] >= 1


def test_baseline_outputs_pass_the_same_geometric_checks(syn_train, syn_ann):
    from dali_scp.presets import pipeline_preset
    from pipelines.baseline import baseline_loader
    loader = baseline_loader(syn_train.annotations, syn_train.images_dir, pipeline_preset("ssj_scp", out_size=384),
                             batch_size=6, workers=0)
    images, targets = next(iter(loader))
    checked = 0
    for img, t in zip(images.permute(0, 2, 3, 1).numpy(), targets):
        for m, box in zip(t["masks"].numpy(), t["boxes"].numpy()):
            assert m.any()
            np.testing.assert_allclose(box, tight_box(m), atol=1.0)
            if m.sum() < 48 * 48:
                continue
            anns = [a for v in syn_ann.values() for a in v[1]]
            a = match_annotation(img, m, anns)
            assert a is not None
            truth = object_pixels(img, a["colour"])
            ys, xs = np.nonzero(m)
            win = (slice(max(ys.min() - 4, 0), ys.max() + 5), slice(max(xs.min() - 4, 0), xs.max() + 5))
            assert iou(m[win], truth[win]) >= 0.9
            checked += 1
    assert checked > 3


def test_benchmark_matrix_rewrite_keeps_sections_it_did_not_measure(tmp_path, monkeypatch):
    """RESULTS.md holds the anchors run and the COCO-sized figures (hours to remake): a matrix rewrite,
    full or stand-in only, must keep both word for word and replace its own tables."""
    bench = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench / "anchors"))
    monkeypatch.syspath_prepend(str(bench))
    import run_matrix
    from run import BEGIN, END
    anchors = f"{BEGIN}\n## Beside mmdetection\n| ours | 115.1 |\n{END}"
    kept = f"{run_matrix.KEPT_BEGIN}\n## At COCO 2017's size\n| cold check | 124.5 s |\n{run_matrix.KEPT_END}"
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Benchmark results\n\n{anchors}\n\n## old table\n\n{kept}\n")
    budget = {"8×30": {"masks": {"host_syncs": 2, "kernels": 20, "h2d": 7, "peak_bytes": 3 << 20}}}
    run = {"machine": {"cpu_model": "cpu", "cpu_count": 2}, "dataset": "d", "command": "c",
           "results": [{"pipeline": "ssj", "device": "cpu", "batch_size": 8, "images_per_s": 100.0,
                        "ms_median": 80.0, "ms_p90": 90.0, "cpu_cores_busy": 1.5}]}
    run_matrix.write_markdown([run], md, budget)
    text = md.read_text()
    assert anchors in text and kept in text and "## old table" not in text
    assert "| ssj | cpu | 8 | 100.0 |" in text and "| 8×30 | masks | 2 | 20 | 7 | 3.0 MiB |" in text
    monkeypatch.setattr(run_matrix, "_budget", lambda: {"8×30": {"masks": dict(budget["8×30"]["masks"], kernels=21)}})
    run_matrix._stand_in_only(tmp_path)
    text = md.read_text()
    assert anchors in text and kept in text and "| ssj | cpu | 8 | 100.0 |" in text
    assert "| 8×30 | masks | 2 | 21 | 7 | 3.0 MiB |" in text and "| 2 | 20 |" not in text
