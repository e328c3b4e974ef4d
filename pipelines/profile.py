"""Pipeline throughput profiler: images/s each pipeline delivers to PyTorch on this machine, where the
time goes, and - with --baseline - the same augmentation done the way users do it today (PyTorch
DataLoader workers, PIL, pycocotools masks, copy-paste in collate) on the same files, cores and batch.

    python -m pipelines.profile --pipeline all --baseline --json profile.json

Stage breakdown (ms per batch): ``read+decode`` from a reader+decoder-only pipeline on the same files;
``masks`` and ``copy-paste`` timed inside their stages; ``jitter+other`` = whole pipeline minus those
(resize/crop/flip/pad, DALI bookkeeping); ``hand-off`` = iterator (PyTorch tensors) minus raw pipeline
runs. DALI overlaps stages across threads, so the parts are CPU-time-like and need not sum to the wall
time per batch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

from dali_scp import dataset as ds
from dali_scp.presets import PIPELINES, RESAMPLERS, pipeline_preset
from pipelines.devices import dali_device_id

log = logging.getLogger("profile")


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GpuMemory:
    """Device-wide used memory, sampled: DALI's and CuPy's pools are invisible to torch's counters."""

    def __init__(self, device: str):
        self.on = device == "gpu"
        self.base = self.peak = 0
        if self.on:
            import torch
            free, total = torch.cuda.mem_get_info()
            self.base = total - free

    def sample(self):
        if self.on:
            import torch
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free - self.base)

    @property
    def peak_mb(self):
        return self.peak / 2**20 if self.on else None


def _timed_loop(next_batch, warmup: int, iters: int, sync=None, on_batch=None):
    for _ in range(warmup):
        next_batch()
    lat = []
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        next_batch()
        if sync:
            sync()
        lat.append(time.perf_counter() - t)
        if on_batch:
            on_batch()
    wall = time.perf_counter() - t0
    return lat, wall, _cpu_seconds() - cpu0


def _summary(lat, wall, cpu, batch, threads):
    return dict(images_per_s=batch * len(lat) / wall, ms_median=1e3 * statistics.median(lat),
                ms_p90=1e3 * float(np.percentile(lat, 90)), cpu_util=cpu / wall / max(os.cpu_count() or 1, 1),
                cpu_cores_busy=cpu / wall)


def decode_pipeline(split, device, batch, threads, annotations):
    """Reader + decoder only, on the same files: the floor under every pipeline (``decode-only``)."""
    from nvidia.dali import pipeline_def
    from pipelines import blocks

    @pipeline_def
    def decode_only():
        jpegs, _, _, _, _ = blocks.coco_reader(blocks.CocoFiles(str(split.images_dir), annotations), shuffle=True)
        return blocks.decode(jpegs, device)

    pipe = decode_only(batch_size=batch, num_threads=threads, device_id=dali_device_id(device), seed=1)
    pipe.build()
    return pipe


def profile_decode(split, device, batch, threads, warmup, iters, annotations):
    pipe = decode_pipeline(split, device, batch, threads, annotations)
    lat, wall, cpu = _timed_loop(pipe.run, warmup, iters)
    return _summary(lat, wall, cpu, batch, threads)


def profile_pipeline(name, split, device, batch, threads, warmup, iters, out_size, annotations, resampler=None):
    from pipelines import coco, stages
    from pipelines.iterator import CocoLoader
    preset = pipeline_preset(name, out_size)
    gpu = GpuMemory(device)
    sync = None
    if device == "gpu":
        import torch
        sync = torch.cuda.synchronize
    # raw pipeline runs (no PyTorch), with the stage timers of this pipeline's stages
    custom = []
    pipe = coco.build(preset, split, batch, device, threads, annotations=annotations, stages=custom,
                      resampler=resampler)

    def run():
        out = pipe.run()
        stages.raise_if_failed()
        return out
    for _ in range(warmup):
        run()
    before = [s.seconds for s in custom]
    lat, wall, cpu = _timed_loop(run, 0, iters, on_batch=gpu.sample)
    raw = _summary(lat, wall, cpu, batch, threads)
    stage_ms = {s.name: 1e3 * (s.seconds - t0) / iters for s, t0 in zip(custom, before)}
    del pipe
    # through DALI's PyTorch iterator, as the trainer consumes it
    loader = CocoLoader(preset, split, batch_size=batch, device=device, num_threads=threads, infinite=True,
                        annotations=annotations, resampler=resampler)
    it = iter(loader)
    lat, wall, cpu = _timed_loop(lambda: next(it), warmup, iters, sync=sync, on_batch=gpu.sample)
    res = _summary(lat, wall, cpu, batch, threads)
    res.update(pipeline=name, device=device, batch_size=batch, threads=threads, out_size=preset.jitter.out_size,
               raw_pipeline_ms=raw["ms_median"], stage_ms=stage_ms, peak_host_mb=_peak_rss_mb(),
               peak_gpu_mb=gpu.peak_mb)
    return res


def profile_baseline(name, split, batch, workers, warmup, iters, out_size, annotations):
    from pipelines.baseline import baseline_loader
    loader = baseline_loader(annotations, split.images_dir, pipeline_preset(name, out_size), batch, workers,
                             check=False)  # ``annotations`` is the checked copy already

    def batches():
        while True:
            yield from loader

    it = batches()
    lat, wall, cpu = _timed_loop(lambda: next(it), warmup, iters)
    res = _summary(lat, wall, cpu, batch, workers)
    # its worker processes are alive while measured, so getrusage cannot see their CPU time
    res.update(cpu_util=None, cpu_cores_busy=None)
    res.update(pipeline=f"baseline:{name}", device="cpu", batch_size=batch, threads=workers, out_size=out_size,
               peak_host_mb=_peak_rss_mb())
    return res


