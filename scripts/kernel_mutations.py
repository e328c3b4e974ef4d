"""Mutation proof for tests/test_emulated_device.py: plants each bug the emulated device is there to catch
in the real kernel source (a copy of the project, one bug at a time) and runs that test file there, which
must fail. Then prints which of its three runs caught each bug (plain, AddressSanitizer+UBSan,
ThreadSanitizer) and the first line of each failure.

    python scripts/kernel_mutations.py [--only NAME ...] [--json results.json] [--keep]

Minutes of CPU (the test file, ~1.5 min, once unmutated and once per bug); run it under `nice`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_emulated_device.py"
RUNS = {"plain": "test_every_kernel_source_equals_its_twin_through_both_stages",
        "address": "test_every_kernel_is_clean_under_sanitizers[address]",
        "thread": "test_every_kernel_is_clean_under_sanitizers[thread]"}


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    why: str


MUTATIONS = [
    Mutation("removed __syncthreads", "dali_scp/copy_paste.py",
             "hi[0] = hi[1] = -1; s_area = 0; }\n        __syncthreads();\n",
             "hi[0] = hi[1] = -1; s_area = 0; }\n",
             "dst_stats: thread 0 resets the block's shared box and area while the others may already add to them"),
    Mutation("non-atomic min", "dali_scp/raster.py",
             "atomicMin(box + 4 * inst, (int)c0);",
             "box[4 * inst] = min(box[4 * inst], (int)c0);",
             "span_boxes: two spans of one object in one block both read, then both write, the left edge"),
    Mutation("off-by-one grid-stride bound", "dali_scp/raster.py",
             "p < n_poly; p += step", "p <= n_poly; p += step",
             "polygon_edges: one thread too many reads the polygon table's next entry and writes poly_inst[n_poly]"),
    Mutation("16-byte path without its alignment test", "dali_scp/copy_paste.py",
             "if (plane % 16 == 0 && (((unsigned long long)dst | (unsigned long long)src | (unsigned long long)a) & 15) == 0) {",
             "if (plane % 16 == 0) {",
             "paste_masks: uint4 loads and stores on masks that DALI may hand over at any address"),
    Mutation("contracted multiply-add", "dali_scp/raster.py",
             "const double xc = __dadd_rn(x0, __dmul_rn(t, __dsub_rn(x1, x0)));",
             "const double xc = fma(t, __dsub_rn(x1, x0), x0);",
             "crossings: x0 + t * dx rounded once (what NVRTC emits without --fmad=false) instead of twice"),
    Mutation("write one byte past a row", "dali_scp/copy_paste.py",
             "j < 24 && 8 * c + j / 3 < width; ++j)", "j < 24 && 24 * c + j <= 3 * width; ++j)",
             "paste_images (byte path, width not a multiple of 8): the last thread of a row writes its row's end + 1"),
]


def _copy_project(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def _run_tests(tree: Path, cache: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), DALI_SCP_CACHE=cache, PYTHONDONTWRITEBYTECODE="1",
               COLUMNS="1000")  # pytest cuts its summary lines to the terminal's width
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", TEST, "-k",
                        "every_kernel"], cwd=tree, env=env, capture_output=True, text=True)
    caught = {}
    for mode, test in RUNS.items():
        m = re.search(r"^FAILED \S*" + re.escape(test) + r"(?: - (.*))?$", p.stdout, re.M)
        caught[mode] = (m.group(1) or "failed")[:300] if m else None
    return {"returncode": p.returncode, "caught": caught, "seconds": round(time.time() - t0),
            "tail": p.stdout[-1500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation names (default: all six)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies")
    a = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if not a.only or m.name in a.only]
    work = Path(tempfile.mkdtemp(prefix="kernel_mutations_"))
    cache = str(work / "cache")  # shared: only the mutated kernel recompiles
    results = {}
    try:
        base = work / "unmutated"
        _copy_project(base)
        r = _run_tests(base, cache)
        print(f"unmutated: {'passes' if r['returncode'] == 0 else 'FAILS'} ({r['seconds']} s)", flush=True)
        if r["returncode"]:
            print(r["tail"])
            return 2
        results["unmutated"] = r
        for m in todo:
            tree = work / re.sub(r"\W+", "_", m.name)
            _copy_project(tree)
            text = (tree / m.file).read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"{m.name}: the text to mutate occurs {text.count(m.old)} times in {m.file} "
                                 "(the kernel changed: update MUTATIONS)")
            (tree / m.file).write_text(text.replace(m.old, m.new))
            r = _run_tests(tree, cache)
            r["why"] = m.why
            results[m.name] = r
            by = [k for k, v in r["caught"].items() if v]
            print(f"\n{m.name} ({m.why}): {'CAUGHT by ' + ', '.join(by) if by else 'NOT CAUGHT'} ({r['seconds']} s)",
                  flush=True)
            for mode, msg in r["caught"].items():
                print(f"  {mode:8s} {msg if msg else 'passed'}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    missed = [n for n, r in results.items() if n != "unmutated" and not any(r["caught"].values())]
    print("\nevery mutation caught" if not missed else f"\nNOT CAUGHT: {missed}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
