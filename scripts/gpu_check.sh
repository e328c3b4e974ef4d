#!/usr/bin/env bash
# Every GPU test and GPU benchmark of the project, in one call (GPU time is scarce).
#   scripts/gpu_check.sh RESULTS_DIR        (default: $OUT, else ./gpu_results)
# On the lent GPU machine, after `bash .gpu/K/install.sh && export PYTHONPATH=/tmp/site:$PWD` (see
# shared/tools/gpu-wheels): writes at most 8 files to RESULTS_DIR: gpu_check.log (everything),
# gpu_tests.log, profile_gpu.json, profile_cpu_same_machine.json, train_gpu.jsonl, nvidia_smi.txt.
set -uo pipefail
RES=${1:-${OUT:-gpu_results}}
mkdir -p "$RES"
export DALI_SCP_CACHE=${DALI_SCP_CACHE:-/tmp/dali_scp_cache}
export PYTHONUNBUFFERED=1
LOG="$RES/gpu_check.log"
step() { echo; echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
: > "$LOG"
nvidia-smi > "$RES/nvidia_smi.txt" 2>&1
python3 -c "import nvidia.dali, cupy, torch; print('dali', nvidia.dali.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

step "synthetic dataset (COCO-like, 512 train images)"
python3 -m dali_scp.synthetic --out /tmp/syn512 --train 512 --val 64 --seed 0 >> "$LOG" 2>&1

step "GPU tests (GPU vs CPU on the same inputs)"
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$RES/gpu_tests.log" | tail -n 30 | tee -a "$LOG"

step "pipeline profiler on the GPU: batch 32, all pipelines, vs the DataLoader baseline (8 workers)"
python3 -m pipelines.profile --coco-root /tmp/syn512 --device gpu --pipeline all --batch-size 32 --threads 8 \
  --iters 40 --warmup 5 --baseline --json "$RES/profile_gpu.json" 2>&1 | grep -v "it/s\]" | tee -a "$LOG"

step "pipeline profiler on this machine's CPU: batch 8, 2 threads (compare with the CI machine)"
python3 -m pipelines.profile --coco-root /tmp/syn512 --device cpu --pipeline ssj_scp --batch-size 8 --threads 2 \
  --iters 20 --json "$RES/profile_cpu_same_machine.json" 2>&1 | grep -v "it/s\]" | tee -a "$LOG"

step "trainer: r50_ssj_scp_90k on one GPU (8 images/GPU, AMP), 60 iterations, data time share"
rm -rf /tmp/run_gpu
timeout 420 python3 -m trainer.run --preset r50_ssj_scp_90k --coco-root /tmp/syn512 --out /tmp/run_gpu \
  --max-iters 60 --batch-size 8 --amp --no-eval --threads 8 2>&1 | tr '\r' '\n' | grep -E "^iter|error|Error|resolved|lr" | tee -a "$LOG"
cp /tmp/run_gpu/metrics.jsonl "$RES/train_gpu.jsonl" 2>/dev/null
step "done"
