#!/usr/bin/env bash
# The GPU measurements of issue 22 (real shapes, bf16 and nf4; nf4 as loaded before the fix for comparison).
#   carry: .gpupyd (pydantic wheels), .gpubnb (bitsandbytes 0.50.2), .gpures (gsm_symbolic.jsonl: bench/shapes.py says how)
#   bash bench/h200_issue22.sh [SHAPES] [QUANTS] [--legacy-nf4]
set -uo pipefail
[ -d /tmp/site/pydantic ] || pip install -q --no-deps --target /tmp/site .gpupyd/*.whl .gpubnb/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD QRL_CACHE=/tmp/qrlc TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f /tmp/shapes/shapes.json ] && mkdir -p "$OUT/shapes" && cp /tmp/shapes/shapes.json "$OUT/shapes/" 2>/dev/null
python bench/shapes.py --data .gpures/gsm_symbolic.jsonl --shapes "${1:-qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b}" \
  --quants "${2:-bf16,nf4}" ${3:-} --work /tmp/shapes-work --out /tmp/shapes 2>&1 | tail -20
cp /tmp/shapes/shapes.json "$OUT/"
