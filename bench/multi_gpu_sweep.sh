#!/usr/bin/env bash
# One sweep spread over the GPUs of one host by the local executor (one run per GPU at a time):
#   bash bench/multi_gpu_sweep.sh OUT_DIR
# on a machine with 2+ GPUs. Runs the smoke matrix's bf16 and nf4 cells (2 seeds each: 4 runs, no
# lm-eval) three times: over every visible GPU, over GPU 0 alone (the wall-time comparison), and
# over every GPU again with one run SIGKILLed mid-training on GPU 1 (the others must finish).
# nvidia-smi is sampled every second throughout, so "both GPUs busy at once" can be read off.
set -uo pipefail
OUT=${1:?usage: bench/multi_gpu_sweep.sh OUT_DIR}
mkdir -p "$OUT"
# 4 runs: bf16 and nf4 x seeds 0, 1; the lm-eval block and the zero-lr control dropped
sed -e '/^eval:/,/^$/d' -e '/^include:/,/^$/d' -e 's/quant: \[bf16, nf4, int8\]/quant: [bf16, nf4]/' matrices/smoke.yaml > "$OUT/smoke4.yaml"
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/nvidia-smi.csv" &
SMI=$!

sweep() {  # sweep NAME [env...]: time one sweep into results-NAME
  local name=$1; shift
  local t0=$(date +%s)
  env "$@" python3 -m harness sweep "$OUT/smoke4.yaml" --results "results-$name" --reports "reports-$name" > "$OUT/sweep-$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/walltimes.txt"
}

sweep two-gpus
sweep one-gpu CUDA_VISIBLE_DEVICES=0

# the kill: a run on GPU 1 (its worker's CUDA_VISIBLE_DEVICES) is SIGKILLed once it has trained a while
python3 -m harness sweep "$OUT/smoke4.yaml" --results results-kill --reports reports-kill > "$OUT/sweep-kill.log" 2>&1 &
SWEEP=$!
victim=""
for _ in $(seq 120); do
  for pid in $(pgrep -f "harness.worker results-kill"); do
    if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "CUDA_VISIBLE_DEVICES=1"; then victim=$pid; fi
  done
  [ -n "$victim" ] && break
  sleep 0.5
done
sleep 12
echo "killing worker $victim ($(tr '\0' ' ' < /proc/$victim/cmdline)) on CUDA_VISIBLE_DEVICES=1 at $(date +%T)" | tee "$OUT/kill.txt"
kill -9 "$victim"
wait $SWEEP; echo "kill sweep exit $?" >> "$OUT/kill.txt"
kill $SMI

for name in two-gpus one-gpu kill; do  # flattened: the fetch keeps shallow folders only
  for d in results-$name/smoke4/*/; do
    id=$(basename "$d"); [ -f "$d/env.json" ] || continue
    cp "$d/env.json" "$OUT/$name-$id-env.json"; cp "$d/summary.json" "$OUT/$name-$id-summary.json" 2>/dev/null
  done
  cp "reports-$name/smoke4/report.md" "$OUT/$name-report.md" 2>/dev/null
done
python3 - "$OUT" <<'EOF'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*-env.json")):
    env, summary = json.load(open(f)), json.load(open(f.replace("-env.json", "-summary.json")))
    print(f.rsplit("/", 1)[1][:-9], env.get("cuda_visible_devices"), env.get("gpu_uuid"), env.get("gpu_pci_bus_id"),
          summary.get("status"), summary.get("wall_s"), (summary.get("error") or "")[:80])
EOF
