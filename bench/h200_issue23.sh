#!/usr/bin/env bash
# The GPU measurements of issue 23: bench/scale.py (harness vs TRL GRPO steps at real shapes, raw vLLM, MFU).
# A call carries at most 64 MiB with the ~10 MB tree, and a machine idle 30 s is given back with its files: stage
# the wheel folders into .gpustore/ by back-to-back calls on one warm machine, then run. `bash bench/gpu_stage.sh`
# builds every folder here and prints those calls in order:
#   1. the bundle of ../shared/tools/gpu-wheels/README.md (vLLM 0.26.0, bitsandbytes 0.50.2, pydantic...), one call
#      per folder: command `mkdir -p .gpustore && cp -al .gpu01 .gpustore/`, carry [".gpu01"]; .gpu02, ...
#   2. only on a machine that has vLLM 0.26.0 already (the H200s and H100s lent so far lacked it), instead of 1:
#      command `mkdir -p .gpustore && cp -al .gpupyd .gpubnb .gpustore/`, carry [".gpupyd", ".gpubnb"]
#   3. command `mkdir -p .gpustore && cp -al .gpuarrow .gpustore/`, carry [".gpuarrow"] (pyarrow's 55 MB wheel, for
#      datasets: with the ~10 MB tree it fills a call's 64 MiB alone)
#   4. command `bash bench/h200_issue23.sh [bench/scale.py arguments]`, carry [".gputrl", ".gpures"]
#      (.gputrl: trl 1.16.0, datasets 5.2.0, multiprocess, xxhash, fsspec, dill, 2.6 MB; .gpures:
#      gsm_symbolic.jsonl, and scale-<gpu>.json there, e.g. scale-h200.json, is continued on that GPU model: the ok
#      rows of this very card are kept, every other side named is measured (again); save the call's scale.json back
#      under that name)
#   e.g. bash bench/h200_issue23.sh --shapes qwen2.5-1.5b --quants bf16 --max-new 256
# A call runs at most 10 minutes: sides not started by DEADLINE (default 540 s from the call's start, the wheel
# installs included; a running side is stopped there too), or from the first that an earlier row of it says would not
# finish by then, are left for the next call, which (on the same warm machine) finds /tmp/scale/scale.json and skips
# what is done.
set -uo pipefail
SECONDS=0  # DEADLINE counts from here (an exported SECONDS would be taken over)
export PYTHONPATH=/tmp/site:$PWD QRL_CACHE=/tmp/qrlc TOKENIZERS_PARALLELISM=false  # $PWD: bench/ imports harness
# FlashInfer's sampler compiles with nvcc at engine start (minutes); the engine core stays in the calling process
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
source bench/gpu_install.sh
gpu_install .gpupyd .gpubnb .gpuarrow .gputrl
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/scale
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import importlib.metadata as m; print({p: m.version(p) for p in ('torch', 'transformers', 'peft', 'trl', 'datasets')})"
python -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
# rows are kept per GPU model (.gpures/scale-h100.json, scale-h200.json): --skip-done must not keep another card's
gpu=$(gpu_model)
[ -f ".gpures/scale-${gpu:-gpu}.json" ] && [ ! -f /tmp/scale/scale.json ] && cp ".gpures/scale-${gpu:-gpu}.json" /tmp/scale/scale.json
# --micro-batch 16: 128 x 256 completions at once need 18.6 GiB for one float32 copy of the 152k-wide logits,
# and the harness OOMs on an 80 GB H100 at 1.5B (given again after it, an argument of yours wins)
# --copy-to: the rows reach $OUT after every side, so a call the device stops at its limit (the session's device
# time left can be less than DEADLINE) still brings back the sides it finished
python bench/scale.py --data .gpures/gsm_symbolic.jsonl --work /tmp/scale-work --out /tmp/scale --skip-done \
  --copy-to "$OUT" --micro-batch 16 --deadline "$(( ${DEADLINE:-540} - SECONDS ))" "$@" 2>&1 | grep -v "^\s*$" | tail -60
# each side's output (its tail), one archive: what comes back from a call is limited in files too
rm -rf /tmp/scale-logs && mkdir -p /tmp/scale-logs
for f in /tmp/scale-work/logs/*.log; do [ -f "$f" ] && tail -c 20000 "$f" > "/tmp/scale-logs/${f##*/}"; done
tar czf "$OUT/scale-logs.tgz" -C /tmp scale-logs
