"""How long must the ``demo`` recipe train before its AP means something? Trains it from scratch for
each schedule length N (the recipe's schedule stretched to N: warm-up unchanged, the lr step at 80%
of N), evaluates on the synthetic val split and writes one row per N.

Why: on a 2-core CPU the README's first command can afford ~100-200 iterations; this separates "the
recipe cannot learn the data" from "the run is too short" by measuring the curve where iterations are
cheap (a GPU), so the CPU demo's AP can be read against it.

    python benchmarks/demo_convergence.py --iters 200 1000 3000 [--device cuda] [--json curve.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_scp import presets  # noqa: E402


def stretched(base: presets.Recipe, n: int) -> presets.Recipe:
    steps = tuple(max(int(round(s * n / base.max_iters)), base.warmup_iters + 1) for s in base.steps)
    return replace(base, name=f"{base.name}_{n}", max_iters=n, steps=steps, checkpoint_every=n)


def main(argv=None) -> int:
    from dali_scp import cli
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=cli.COUNT, nargs="+", default=[200, 1000, 3000], help="schedule lengths to train")
    p.add_argument("--preset", default="demo", help="the recipe to stretch (default: demo)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--coco-root", default=None, help="default: the embedded synthetic dataset")
    p.add_argument("--out", default="runs/convergence", help="one run folder per schedule below this")
    p.add_argument("--threads", type=cli.COUNT, default=None)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe fields to change first, values as JSON (e.g. lr=0.04 anchor_sizes=[16,32,64,128,256])")
    a = p.parse_args(argv)
    from trainer import run as run_mod
    base = presets.recipe(a.preset)
    changes = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        if not hasattr(base, k):
            p.error(f"--set {kv}: the recipe has no field {k!r}")
        v = json.loads(v)
        changes[k] = tuple(v) if isinstance(v, list) else v
    if "image_size" in changes and "eval_resize" not in changes:
        s = changes["image_size"]
        changes["eval_resize"] = presets.EvalResize(max_long=s, max_short=s, pad_divisor=base.eval_resize.pad_divisor)
    base = replace(base, **changes)
    rows = []
    for n in a.iters:
        r = stretched(base, n)
        presets.RECIPES[r.name] = r  # registered so the trainer and the checkpoint name it
        argv = ["--preset", r.name, "--out", f"{a.out}/{r.name}"]
        argv += ["--coco-root", a.coco_root] if a.coco_root else []
        argv += ["--device", a.device] if a.device else []
        argv += ["--threads", str(a.threads)] if a.threads else []
        t = time.time()
        s = run_mod.train(run_mod.parse_args(argv))
        m = s["metrics"]
        row = dict(preset=a.preset, changes={k: str(v) for k, v in changes.items()}, iters=n, steps=list(r.steps), wall_s=round(time.time() - t, 1),
                   box_ap=round(100 * m["bbox"]["AP"], 1), mask_ap=round(100 * m["segm"]["AP"], 1),
                   box_ap50=round(100 * m["bbox"]["AP50"], 1), mask_ap50=round(100 * m["segm"]["AP50"], 1))
        rows.append(row)
        print("CONVERGENCE " + json.dumps(row), flush=True)
    print(f"\n{'iters':>6} {'wall s':>7} {'box AP':>7} {'mask AP':>8} {'box AP50':>9} {'mask AP50':>10}")
    for r in rows:
        print(f"{r['iters']:>6} {r['wall_s']:>7} {r['box_ap']:>7} {r['mask_ap']:>8} {r['box_ap50']:>9} {r['mask_ap50']:>10}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
