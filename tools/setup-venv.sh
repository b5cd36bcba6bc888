#!/usr/bin/env bash
# Create .venv/ in the repository root and install the pinned requirements plus this package
# (editable). Usage: tools/setup-venv.sh [requirements.txt|requirements-dev.txt]
# Re-running is quick: pip runs again only when a requirements file or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(basename "$requirements" .txt)-$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "[setup-venv] installing $requirements into .venv/ (first time: about a minute)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements" -e .
  touch "$stamp"
fi
