"""dali-scp beside the loaders its users run today, timed in one run on the same images, batch size and
worker / thread count: mmdetection 3.3's seed train pipeline with and without ``CopyPaste``,
torchvision's reference train dataset with and without ``SimpleCopyPaste``, the project's own DataLoader
baseline, and dali-scp's ``ssj_scp``, ``ssj`` and decode-only CPU pipelines.

    python benchmarks/anchors/run.py --vision ~/src/vision              # a torchvision checkout
    python benchmarks/anchors/run.py --vision DIR --mmdet-python /opt/mmdet/bin/python --rounds 5

Rounds interleave the loaders (each round in a rotated order), every loader in a fresh process of its
own environment (``loaders.py``: what each loader is, exactly), so a noisy neighbour hits all of them and
the ratios come from the same minutes. Per loader: the median of the rounds' images/s, their range, CPU
seconds per 100 images (processes and worker processes); the ratios of dali-scp to each anchor, round by
round. Writes benchmarks/anchors/results.json and its section of benchmarks/RESULTS.md, and prints the
README's rows.

Side environments, never the project's: the torchvision loaders run in this Python (the installed
torchvision) on the reference scripts of ``--vision``, a source checkout at the installed version
(``git clone --branch v<version> https://github.com/pytorch/vision``); the mmdetection loaders in
``--mmdet-python``, else in a virtual environment this script creates once under the cache folder
(``python -m venv --system-site-packages``, then ``pip install mmengine mmcv-lite==2.1.0 mmdet==3.3.0``:
mmcv-lite has no compiled kernels, and mmdetection's data path calls none, which ``loaders.py`` checks).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from dali_scp import cli  # noqa: E402
LOADERS = ("ours:ssj_scp", "mmdet:ssj_scp", "torchvision:ssj_scp", "baseline:ssj_scp",
           "ours:ssj", "mmdet:ssj", "torchvision:ssj", "baseline:ssj", "ours:decode")
WHAT = {
    "ours": "dali-scp CPU pipeline, DALI's PyTorch iterator",
    "ours-dali-resize": "dali-scp CPU pipeline with DALI's CPU resize (before torch's)",
    "baseline": "the project's DataLoader baseline (pipelines/baseline.py)",
    "mmdet": "mmdetection 3.3 seed config's train_dataloader",
    "torchvision": "torchvision references/detection (lsj preset at SSJ's range)",
}
SUFFIX = {"ssj_scp": " + copy-paste", "ssj": "", "decode": ": read + decode only"}
# dali-scp's pipeline -> the anchors it is compared with, and the targets (ours / anchor)
PAIRS = {"ssj_scp": {"mmdet": 6.0, "torchvision": 5.0, "baseline": None},
         "ssj": {"mmdet": 2.0, "torchvision": 2.0, "baseline": None}}
MMDET_PACKAGES = ["mmengine", "mmcv-lite==2.1.0", "mmdet==3.3.0"]
BEGIN, END = "<!-- anchors: begin (benchmarks/anchors/run.py) -->", "<!-- anchors: end -->"


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def dataset_root(a) -> Path:
    if a.coco_root:
        return Path(a.coco_root)
    from dali_scp.synthetic import default_root
    return default_root(train=a.images, val=8)


def mmdet_python(a) -> str:
    """The mmdetection environment's Python: given, or a virtual environment made once in the cache."""
    if a.mmdet_python:
        py = a.mmdet_python
    else:
        from dali_scp.files import cache_dir
        venv = cache_dir() / "anchors" / "mmdet-venv"
        py = str(venv / "bin" / "python")
        if not Path(py).exists():
            log(f"creating the mmdetection environment in {venv} (once)")
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        ok = subprocess.run([py, "-c", "import mmdet, mmengine, mmcv"], capture_output=True).returncode == 0
        if not ok:
            log(f"installing {' '.join(MMDET_PACKAGES)} into {venv}")
            subprocess.run([py, "-m", "pip", "install", *MMDET_PACKAGES], check=True)
    out = subprocess.run([py, "-c", "import mmdet; print(mmdet.__version__)"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip().startswith("3.3."):
        raise SystemExit(f"{py}: no mmdetection 3.3 there ({(out.stdout + out.stderr).strip()[-200:]}); pass "
                         f"--mmdet-python of an environment with {' '.join(MMDET_PACKAGES)}")
    return py


def vision_checkout(a) -> dict:
    """The reference scripts' source and version; refuses a checkout of another torchvision release."""
    import torchvision
    if not a.vision:
        raise SystemExit("--vision: a torchvision source checkout is needed for torchvision's reference loaders "
                         f"(git clone --branch v{torchvision.__version__.split('+')[0]} "
                         "https://github.com/pytorch/vision), or leave them out with --loaders")
    root = Path(a.vision)
    ref = root / "references" / "detection"
    for f in ("presets.py", "transforms.py", "coco_utils.py", "utils.py", "group_by_aspect_ratio.py"):
        if not (ref / f).is_file():
            raise SystemExit(f"{ref / f}: not found; --vision must be a torchvision source checkout")
    installed = torchvision.__version__.split("+")[0]
    version = (root / "version.txt").read_text().strip() if (root / "version.txt").is_file() else None
    git = subprocess.run(["git", "-C", str(root), "describe", "--tags", "--always", "--dirty"], capture_output=True,
                         text=True)
    described = git.stdout.strip() if git.returncode == 0 else None
    same = version is not None and version.split(".")[:2] == installed.split(".")[:2]
    if not same and not a.allow_version_mismatch:
        raise SystemExit(f"{root}: the checkout's version.txt says {version!r}, the installed torchvision is "
                         f"{installed}: check out the matching release (git -C {root} checkout v{installed}), "
                         "or pass --allow-version-mismatch (recorded in the results)")
    return dict(path=str(root), version_txt=version, git=described, installed=installed, matches=same)


def run_loader(loader: str, python: str, a, root: Path) -> dict:
    cmd = [python, str(HERE / "loaders.py"), loader, "--root", str(root), "--batch", str(a.batch), "--workers",
           str(a.workers), "--warmup", str(a.warmup), "--batches", str(a.batches), "--seed", str(a.seed)]
    if a.vision:
        cmd += ["--vision", str(a.vision)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    load0 = os.getloadavg()[0]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return dict(loader=loader, error=f"took more than --timeout {a.timeout} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        log(f"{loader} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        tail = [ln for ln in out.stderr.splitlines() if ln.strip()]
        return dict(loader=loader, error=f"exit {out.returncode}: {tail[-1] if tail else ''}"[:300])
    res = json.loads(lines[-1])
    res["load_before"], res["load_after"] = load0, os.getloadavg()[0]
    return res


def machine() -> dict:
    facts = dict(platform=platform.platform(), cpu_count=os.cpu_count())
    try:
        facts["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                  if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return facts


def summarise(rounds: list[list[dict]]) -> dict:
    by = {}
    rounds = [[r for r in rnd if "error" not in r] for rnd in rounds]
    for rnd in rounds:
        for r in rnd:
            by.setdefault(r["loader"], []).append(r)
    loaders = {}
    for name, rs in by.items():
        ips = [r["images_per_s"] for r in rs]
        loaders[name] = dict(images_per_s=statistics.median(ips), min=min(ips), max=max(ips), rounds=ips,
                             cpu_s_per_100=statistics.median(100 * r["cpu_s"] / (r["batch"] * r["batches"]) for r in rs),
                             versions=rs[0]["versions"])
    ratios = {}
    for pipe, anchors in PAIRS.items():
        ours = f"ours:{pipe}"
        for fam, target in anchors.items():
            other = f"{fam}:{pipe}"
            per_round = [next(r["images_per_s"] for r in rnd if r["loader"] == ours)
                         / next(r["images_per_s"] for r in rnd if r["loader"] == other)
                         for rnd in rounds if {ours, other} <= {r["loader"] for r in rnd}]
            if per_round:
                ratios[f"{ours}/{other}"] = dict(median=statistics.median(per_round), min=min(per_round),
                                                 max=max(per_round), target=target)
    return dict(loaders=loaders, ratios=ratios)


def label(loader: str) -> str:
    fam, _, pipe = loader.partition(":")
    return WHAT[fam] + SUFFIX[pipe]


def markdown(res: dict) -> str:
    s, m = res["summary"], res["machine"]
    loads = [r[k] for rnd in res["rounds"] for r in rnd if "error" not in r for k in ("load_before", "load_after")]
    failed = [f"`{r['loader']}` in round {k + 1}: {r['error']}" for k, rnd in enumerate(res["rounds"]) for r in rnd
              if "error" in r]
    vers = {}
    for v in s["loaders"].values():
        vers.update(v["versions"])
    vis = res.get("vision") or {}
    lines = [BEGIN, "## Beside mmdetection and torchvision (same images, batch, workers)", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {m.get('cpu_model', '?')} ({m['cpu_count']} CPUs), {res['date']}; load average "
             f"{min(loads):.1f}-{max(loads):.1f} during the run (1-minute, before/after each loader)  ",
             f"Dataset: {res['dataset']} ({res['images']} images), batch {res['batch']}, {res['workers']} DataLoader "
             f"workers = DALI threads, {len(res['rounds'])} interleaved rounds of {res['batches']} timed batches "
             f"after {res['warmup']} untimed  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items()))
             + (f"; torchvision references from {vis.get('path')} (version.txt {vis.get('version_txt')}, "
                f"git {vis.get('git')}{'' if vis.get('matches') else ', NOT the installed release'})" if vis else ""),
             "", "| loader | images/s (median) | range over rounds | CPU s per 100 images |", "|---|---|---|---|"]
    for name in res["loaders"]:
        v = s["loaders"].get(name)
        if v:
            lines.append(f"| {label(name)} (`{name}`) | {v['images_per_s']:.1f} | {v['min']:.1f}-{v['max']:.1f} | "
                         f"{v['cpu_s_per_100']:.1f} |")
    lines += ["", "| dali-scp ÷ anchor, same round | median | range | target |", "|---|---|---|---|"]
    for k, v in s["ratios"].items():
        t = f"≥ {v['target']:.0f}×" + (" (met)" if v["median"] >= v["target"] else " (NOT met)") if v["target"] else ""
        lines.append(f"| `{k}` | {v['median']:.2f}× | {v['min']:.2f}-{v['max']:.2f}× | {t} |")
    lines += [""] + [f"FAILED: {f}  " for f in failed]
    lines += ["What each loader is: `benchmarks/anchors/loaders.py`. CPU seconds count the loader's process and its "
              "worker processes; DALI's threads are in its process.", END]
    return "\n".join(lines)


def readme_rows(res: dict) -> list[str]:
    """The README's results rows: each dali-scp pipeline against mmdetection and torchvision, then the
    project's DataLoader baseline."""
    s = res["summary"]
    rows, base = [], []

    def cell(fam, pipe, name):
        v, r = s["loaders"].get(f"{fam}:{pipe}"), s["ratios"].get(f"ours:{pipe}/{fam}:{pipe}")
        return f"{name} {v['images_per_s']:.1f} img/s (**{r['median']:.1f}×**)" if v and r else None

    for pipe in ("ssj_scp", "ssj"):
        ours = s["loaders"].get(f"ours:{pipe}")
        if not ours:
            continue
        cp = pipe == "ssj_scp"
        parts = [c for c in (cell("mmdet", pipe, "mmdetection 3.3" + (" `CopyPaste`" if cp else " SSJ")),
                             cell("torchvision", pipe, "torchvision references" + (" `SimpleCopyPaste`" if cp else "")))
                 if c]
        what = (f"CPU, {res['machine'].get('cpu_count')} cores, batch {res['batch']}, {res['workers']} workers / "
                f"threads, `{pipe}`") if not rows else f"CPU, same run, `{pipe}`"
        rows.append(f"| {what} | {ours['images_per_s']:.1f} img/s | {'; '.join(parts)} | [1] |")
        b = cell("baseline", pipe, f"`{pipe}`")
        if b:
            base.append(b)
    if base:
        rows.append(f"| CPU, same run, DataLoader baseline (`pipelines/baseline.py`) | — | {'; '.join(base)} | [1] |")
    return rows


def write_section(path: Path, section: str):
    """Replace this script's section of RESULTS.md, or put it before the first section there; the rest of
    the file stays (``benchmarks/run_matrix.py`` keeps it in turn)."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    elif "\n## " in text:
        head, rest = text.split("\n## ", 1)
        text = head + "\n" + section + "\n\n## " + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision", default=None, help="torchvision source checkout (references/detection)")
    p.add_argument("--allow-version-mismatch", action="store_true",
                   help="use a checkout whose version.txt is not the installed torchvision's (recorded)")
    p.add_argument("--mmdet-python", default=None, help="Python of an environment with mmdetection 3.3 "
                   "(default: one made under the cache folder)")
    p.add_argument("--coco-root", default=None, help="COCO layout (default: the COCO-like synthetic set)")
    p.add_argument("--images", type=cli.COUNT, default=512, help="synthetic training images (without --coco-root)")
    p.add_argument("--loaders", nargs="+", default=list(LOADERS),
                   help=f"family:pipeline, any of {', '.join(LOADERS)}, ours-dali-resize:ssj_scp|ssj")
    p.add_argument("--batch", type=cli.COUNT, default=8)
    p.add_argument("--workers", type=cli.COUNT, default=2, help="DataLoader workers = DALI threads")
    p.add_argument("--rounds", type=cli.COUNT, default=3)
    p.add_argument("--batches", type=cli.COUNT, default=20, help="timed batches per loader and round")
    p.add_argument("--warmup", type=cli.NON_NEGATIVE, default=8, help="untimed batches first (worker start-up, full queues)")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--timeout", type=cli.COUNT, default=900, help="seconds one loader may take in one round")
    p.add_argument("--json", default=str(HERE / "results.json"))
    p.add_argument("--md", default=str(HERE.parent / "RESULTS.md"), help="RESULTS.md whose section to rewrite")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    root = dataset_root(a)
    families = {ln.partition(":")[0] for ln in a.loaders}
    vision = vision_checkout(a) if "torchvision" in families else None
    pythons = {fam: sys.executable for fam in families}
    if "mmdet" in families:
        pythons["mmdet"] = mmdet_python(a)
    n_images = len(json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"])
    rounds = []
    for k in range(a.rounds):
        order = a.loaders[k % len(a.loaders):] + a.loaders[:k % len(a.loaders)]
        rnd = []
        for loader in order:
            r = run_loader(loader, pythons[loader.partition(":")[0]], a, root)
            log(f"round {k + 1}/{a.rounds} {loader:26s} " + (f"FAILED {r['error']}" if "error" in r else
                f"{r['images_per_s']:7.1f} img/s  (load {r['load_before']:.1f} -> {r['load_after']:.1f})"))
            rnd.append(r)
        rounds.append(rnd)
    res = dict(command="python benchmarks/anchors/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               date=datetime.date.today().isoformat(), machine=machine(), dataset=str(root), images=n_images,
               batch=a.batch, workers=a.workers, batches=a.batches, warmup=a.warmup, loaders=a.loaders,
               vision=vision, rounds=rounds)
    res["summary"] = summarise(rounds)
    res["readme_rows"] = readme_rows(res)
    section = markdown(res)
    print(section)
    print("\nREADME rows:\n" + "\n".join(res["readme_rows"]))
    if not a.no_write:
        Path(a.json).write_text(json.dumps(res, indent=1))
        write_section(Path(a.md), section)
        log(f"wrote {a.json} and the anchors section of {a.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