def machine_facts() -> dict:
    facts = dict(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count())
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for mod in ("nvidia.dali", "torch", "numpy", "cupy"):
        try:
            facts[mod.split(".")[-1] + "_version"] = __import__(mod, fromlist=["x"]).__version__
        except Exception:
            pass
    try:
        import torch
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return facts


def run(pipelines, coco_root=None, device="cpu", batch=8, threads=2, iters=20, warmup=3, baseline=False,
        out_size=None, progress=True, dataset: str = "coco", resampler: str | None = None) -> dict:
    from dali_scp.check import checked_annotations
    split = ds.resolve(coco_root, "train2017", dataset)
    ann, _ = checked_annotations(split.annotations, split.images_dir, progress=progress)
    ann = str(ann)
    out = dict(machine=machine_facts(), dataset=str(split.root), results=[])
    dec = profile_decode(split, device, batch, threads, warmup, iters, ann)
    dec.update(pipeline="decode-only", device=device, batch_size=batch, threads=threads)
    out["results"].append(dec)
    dec_ms = 1e3 * batch / dec["images_per_s"]
    for name in pipelines:
        r = profile_pipeline(name, split, device, batch, threads, warmup, iters, out_size, ann, resampler)
        st = r["stage_ms"]
        r["breakdown_ms"] = {
            "read+decode": dec_ms,
            "jitter+other": max(r["raw_pipeline_ms"] - dec_ms - st.get("masks", 0) - st.get("copy_paste", 0), 0.0),
            "masks": st.get("masks", 0.0), "copy-paste": st.get("copy_paste", 0.0),
            "hand-off": max(r["ms_median"] - r["raw_pipeline_ms"], 0.0)}
        out["results"].append(r)
        if baseline:
            b = profile_baseline(name, split, batch, threads, warmup, iters, r["out_size"], ann)
            b["ours_over_baseline"] = r["images_per_s"] / b["images_per_s"]
            out["results"].append(b)
    return out


STAGES = ("read+decode", "jitter+other", "masks", "copy-paste", "hand-off")  # breakdown_ms keys, in table order


def row_cells(r: dict) -> dict:
    """One result's figures as unpadded text: the console table below and benchmarks/run_matrix.py's
    RESULTS.md lay out the same cells, so a figure is rounded the same way in both."""
    b = r.get("breakdown_ms", {})
    vs = r.get("ours_over_baseline")
    cells = dict(pipeline=r["pipeline"], device=r["device"], batch=str(r["batch_size"]),
                 images_per_s=f"{r['images_per_s']:.1f}", ms_median=f"{r['ms_median']:.0f}",
                 ms_p90=f"{r['ms_p90']:.0f}",
                 cores="n/a" if r["cpu_cores_busy"] is None else f"{r['cpu_cores_busy']:.2f}",
                 host_mb=f"{r.get('peak_host_mb') or 0:.0f}", gpu_mb=f"{r.get('peak_gpu_mb') or 0:.0f}",
                 vs_base=f"{vs:.2f}x" if vs else "")
    cells.update({k: f"{b[k]:.0f}" if k in b else "" for k in STAGES})
    return cells


def format_table(out: dict) -> str:
    head = (f"{'pipeline':18s}{'dev':>4s}{'batch':>6s}{'img/s':>8s}{'med ms':>8s}{'p90 ms':>8s}"
            f"{'decode':>8s}{'jitter':>8s}{'masks':>7s}{'c-p':>7s}{'hand':>7s}{'cores':>6s}{'RSS MB':>8s}{'GPU MB':>8s}{'vs base':>8s}")
    rows = [head]
    for r in out["results"]:
        c = row_cells(r)
        rows.append(f"{c['pipeline']:18s}{c['device']:>4s}{c['batch']:>6s}{c['images_per_s']:>8s}"
                    f"{c['ms_median']:>8s}{c['ms_p90']:>8s} " + "".join(f"{c[k]:>7s}" for k in STAGES)
                    + f"{c['cores']:>6s}{c['host_mb']:>8s}{c['gpu_mb']:>8s}"
                    + (f"{c['vs_base']:>8s}" if c["vs_base"] else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    p = cli.ArgumentParser(prog="python -m pipelines.profile", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", nargs="+", default=["all"], choices=list(PIPELINES) + ["all"],
                   help="one or more pipelines, or all (default)")
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic dataset)")
    cli.add_dataset_flag(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--batch-size", type=cli.COUNT, default=8)
    p.add_argument("--threads", type=cli.COUNT, default=2, help="DALI threads (= baseline DataLoader workers)")
    p.add_argument("--iters", type=cli.COUNT, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=cli.NON_NEGATIVE, default=3, help="untimed batches first")
    p.add_argument("--out-size", type=cli.PIXELS, default=None, help="canvas side (default: the preset's 1024)")
    p.add_argument("--baseline", action="store_true", help="also time the PyTorch DataLoader baseline")
    p.add_argument("--resampler", default=None, choices=RESAMPLERS,
                   help="who resamples the jittered images (default: torch on the CPU, DALI on the GPU)")
    p.add_argument("--json", default=None, help="write all figures and machine facts here")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(PIPELINES) if "all" in a.pipeline else list(dict.fromkeys(a.pipeline))
    out = run(names, a.coco_root, a.device, a.batch_size, a.threads, a.iters, a.warmup, a.baseline, a.out_size,
              dataset=a.dataset, resampler=a.resampler)
    out["command"] = "python -m pipelines.profile " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(out))
    if a.json:
        from dali_scp.files import atomic_write
        from pathlib import Path
        atomic_write(Path(a.json), json.dumps(out, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
