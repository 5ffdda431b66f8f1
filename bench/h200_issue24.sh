#!/usr/bin/env bash
# The GPU part of issue 24: matrices/mismatch_gpu.yaml (vLLM's NF4 / FP8 weights, an FP8 KV cache with static and
# recalibrated scales), packed on one GPU, and its report. Staging as bench/h200_issue23.sh says (vLLM's .gpuNN
# folders into .gpustore/: `bash bench/gpu_stage.sh` prints the calls), then:
#   bash bench/h200_issue24.sh            carry [".gpures"] (an earlier call's results tarball, saved as
#                                         .gpures/mismatch_gpu-<gpu>.tgz, e.g. -h200, is continued on that GPU model)
#   RETRY=failed bash bench/h200_issue24.sh   runs the failed runs again
#   MATRIX=bench/eval_memory_gpu.yaml bash bench/h200_issue24.sh   another GPU matrix (a name or a file), the same way
#                                         (the in-process eval's memory at 7B; its task file comes in .gpures)
# A call runs at most 10 minutes: the sweep stops at SWEEP_TIMEOUT (default 480 s) and the next call resumes it.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD QRL_CACHE=/tmp/qrlc TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=0
source bench/gpu_install.sh
gpu_install .gpupyd .gpubnb
OUT=${OUT:-/tmp/out} MATRIX=${MATRIX:-mismatch_gpu}
NAME=$(basename "${MATRIX%.yaml}")  # results/NAME, as the harness names a matrix file's sweep
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import vllm, bitsandbytes; print('vllm', vllm.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
# results are continued per GPU model only (.gpures/$NAME-h100.tgz, -h200.tgz): one report, one card
gpu=$(gpu_model)
tgz=.gpures/$NAME-${gpu:-gpu}.tgz
if [ -f "$tgz" ] && [ ! -d "results/$NAME" ]; then mkdir -p results && tar xzf "$tgz" -C results; fi
# SIGINT: the sweep records the runs it stops as killed and the next call resumes them from their checkpoints
time timeout -s INT "${SWEEP_TIMEOUT:-480}" python -m harness sweep "$MATRIX" --runs-per-gpu auto --wandb off \
  --reports /tmp/rep ${RETRY:+--retry "$RETRY"} 2>&1 | grep -v "^\s*$" | tail -40
python -m harness report "$NAME" --reports /tmp/rep 2>&1 | tail -3
# one archive (what comes back from a call is limited in files): the report, the results without weights, and the
# worker logs of runs that did not end ok
mkdir -p /tmp/pack && rm -rf /tmp/pack/* && cp -r "/tmp/rep/$NAME" /tmp/pack/report
for d in "results/$NAME"/*/; do
  grep -q '"status": "ok"' "$d/summary.json" 2>/dev/null || tail -c 6000 "$d/worker.log" > "/tmp/pack/log-$(basename "$d").txt" 2>/dev/null
done
tar czf "$OUT/$NAME.tgz" -C results --exclude=adapter --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='checkpoint*' --exclude='.rollout_sync' "$NAME" -C /tmp pack
ls -la "$OUT"
