#!/usr/bin/env bash
# The GPU path proved, then benchmarked, in one command on a lent GPU machine (~15 minutes of device time
# in all, several of them to start it; one command at most 10 minutes).
#   scripts/gpu_check.sh [RESULTS_DIR]        (default: $OUT, else ./gpu_results)
#
# Part 1, the proof (at most 4 minutes of wall time, the wheels' install included; GPU_CHECK_PROOF_SECONDS,
# default 240, cuts its steps so the verdict is written by then):
#   install the wheels    bash .gpu/K/install.sh when DALI is not importable and the parts are here
#                         (shared/tools/gpu-wheels; docs/gpu.md), then PYTHONPATH=/tmp/site:$PWD
#   proof tests           every raw kernel against its NumPy twin under xp.shadow_twins on the stages' batches
#                         (320, 100, 320 unaligned), and the GPU pipelines (ssj, ssj_scp) equal to the CPU ones
#   throughput            one batch-32 figure of ssj_scp at 1024^2 with decode-only in the same run
#   training step         one AMP step of r50_ssj_scp_90k (8 images)
# and RESULTS_DIR/verdict.txt (one screen: each check, its number, PASS/FAIL) is written before anything else.
# Part 2, the benchmarks, with what is left of GPU_CHECK_SECONDS (default 560): the remaining GPU tests,
# the stage budgets (8x30, 32x90 beside a training step), the profiles at batch 32 (vs the DataLoader) and 8,
# 60 iterations of r50_ssj_scp_90k and r50_ssj_90k, evaluation of that checkpoint; merged into
# RESULTS_DIR/benchmarks.json after every step. Comes back (4 files): verdict.txt, proof.json,
# benchmarks.json, gpu_check.log (everything, nvidia-smi first). Exits non-zero when any step fails.
#
# GPU_CHECK_STUB=1: every step that needs the GPU (or DALI, CuPy) prints "STUB" instead of running, so the
# rest (dataset, verdict, merging) runs and is timed on any machine.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-${OUT:-gpu_results}}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
rm -rf "$WORK" && mkdir -p "$WORK"
export DALI_SCP_CACHE=${DALI_SCP_CACHE:-/tmp/dali_scp_cache}
export DALI_SCP_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
STUB=${GPU_CHECK_STUB:-0}
LOG="$RES/gpu_check.log"
DATA=/tmp/syn_gpu
RUN=/tmp/run_gpu
PART=1
PROOF_K="every_kernel_equals_its_numpy_twin or gpu_pipeline_matches_cpu_pipeline"  # tests/test_gpu.py: 5 tests
failed=()
: > "$LOG"
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_SECONDS:-560} ))
PROOF_DEADLINE=$(( START + ${GPU_CHECK_PROOF_SECONDS:-240} - 5 ))  # part 1's steps are cut to end by then

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$PART" >> "$WORK/steps.tsv"; }
# step NAME TIMEOUT_S gpu|cpu COMMAND...: log it, time-box it to what is left, record PASS/FAIL/STUB
step() {
  local name=$1 limit=$2 kind=$3; shift 3
  local end=$(( DEADLINE - 15 )) t0
  [ "$PART" = 1 ] && end=$PROOF_DEADLINE
  local left=$(( end - $(date +%s) ))
  echo; echo "=== $name ($(date +%T), $(( $(date +%s) - START )) s in, ${left} s left)" | tee -a "$LOG"
  if [ "$kind" = gpu ] && [ "$STUB" = 1 ]; then
    echo "STUB (GPU_CHECK_STUB=1): $*" | tee -a "$LOG"; record "$name" STUB 0; return 0
  fi
  if [ "$left" -lt 10 ]; then
    echo "!!! NOT RUN (out of time): $name" | tee -a "$LOG"; failed+=("$name (not run)"); record "$name" "NOT RUN" 0; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  timeout -k "$([ "$PART" = 1 ] && echo 5 || echo 30)" "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|img/s\]$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "!!! FAILED ($rc): $name" | tee -a "$LOG"; failed+=("$name"); record "$name" FAIL $(( $(date +%s) - t0 )); return 1
  fi
  record "$name" PASS $(( $(date +%s) - t0 ))
}

{ nvidia-smi || echo "(no nvidia-smi)"; } >> "$LOG" 2>&1

# ---- part 1: the proof ----------------------------------------------------------------------------------
# the dataset (CPU only) is made while the wheels install and the tests run
( if [ -f "$DATA/annotations/instances_val2017.json" ]; then echo 0; else
    python3 -m dali_scp.synthetic --out "$DATA" --train 256 --val 32 --seed 0 > "$WORK/dataset.log" 2>&1; echo $?
  fi > "$WORK/dataset.rc" ) &
DATASET_PID=$!
DATASET_T0=$(date +%s)

