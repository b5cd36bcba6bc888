#!/usr/bin/env bash
# Quickstart, command 2: set up .venv/ (with the test tools) and run the whole test suite.
# As root on Debian it also installs what the browser and Slurm tests need (chromium, slurm);
# elsewhere those tests skip, unless REQUIRE_ALL_TESTS=1 (CI) makes a missing piece a failure.
# Extra arguments go to pytest (e.g. -k engine, -x). The suite runs on TEST_WORKERS (2) pytest-xdist
# workers, a test file per worker at a time (module fixtures are built once): the Slurm file,
# mostly waiting on the cluster, on one while the other runs the rest. TEST_WORKERS=0: in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-venv.sh requirements-dev.txt
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v chromium >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends chromium >/dev/null
  fi
  # Slurm: a one-node cluster on localhost with fake GPUs for tests/test_slurm.py (apt packages,
  # daemons started directly; ~20 s the first time). Stopped again at exit if started here. If
  # it fails, the Slurm tests try once more themselves and report why (fail under CI).
  if ! tools/local-slurm.sh status >/dev/null 2>&1; then
    if tools/local-slurm.sh all; then
      trap 'tools/local-slurm.sh stop >/dev/null 2>&1 || true' EXIT
    else
      echo "[test.sh] tools/local-slurm.sh all failed; the Slurm tests will say why" >&2
    fi
  fi
fi
.venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
