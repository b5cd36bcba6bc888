#!/usr/bin/env bash
# Create .venv/ in the repository root and install the pinned requirements plus this package
# (editable). Usage: tools/setup-venv.sh [--torch-index URL] [requirements.txt|requirements-dev.txt]
# Re-running is quick: pip runs again only when a requirements file, pyproject.toml or the torch
# index changed.
#
# Another torch build (e.g. for an older NVIDIA driver): --torch-index URL or TORCH_INDEX_URL=URL,
# a PyTorch wheel index such as https://download.pytorch.org/whl/cu126 (driver R525+) or
# .../whl/cu130 (R580+; TORCH_CUDA_BUILDS in src/neuron_effects/torch_builds.py lists the
# builds). The pinned torch version is installed from there first; the rest from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_index=${TORCH_INDEX_URL:-}
if [ "${1:-}" = "--torch-index" ]; then
  torch_index=${2:?"--torch-index needs a URL"}
  shift 2
fi
requirements=${1:-requirements.txt}
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(basename "$requirements" .txt)-$( (cat requirements*.txt pyproject.toml; echo "$torch_index") | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  if [ -n "$torch_index" ]; then
    torch_pin=$(grep -E '^torch==' requirements.txt)
    build=$(basename "$torch_index")  # cu126, cpu, ...: the local version label of its wheels
    if [[ $build =~ ^(cu[0-9]+|cpu|rocm[0-9.]+)$ ]]; then
      torch_pin="$torch_pin+$build"  # replaces an installed torch of another build
    fi
    echo "[setup-venv] installing $torch_pin from $torch_index" >&2
    "${pip[@]}" --index-url "$torch_index" "$torch_pin"
  fi
  echo "[setup-venv] installing $requirements into .venv/ (first time: about a minute)" >&2
  "${pip[@]}" -r "$requirements" -e .
  touch "$stamp"
fi
