"""The one-screen verdict of scripts/gpu_check.sh's first part, and the merged results of its second.

    python scripts/gpu_verdict.py verdict WORK RES     writes RES/verdict.txt and RES/proof.json
    python scripts/gpu_verdict.py merge WORK RES       (re)writes RES/benchmarks.json from what part 2 wrote

WORK holds the steps' own files (steps.tsv: name, status, seconds, part; pytest logs; profile JSON;
training metrics.jsonl); RES is what comes back from the lent machine (8 files at most), so everything
else is merged into two JSON files there.
"""
from __future__ import annotations

import json
import math
import re
import sys
import textwrap
from pathlib import Path

def _steps(work: Path) -> list[dict]:
    out = []
    f = work / "steps.tsv"
    for line in (f.read_text().splitlines() if f.exists() else []):
        name, status, secs, part = line.split("\t")
        out.append({"step": name, "status": status, "seconds": int(secs), "part": int(part)})
    return out


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def _pytest(path: Path) -> dict:
    text = path.read_text() if path.exists() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)\b", text)}
    failed = re.findall(r"^FAILED (\S+)", text, re.M)
    return {"counts": counts, "failed": failed}


def verdict(work: Path, res: Path) -> int:
    steps = {s["step"]: s for s in _steps(work) if s["part"] == 1}
    versions = (work / "versions.txt").read_text().strip() if (work / "versions.txt").exists() else "?"
    tests = _pytest(work / "proof_tests.log")
    prof = _json(work / "profile_quick.json") or {}
    rows = {r["pipeline"]: r for r in prof.get("results", [])}
    train = _jsonl(work / "train_step" / "metrics.jsonl")
    from dali_scp import copy_paste, raster  # noqa: F401 - registers the kernels
    from dali_scp.xp import KERNELS

    def status(name):
        return steps.get(name, {}).get("status", "NOT RUN")

    lines, checks = [], {}

    def line(st, text, check):
        checks[check] = st
        lines.append(f"{st:7s} {text}")

    lines.append(f"gpu_check part 1, the proof, on {versions}")
    lines.append("seconds per step: " + ", ".join(f"{k} {v['seconds']}" for k, v in steps.items() if v["status"] != "STUB"))
    n = tests["counts"].get("passed", 0)
    st = status("proof tests")
    if st == "PASS" and n != 5:  # a renamed or deselected test is no proof
        st = "FAIL"
    line(st, f"raw kernels = NumPy twins byte for byte (shadow_twins, all {len(KERNELS)} kernels, batches 320 / 100 / "
             f"320 unaligned) and GPU pipelines = CPU pipelines (ssj, ssj_scp): {n} of 5 tests passed"
             + (f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else ""), "proof tests")
    dec, scp = rows.get("decode-only"), rows.get("ssj_scp")
    st = status("throughput")
    if dec and scp:
        line(st, f"throughput at batch 32, 1024^2, 8 DALI threads: ssj_scp {scp['images_per_s']:.0f} img/s, "
                 f"decode-only {dec['images_per_s']:.0f} img/s in the same run (masks {scp['stage_ms'].get('masks', 0):.1f} ms, "
                 f"copy-paste {scp['stage_ms'].get('copy_paste', 0):.1f} ms a batch)", "throughput")
    else:
        line("FAIL" if st == "PASS" else st, "throughput at batch 32: no figure", "throughput")
    st = status("training step")
    if train:
        t = train[-1]
        finite = all(math.isfinite(float(t[k])) for k in t if k.startswith("loss"))
        if not finite and st == "PASS":
            st = "FAIL"
        line(st, f"AMP training step, r50_ssj_scp_90k, 8 images: loss {t['loss']:.3f} ({'finite' if finite else 'NOT FINITE'}), "
                 f"{t['step_time']:.2f} s (a first step: cuDNN's autotuning included), waited {t['data_time'] * 1e3:.0f} ms "
                 f"for data, {t.get('gpu_mem_gb', 0):.1f} GB", "training step")
    else:
        line("FAIL" if st == "PASS" else st, "AMP training step: no metrics written", "training step")
    failed = [name for name, s in steps.items() if s["status"] not in ("PASS", "STUB") and name not in checks]
    failed += [name for name, st in checks.items() if st not in ("PASS", "STUB")]
    stubbed = [name for name, s in steps.items() if s["status"] == "STUB"]
    if failed:
        lines.append(f"VERDICT: FAILED ({', '.join(failed)}); see gpu_check.log")
    elif stubbed:
        lines.append(f"VERDICT: none (GPU steps stubbed: {', '.join(stubbed)})")
    else:
        lines.append("VERDICT: the GPU path works (kernels, stages and pipelines equal their references; "
                     "it trains)")
    lines.append("part 2 (benchmarks) follows in gpu_check.log and benchmarks.json")
    text = "\n".join(textwrap.fill(x, 110, subsequent_indent=" " * 8) for x in lines) + "\n"
    (res / "verdict.txt").write_text(text)
    (res / "proof.json").write_text(json.dumps({"steps": list(steps.values()), "versions": versions, "tests": tests,
                                                "profile": prof, "training": train}, indent=1) + "\n")
    print(text, end="")
    return 1 if failed else 0


def merge(work: Path, res: Path) -> int:
    doc = {"steps": [s for s in _steps(work) if s["part"] == 2],
           "gpu_tests": _pytest(work / "gpu_tests.log")}
    for key, name in (("budget_8x30", "budget_8x30.json"), ("budget_32x90", "budget_32x90.json"),
                      ("profile_b32", "profile_gpu_b32.json"), ("profile_b8", "profile_gpu_b8.json"),
                      ("eval", "eval_gpu.json")):
        doc[key] = _json(work / name)
    doc["train_ssj_scp"] = _jsonl(work / "train_gpu.jsonl")
    doc["train_ssj"] = _jsonl(work / "train_gpu_ssj.jsonl")
    (res / "benchmarks.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    what, work, res = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    sys.exit({"verdict": verdict, "merge": merge}[what](work, res))
