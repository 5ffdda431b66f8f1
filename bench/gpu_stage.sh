#!/usr/bin/env bash
# Build here (a machine that reaches PyPI) every folder the GPU scripts carry, then print the device calls that stage
# them on the offline GPU machine, in order. From the repo root, after `make setup` (reasoning-gym writes the data):
#   bash bench/gpu_stage.sh
# Writes (all git-ignored):
#   .gpu01 ... .gpuNN  vLLM 0.26.0, bitsandbytes 0.50.2, ModelOpt 0.47.0 and what they need that the GPU machine
#                      lacks (../shared/tools/gpu-wheels/fetch.sh; about 930 MB), in folders that fit one call with
#                      the tree (64 MiB less the tree and a margin: about 54 MB)
#   .gpupyd, .gpubnb   pydantic and bitsandbytes alone, at the bundle's versions: for a GPU machine that has vLLM
#   .gputrl            trl 1.16.0 and datasets 5.2.0 with what datasets needs beyond the machine's, dill included
#                      (2.6 MB: an in-process call needs no bundle)
#   .gpuarrow          pyarrow (about 55 MB: with the ~10 MB tree it fills a call's 64 MiB alone)
#   .gpures/gsm_symbolic.jsonl  300 GSM8K-form problems from reasoning-gym (seed 1234): bench/scale.py's --data
#   .gpures/scale-<gpu>.json    reports/bench-scale-<gpu>/scale.json's rows, which h200_issue23.sh continues; once
#                               there it is the master copy (each call's scale.json goes back to it), never replaced
# Folders downloaded whole for the same versions are kept; the bundle is repacked when a folder would not fit a call.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-../shared/tools/gpu-wheels}
PY=${PY:-.venv/bin/python}
pins() {  # the bundle's pin of each named package; a name it lacks is an error, not a silent omission
  local name pin
  for name in "$@"; do
    pin=$(grep -iE "^$name==" "$WHEELS/pins.txt") || { echo "error: $WHEELS/pins.txt pins no $name" >&2; exit 1; }
    echo "$pin"
  done
}
platforms=""  # fetch.sh's: a wheel names the oldest glibc it runs on (bitsandbytes: manylinux_2_24)
for p in manylinux_2_5 manylinux1 manylinux2010 manylinux_2_12 manylinux_2_17 manylinux2014 manylinux_2_24 \
         manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms="$platforms --platform ${p}_x86_64"
done
download() {  # download DIR SPEC...: CPython 3.12 x86_64 wheels (the GPU machine's), without their dependencies
  local dir=$1; shift
  # kept only when it was downloaded whole for these same specs (an interrupted run leaves DIR.tmp, never DIR)
  [ "$(cat "$dir/.specs" 2>/dev/null)" = "$*" ] && { echo "$dir: kept"; return; }
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      $platforms --platform any -d "$dir.tmp" "$@" > "$dir.log" 2>&1; then
    grep -v WARNING "$dir.log" >&2 || true
    rm -rf "$dir.tmp" "$dir.log"
    echo "error: $dir: pip could not download $*" >&2
    exit 1
  fi
  rm -f "$dir.log"
  echo "$*" > "$dir.tmp/.specs"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "$dir: $(ls "$dir" | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
}
missing_pins() {  # the bundle's pins with no wheel of that name and version in .gpuwheels (fetch.sh ignores pip's failures)
  local pin name version have
  have=$(ls .gpuwheels 2>/dev/null | tr 'A-Z' 'a-z')  # once: `ls | grep -q` fails under pipefail when grep stops early
  grep -v '^#' "$WHEELS/pins.txt" | while read -r pin; do
    [ -z "$pin" ] && continue
    name=$(echo "${pin%%==*}" | tr 'A-Z-' 'a-z_'); version=${pin#*==}
    grep -q "^${name}-${version}-" <<< "$have" || echo "$pin"
  done
}
# A call carries the tree (tracked and untracked files git does not ignore) and its folders: 64 MiB in all
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1048576 - tree - 2500000))  # the margin: the tree grows between staging and the calls
repack=""
if [ -n "$(missing_pins)" ]; then
  bash "$WHEELS/fetch.sh"
  [ -z "$(missing_pins)" ] || { echo "error: no wheel in .gpuwheels for: $(missing_pins | tr '\n' ' ')" >&2; exit 1; }
  repack=1
fi
files_bytes() { find "$@" -type f -printf '%s\n' | awk '{ n += $1 } END { print n + 0 }'; }  # du counts folders too
for d in .gpu[0-9]*; do [ -d "$d" ] && [ "$(files_bytes "$d")" -gt "$limit" ] && repack=1; done
ls -d .gpu01 >/dev/null 2>&1 || repack=1
if [ -n "$repack" ]; then  # fetch.sh packs 60 MB folders: with the tree, over a call's 64 MiB
  python3 "$WHEELS/pack.py" .gpuwheels . "$limit"
  cp "$WHEELS/install.sh" .gpu01/
fi
echo "bundle: $(ls -d .gpu[0-9]* | wc -l) folders of at most $limit bytes (the tree: $tree)"
download .gpupyd $(pins pydantic pydantic-core annotated-types typing-inspection)
download .gpubnb $(pins bitsandbytes)
# datasets 5.2.0's requirements that the machine lacks, at the versions stop 36 resolved; dill at the bundle's pin:
# an in-process call runs before the bundle is staged, and datasets reads dill's version on import (stop 38's crash)
download .gputrl trl==1.16.0 datasets==5.2.0 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 $(pins dill)
download .gpuarrow pyarrow==26.0.1
mkdir -p .gpures
if [ ! -s .gpures/gsm_symbolic.jsonl ]; then
  "$PY" -c "import json, reasoning_gym as rg; [print(json.dumps({'question': e['question'], 'answer': f\"#### {e['answer']}\"})) for e in rg.create_dataset('gsm_symbolic', seed=1234, size=300)]" > .gpures/gsm_symbolic.jsonl.tmp
  mv .gpures/gsm_symbolic.jsonl.tmp .gpures/gsm_symbolic.jsonl
fi
echo ".gpures/gsm_symbolic.jsonl: $(wc -l < .gpures/gsm_symbolic.jsonl) problems"
for report in reports/bench-scale-h[0-9]*/scale.json; do  # the committed rows: --skip-done continues each GPU model's
  [ -f "$report" ] || continue
  gpu=${report#reports/bench-scale-}; gpu=${gpu%/scale.json}
  [ -f ".gpures/scale-$gpu.json" ] || { cp "$report" ".gpures/scale-$gpu.json"; echo ".gpures/scale-$gpu.json: from $report"; }
done
for d in .gpu[0-9]* .gpupyd,.gpubnb .gputrl,.gpures .gpupyd,.gpubnb,.gputrl,.gpures .gpuarrow; do  # what each call carries
  size=$(files_bytes ${d//,/ })
  [ $((size + tree)) -le $((64 * 1048576)) ] || echo "warning: ${d//,/ } and the tree: $((size + tree)) bytes, over a call's 64 MiB" >&2
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
echo "In-process sides only (harness, trl), measuring within a minute of the machine's start: the .gpuarrow call, then"
echo "  \`DEADLINE=540 bash bench/h200_issue23.sh ARGS\`, carry [\".gpupyd\", \".gpubnb\", \".gputrl\", \".gpures\"] (stop 38);"
echo "  the .gpuNN calls may follow on that machine for the vLLM sides"
