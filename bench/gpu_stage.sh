#!/usr/bin/env bash
# Build here (a machine that reaches PyPI) every folder the GPU scripts carry, then print the device calls that stage
# them on the offline GPU machine, in order. From the repo root, after `make setup` (reasoning-gym writes the data):
#   bash bench/gpu_stage.sh
# Writes (all git-ignored):
#   .gpu01 ... .gpuNN  vLLM 0.26.0, bitsandbytes 0.50.2, ModelOpt 0.47.0 and what they need that the GPU machine
#                      lacks, in folders of at most 60 MB (../shared/tools/gpu-wheels/fetch.sh; about 930 MB)
#   .gpupyd, .gpubnb   pydantic and bitsandbytes alone, at the bundle's versions: for a GPU machine that has vLLM
#   .gputrl            trl 1.16.0 and datasets 5.2.0 with what datasets needs beyond the machine's (2.5 MB)
#   .gpuarrow          pyarrow (about 55 MB: with the ~10 MB tree it fills a call's 64 MiB alone)
#   .gpures/gsm_symbolic.jsonl  300 GSM8K-form problems from reasoning-gym (seed 1234): bench/scale.py's --data
#   .gpures/scale-<gpu>.json    reports/bench-scale-<gpu>/scale.json's rows, which h200_issue23.sh continues
# Folders already built are kept; delete one to rebuild it.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-../shared/tools/gpu-wheels}
PY=${PY:-.venv/bin/python}
pins() { grep -E "^($1)==" "$WHEELS/pins.txt"; }  # the bundle's pin of each named package
platforms=""  # fetch.sh's: a wheel names the oldest glibc it runs on (bitsandbytes: manylinux_2_24)
for p in manylinux_2_5 manylinux1 manylinux2010 manylinux_2_12 manylinux_2_17 manylinux2014 manylinux_2_24 \
         manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms="$platforms --platform ${p}_x86_64"
done
download() {  # download DIR SPEC...: CPython 3.12 x86_64 wheels (the GPU machine's), without their dependencies
  local dir=$1; shift
  [ -d "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1 && { echo "$dir: kept"; return; }
  mkdir -p "$dir"
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      $platforms --platform any -d "$dir" "$@" > "$dir.log" 2>&1; then
    grep -v WARNING "$dir.log" >&2
    rm -rf "$dir" "$dir.log"
    echo "error: $dir: pip could not download $*" >&2
    exit 1
  fi
  rm -f "$dir.log"
  echo "$dir: $(ls "$dir" | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
}
ls -d .gpu01 >/dev/null 2>&1 || bash "$WHEELS/fetch.sh"
download .gpupyd $(pins "pydantic|pydantic-core|annotated-types|typing-inspection")
download .gpubnb $(pins "bitsandbytes")
# datasets 5.2.0's requirements that the machine lacks (dill comes with the bundle): its metadata's ranges
download .gputrl trl==1.16.0 datasets==5.2.0 "multiprocess<0.70.20" xxhash "fsspec<=2026.9.0,>=2023.1.0"
download .gpuarrow "pyarrow>=24.0.0"
mkdir -p .gpures
if [ ! -s .gpures/gsm_symbolic.jsonl ]; then
  "$PY" -c "import json, reasoning_gym as rg; [print(json.dumps({'question': e['question'], 'answer': f\"#### {e['answer']}\"})) for e in rg.create_dataset('gsm_symbolic', seed=1234, size=300)]" > .gpures/gsm_symbolic.jsonl.tmp
  mv .gpures/gsm_symbolic.jsonl.tmp .gpures/gsm_symbolic.jsonl
fi
echo ".gpures/gsm_symbolic.jsonl: $(wc -l < .gpures/gsm_symbolic.jsonl) problems"
for report in reports/bench-scale-h[0-9]*/scale.json; do  # the committed rows: --skip-done continues each GPU model's
  gpu=${report#reports/bench-scale-}; gpu=${gpu%/scale.json}
  [ -f ".gpures/scale-$gpu.json" ] || { cp "$report" ".gpures/scale-$gpu.json"; echo ".gpures/scale-$gpu.json: from $report"; }
done
for d in .gpu[0-9]* .gpupyd .gpubnb .gputrl .gpuarrow; do
  size=$(du -sm "$d" | cut -f1)
  [ "$size" -le 60 ] || echo "warning: $d holds $size MB: with the tree it may not fit one call's 64 MiB" >&2
done
cat <<EOF

Device calls, back to back on one warm machine (one left idle 30 s is given back with its files):
EOF
n=1
for d in $(ls -d .gpu[0-9]* | sort) .gpuarrow; do  # the bundle holds pydantic and bitsandbytes too
  echo "  $n. command \`mkdir -p .gpustore && cp -al $d .gpustore/\`, carry [\"$d\"]"
  n=$((n + 1))
done
echo "  $n. command \`DEADLINE=540 bash bench/h200_issue23.sh ARGS\`, carry [\".gputrl\", \".gpures\"] (ARGS: bench/scale.py's)"
echo "On a machine that has vLLM 0.26.0 already, one call instead of the .gpuNN ones: command"
echo "  \`mkdir -p .gpustore && cp -al .gpupyd .gpubnb .gpustore/\`, carry [\".gpupyd\", \".gpubnb\"]"
