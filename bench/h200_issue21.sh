#!/usr/bin/env bash
# The H200 measurements of issue 21, one phase per device call (a call is at most 10 minutes, and a
# machine idle 30 s is given back with its files, so each phase carries back what the next needs).
#   carry: .gpupyd (pydantic wheels), .gpumo (ModelOpt and its missing dependencies), .gpures (earlier phases' results)
#   bash bench/h200_issue21.sh study        # the packed 48-run seed study, then 2 seeds x 2 cells one run per GPU
#   bash bench/h200_issue21.sh calibration  # calibration.yaml, adaptive, reusing the study's runs; then resampled
#   bash bench/h200_issue21.sh nvfp4        # grpo_nvfp4.yaml, adaptive, packed
# Everything it writes for this machine goes under $OUT.
set -uo pipefail
phase=$1
pip install -q --no-deps --target /tmp/site .gpupyd/*.whl .gpumo/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD QRL_CACHE=/tmp/qrlc  # $PWD: the bench/ scripts import harness
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "from harness.models.tiny_arith import shipped, checksum, SHIPPED; print('shipped model', shipped(), checksum(SHIPPED))"

pack() {  # results folder of one matrix, without checkpoints, for the next phase and for the record
  tar czf "$OUT/$2.tgz" -C "$1" --exclude=adapter --exclude='*.safetensors' --exclude='*.pt' --exclude='checkpoint*' "$2"
}

case $phase in
study)
  timeout 420 python bench/packing.py seed_study --runs-per-gpu auto --work /tmp/pk --out "$OUT/packing-auto.json" 2>&1 | tail -8
  python -m harness report seed_study --results /tmp/pk/rpg-auto/results --reports "$OUT/reports" 2>&1 | tail -4
  mv "$OUT/reports/seed_study" "$OUT/reports/seed_study-h200"
  pack /tmp/pk/rpg-auto/results seed_study
  cp /tmp/pk/sweep-rpg-auto.log "$OUT/"
  # one run per GPU, as the local executor ran before: 2 seeds of both cells (4 runs, one after another)
  timeout 150 python bench/packing.py seed_study --runs-per-gpu 1 --seeds 2 --work /tmp/pk1 --out "$OUT/packing-1.json" 2>&1 | tail -4
  cp /tmp/pk1/sweep-rpg-1.log "$OUT/" 2>/dev/null
  ;;
calibration)
  mkdir -p results/calibration
  tar xzf .gpures/seed_study.tgz -C /tmp && for d in /tmp/seed_study/*/; do cp -r "$d" results/calibration/; done
  time timeout 330 python -m harness sweep calibration --runs-per-gpu auto --wandb off --reports /tmp/rep 2>&1 | grep -v "^\s*$" | tail -25
  mkdir -p "$OUT/reports" && cp -r /tmp/rep/calibration "$OUT/reports/calibration-h200"
  # resampling pools: the broken controls to 8 seeds (the A/A cell and the baseline have the study's 24)
  timeout 150 python - <<'EOF'
import harness
m = harness.load("calibration")
planned = {c.name: (24 if c.name in ("quant=bf16", "quant=bf16 (A/A)") else 8) for c in m.cells}
plan = harness.plan(m, "results", planned=planned, wandb="off")
harness.execute(plan, harness.settings(runs_per_gpu="auto"), on_event=lambda e: print(e) if "Planned" in type(e).__name__ else None)
EOF
  python bench/calibration.py results/calibration --trials 2000 --out "$OUT/reports/calibration-h200/calibration.md"
  pack results calibration
  ;;
nvfp4)
  time timeout 480 python -m harness sweep grpo_nvfp4 --runs-per-gpu auto --wandb off --reports /tmp/rep 2>&1 | grep -v "^\s*$" | tail -30
  mkdir -p "$OUT/reports" && cp -r /tmp/rep/grpo_nvfp4 "$OUT/reports/grpo_nvfp4-h200"
  pack results grpo_nvfp4
  ;;
esac
ls -la "$OUT"
