#!/usr/bin/env bash
# Every GPU test and GPU benchmark of the project, in one call (GPU time is scarce).
#   scripts/gpu_check.sh [RESULTS_DIR]        (default: $OUT, else ./gpu_results)
# On the lent GPU machine, after `bash .gpu/K/install.sh && export PYTHONPATH=/tmp/site:$PWD` (see
# shared/tools/gpu-wheels). Exits non-zero when any step fails; a GPU test that cannot run (no CuPy, no
# device, no DALI for CUDA) fails instead of skipping. ~5 minutes on one H100 (measured 2026-11-25, before
# the two training-related steps marked + were added; not yet timed with them). Writes 10 files:
#   gpu_check.log (everything, nvidia-smi first)   gpu_tests.log
#   budget_8x30.json  budget_32x90.json             (kernels, host syncs, stand-in and pool peaks, ms;
#                                                    32x90 + the stages beside a concurrent training step)
#   profile_gpu_b32.json  profile_gpu_b8.json       (ssj and ssj_scp, images/s; b32 also vs the DataLoader)
#   train_gpu.jsonl  train_gpu_ssj.jsonl +          (60 iterations r50_ssj_scp_90k / r50_ssj_90k AMP)
#   eval_gpu.json                                   (COCO evaluation of the ssj_scp checkpoint)
set -uo pipefail
RES=${1:-${OUT:-gpu_results}}
mkdir -p "$RES"
export DALI_SCP_CACHE=${DALI_SCP_CACHE:-/tmp/dali_scp_cache}
export DALI_SCP_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
LOG="$RES/gpu_check.log"
DATA=/tmp/syn_gpu
RUN=/tmp/run_gpu
failed=()
: > "$LOG"

# The lent machine runs one command for at most 10 minutes: every step is cut to what is left of
# GPU_CHECK_SECONDS (default 560) so the results always come back; a step with no time left is failed.
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-560} ))
step() {  # step NAME TIMEOUT_S COMMAND...: log it, time-box it, remember a failure and go on
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 15 ))
  echo; echo "=== $name ($(date +%T), ${left}s left)" | tee -a "$LOG"
  if [ "$left" -lt 20 ]; then echo "!!! NOT RUN (out of time): $name" | tee -a "$LOG"; failed+=("$name (not run)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout -k 30 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "!!! FAILED ($rc): $name" | tee -a "$LOG"; failed+=("$name"); fi
}

nvidia-smi >> "$LOG" 2>&1
step "versions" 60 python3 -c "import nvidia.dali, cupy, torch; print('dali', nvidia.dali.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
step "the GPU path can run here" 60 python3 -c "
from dali_scp.deps import gpu_problem
p = gpu_problem()
print(p or 'yes: CuPy with a CUDA device, DALI for CUDA')
raise SystemExit(1 if p else 0)"
if ((${#failed[@]})); then echo "gpu_check: no usable GPU path here; nothing else would mean anything" | tee -a "$LOG"; exit 1; fi
[ -f "$DATA/annotations/instances_val2017.json" ] || \
step "synthetic dataset (256 train, 32 val images)" 120 python3 -m dali_scp.synthetic --out "$DATA" --train 256 --val 32 --seed 0
step "GPU tests (kernels vs references, GPU stages vs CPU bit for bit, mixed pipeline vs CPU)" 240 \
  bash -c "set -o pipefail; python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=100 tests/test_gpu.py | tee '$RES/gpu_tests.log'"
step "GPU stage budget: batch 8 x 30 instances" 120 python3 -m pipelines.gpu_budget --device gpu --batch-size 8 --instances 30 --json "$RES/budget_8x30.json"
step "GPU stage budget: batch 32 x 90 instances, alone and beside a training step (r50_ssj_scp_90k, 8 images, AMP)" 240 \
  python3 -m pipelines.gpu_budget --device gpu --batch-size 32 --instances 90 --under-training r50_ssj_scp_90k \
  --train-batch 8 --json "$RES/budget_32x90.json"
step "profiler on the GPU: batch 32, ssj and ssj_scp, vs the DataLoader (8 workers)" 300 python3 -m pipelines.profile \
  --coco-root "$DATA" --device gpu --pipeline ssj ssj_scp --batch-size 32 --threads 8 --iters 30 --warmup 5 --baseline \
  --json "$RES/profile_gpu_b32.json"
step "profiler on the GPU: batch 8, ssj and ssj_scp" 180 python3 -m pipelines.profile --coco-root "$DATA" --device gpu \
  --pipeline ssj ssj_scp --batch-size 8 --threads 8 --iters 40 --warmup 10 --json "$RES/profile_gpu_b8.json"
rm -rf "$RUN" "$RUN-ssj"
step "trainer: r50_ssj_scp_90k on one GPU (8 images, AMP), 60 iterations" 420 python3 -m trainer.run --preset r50_ssj_scp_90k \
  --coco-root "$DATA" --out "$RUN" --max-iters 60 --batch-size 8 --amp --no-eval --threads 8
cp "$RUN/metrics.jsonl" "$RES/train_gpu.jsonl" 2>/dev/null
step "trainer: r50_ssj_90k on one GPU (8 images, AMP), 60 iterations (the step time ssj_scp must match)" 300 \
  python3 -m trainer.run --preset r50_ssj_90k --coco-root "$DATA" --out "$RUN-ssj" --max-iters 60 --batch-size 8 --amp \
  --no-eval --threads 8
cp "$RUN-ssj/metrics.jsonl" "$RES/train_gpu_ssj.jsonl" 2>/dev/null
step "evaluation on the GPU with that checkpoint" 240 python3 -m trainer.evaluate --checkpoint "$RUN/ckpt_00000060.pth" \
  --coco-root "$DATA" --device cuda --out "$RUN/eval"
cp "$RUN/eval/metrics.json" "$RES/eval_gpu.json" 2>/dev/null

echo | tee -a "$LOG"
if ((${#failed[@]})); then
  printf 'gpu_check: %d step(s) FAILED:\n' "${#failed[@]}" | tee -a "$LOG"; printf '  - %s\n' "${failed[@]}" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: every step passed" | tee -a "$LOG"
