# Sourced by bench/h200_issue23.sh and h200_issue24.sh: `gpu_install FOLDER...` installs into /tmp/site, once per
# machine, vLLM 0.26 from the .gpuNN folders staged in .gpustore/ (../shared/tools/gpu-wheels/README.md), then
# each named folder's wheels (.gpupyd: pydantic; .gpubnb: bitsandbytes; .gpuarrow: pyarrow; .gputrl: trl and datasets), carried this
# call or staged by an earlier one. The caller exports PYTHONPATH=/tmp/site:...
wheels() {  # a folder's wheels, carried this call or staged in .gpustore by an earlier one
  if ls "$1"/*.whl >/dev/null 2>&1; then ls "$1"/*.whl; else ls ".gpustore/$1"/*.whl 2>/dev/null; fi
}
gpu_install() {
  mkdir -p /tmp/site
  if ! python -c "import vllm" 2>/dev/null && [ -d .gpustore/.gpu01 ]; then
    # as .gpustore/.gpu01/install.sh, over the .gpuNN folders alone: the folders staged beside them pin other
    # versions of some of the same packages (pydantic), which pip refuses to install together
    rm -rf /tmp/gpuwhl && mkdir -p /tmp/gpuwhl
    find .gpustore/.gpu[0-9]* -name '*.whl' -exec cp -l {} /tmp/gpuwhl/ \;
    for first in $(find .gpustore/.gpu[0-9]* -name '*.whl.part00'); do
      whl=$(basename "${first%.part00}")
      cat $(find .gpustore/.gpu[0-9]* -name "$whl.part*" -printf '%f %p\n' | sort | cut -d" " -f2) > "/tmp/gpuwhl/$whl"
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/gpuwhl/*.whl \
      2>&1 | grep -v WARNING | tail -2
  fi
  for d in "$@"; do
    [ -f "/tmp/site/.installed$d" ] && continue
    files=$(wheels "$d")
    if [ -n "$files" ]; then
      pip install -q --no-deps --upgrade --target /tmp/site $files 2>&1 | grep -v WARNING | tail -2
      touch "/tmp/site/.installed$d"
    fi
  done
}

gpu_model() {  # the first GPU's model, lower case (h100, h200, ...): results are kept apart per model
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|b200' | tr A-Z a-z
}
