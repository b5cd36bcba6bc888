#!/usr/bin/env bash
# Quickstart, command 1: set up .venv/ and run the embedded default (SmolLM2-135M on the CPU,
# 21 biomedical prompts, 420 neurons) to results/report/report.html.
# Extra arguments go to snakemake (e.g. -n for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-venv.sh requirements.txt
set -x
.venv/bin/snakemake --profile profiles/local "$@"
