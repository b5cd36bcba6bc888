#!/usr/bin/env bash
# The real workflow on one GPU at Llama-3.1-8B's shape, in one command (tools/gpu_check.py):
# writes a random bf16 checkpoint, places it in a Hugging Face hub cache (read offline, through
# the prepare_model rule), runs every rule with device: cuda, dry-runs the user's profile shape
# (8,177 neurons x 6 edges, 100 prompts) and prints one JSON object (per-rule timings and
# memory, the validation, rows/s, the parse's seconds, the readout matmul's rows/s per products
# mode) as its last line. Under 8 minutes on one H200 (budget; not yet measured on a GPU).
#
#   tools/gpu-check.sh [--cpu] [--workdir DIR] [--no-parse] [--set KEY=VALUE ...]
#       --cpu: the same steps at toy scale on the CPU; --no-parse: no dry run of the user's
#       profile shape; --set: config overrides
#       (e.g. --set treatment=mean_ablate --set positions=all). Default workdir: ./gpu-check
#   tools/gpu-check.sh --fetch-wheels [PYTHON_VERSION]
#       on a machine WITH a package index, beforehand: downloads into tools/gpu-check-wheels/
#       the wheels of tools/gpu-check-requirements.txt for the GPU machine's Python (default
#       3.12, manylinux x86_64; at most 60 MB) and the demo tokenizer.
#
# Python environment: .venv/ when it exists; otherwise .gpu-check-venv/ is made from $PYTHON
# (default python3: the one with torch) with the machine's own packages visible (torch, transformers, numpy, pandas, pyarrow) and the wheels of
# tools/gpu-check-wheels/ installed into it without any index.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=tools/gpu-check-wheels
if [ "${1:-}" = "--fetch-wheels" ]; then
  python_version=${2:-3.12}
  python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
  rm -rf "$wheels" && mkdir -p "$wheels"
  # connection-pool has no wheel on PyPI: build its (pure Python) wheel here
  grep -v -e '^#' -e '^connection-pool' tools/gpu-check-requirements.txt > "$wheels/binary.txt"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$python_version" --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$wheels" -r "$wheels/binary.txt"
  "$python" -m pip wheel --quiet --no-deps -w "$wheels" \
    "$(grep '^connection-pool' tools/gpu-check-requirements.txt)"
  rm "$wheels/binary.txt"
  PYTHONPATH=src "$python" tools/gpu_check.py --save-tokenizer "$wheels/tokenizer"
  size=$(du -sm "$wheels" | cut -f1)
  echo "[gpu-check] $wheels: ${size} MB" >&2
  [ "$size" -le 60 ] || { echo "[gpu-check] more than 60 MB" >&2; exit 1; }
  exit 0
fi
if [ -x .venv/bin/python ]; then
  python=.venv/bin/python
else
  python=.gpu-check-venv/bin/python
  if [ ! -x "$python" ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages .gpu-check-venv
    "$python" -m pip install --quiet --no-index --find-links "$wheels" \
      -r tools/gpu-check-requirements.txt || {
      rm -rf .gpu-check-venv  # not half an environment that the next call would take as made
      echo "[gpu-check] installing $wheels failed: run tools/gpu-check.sh --fetch-wheels" \
        "beforehand on a machine with a package index" >&2
      exit 1
    }
  fi
fi
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" exec "$python" tools/gpu_check.py "$@"