if ! python3 -c "import nvidia.dali" 2>/dev/null; then
  INSTALL=$(ls .gpu/*/install.sh 2>/dev/null | sort -t/ -k2 -n | tail -1)
  if [ -n "$INSTALL" ]; then
    step "install the wheels" 150 gpu bash "$INSTALL" && export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
fi
step "versions" 60 gpu python3 -c "
import nvidia.dali, cupy, torch
v = f'{torch.cuda.get_device_name(0)}, DALI {nvidia.dali.__version__}, CuPy {cupy.__version__}, torch {torch.__version__}'
print(v)
open('$WORK/versions.txt', 'w').write(v)"
step "the GPU path can run here" 60 gpu python3 -c "
from dali_scp.deps import gpu_problem
p = gpu_problem()
print(p or 'yes: CuPy with a CUDA device, DALI for CUDA')
raise SystemExit(1 if p else 0)"
step "proof tests" 150 gpu bash -c "set -o pipefail; python3 -m pytest -q -rf -p no:cacheprovider -o faulthandler_timeout=100 \
  tests/test_gpu.py -k '$PROOF_K' | tee '$WORK/proof_tests.log'"
wait "$DATASET_PID"
if [ "$(cat "$WORK/dataset.rc")" = 0 ]; then record "synthetic dataset (256 train, 32 val)" PASS $(( $(date +%s) - DATASET_T0 ))
else cat "$WORK/dataset.log" >> "$LOG"; failed+=("synthetic dataset"); record "synthetic dataset (256 train, 32 val)" FAIL 0; fi
step "throughput" 120 gpu python3 -m pipelines.profile --coco-root "$DATA" --device gpu --pipeline ssj_scp --batch-size 32 \
  --threads 8 --iters 20 --warmup 5 --json "$WORK/profile_quick.json"
rm -rf "$WORK/train_step"
step "training step" 150 gpu python3 -m trainer.run --preset r50_ssj_scp_90k --coco-root "$DATA" --out "$WORK/train_step" \
  --max-iters 1 --batch-size 8 --amp --no-eval --threads 8
echo; echo "=== verdict ($(( $(date +%s) - START )) s in)" | tee -a "$LOG"
python3 scripts/gpu_verdict.py verdict "$WORK" "$RES" 2>&1 | tee -a "$LOG" || failed+=("verdict (see verdict.txt)")
echo "gpu_check: part 1 took $(( $(date +%s) - START )) s of wall time" | tee -a "$LOG" "$RES/verdict.txt"
if grep -q "^the GPU path can run here	FAIL" "$WORK/steps.tsv"; then
  echo "gpu_check: no usable GPU path here; the benchmarks would mean nothing" | tee -a "$LOG"; exit 1
fi

# ---- part 2: the benchmarks -----------------------------------------------------------------------------
PART=2
merge() { python3 scripts/gpu_verdict.py merge "$WORK" "$RES" >> "$LOG" 2>&1; }
step "the other GPU tests (rasteriser and copy-paste vs CPU, stand-in counts, stage errors)" 200 gpu bash -c \
  "set -o pipefail; python3 -m pytest -q -rf -p no:cacheprovider -o faulthandler_timeout=100 tests/test_gpu.py \
  -k 'not ($PROOF_K)' | tee '$WORK/gpu_tests.log'"; merge
step "GPU stage budget: batch 8 x 30 instances" 120 gpu python3 -m pipelines.gpu_budget --device gpu --batch-size 8 \
  --instances 30 --json "$WORK/budget_8x30.json"; merge
step "GPU stage budget: batch 32 x 90 instances, alone and beside a training step (r50_ssj_scp_90k, 8 images, AMP)" 240 gpu \
  python3 -m pipelines.gpu_budget --device gpu --batch-size 32 --instances 90 --under-training r50_ssj_scp_90k \
  --train-batch 8 --json "$WORK/budget_32x90.json"; merge
step "profiler on the GPU: batch 32, ssj and ssj_scp, vs the DataLoader (8 workers)" 300 gpu python3 -m pipelines.profile \
  --coco-root "$DATA" --device gpu --pipeline ssj ssj_scp --batch-size 32 --threads 8 --iters 30 --warmup 5 --baseline \
  --json "$WORK/profile_gpu_b32.json"; merge
step "profiler on the GPU: batch 8, ssj and ssj_scp" 180 gpu python3 -m pipelines.profile --coco-root "$DATA" --device gpu \
  --pipeline ssj ssj_scp --batch-size 8 --threads 8 --iters 40 --warmup 10 --json "$WORK/profile_gpu_b8.json"; merge
rm -rf "$RUN" "$RUN-ssj"
step "trainer: r50_ssj_scp_90k on one GPU (8 images, AMP), 60 iterations" 420 gpu python3 -m trainer.run \
  --preset r50_ssj_scp_90k --coco-root "$DATA" --out "$RUN" --max-iters 60 --batch-size 8 --amp --no-eval --threads 8
cp "$RUN/metrics.jsonl" "$WORK/train_gpu.jsonl" 2>/dev/null; merge
step "trainer: r50_ssj_90k on one GPU (8 images, AMP), 60 iterations (the step time ssj_scp must match)" 300 gpu \
  python3 -m trainer.run --preset r50_ssj_90k --coco-root "$DATA" --out "$RUN-ssj" --max-iters 60 --batch-size 8 --amp \
  --no-eval --threads 8
cp "$RUN-ssj/metrics.jsonl" "$WORK/train_gpu_ssj.jsonl" 2>/dev/null; merge
step "evaluation on the GPU with that checkpoint" 240 gpu python3 -m trainer.evaluate --checkpoint "$RUN/ckpt_00000060.pth" \
  --coco-root "$DATA" --device cuda --out "$RUN/eval"
cp "$RUN/eval/metrics.json" "$WORK/eval_gpu.json" 2>/dev/null; merge

echo | tee -a "$LOG"
echo "gpu_check: $(( $(date +%s) - START )) s of wall time in all" | tee -a "$LOG"
if ((${#failed[@]})); then
  printf 'gpu_check: %d step(s) FAILED:\n' "${#failed[@]}" | tee -a "$LOG"; printf '  - %s\n' "${failed[@]}" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: every step passed$([ "$STUB" = 1 ] && echo ' (GPU steps stubbed)')" | tee -a "$LOG"
