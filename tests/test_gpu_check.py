"""tools/gpu-check.sh --cpu: the GPU check's steps at toy scale, which is also the workflow's end-to-end
run with treatment mean_ablate and positions all, every row checked against the reference and
the clean records and activation statistics against a direct computation."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

from conftest import REPO
from direct_checks import assert_clean_runs_match_direct_computation

RULES = {"cache_clean_runs", "extract_activations", "compute_effects", "estimate_attribution",
         "summarize_attribution", "aggregate_block", "aggregate_effects", "validate_sample"}


@pytest.mark.slow
def test_gpu_check_on_the_cpu_with_mean_ablate_at_every_position(demo_model_path, tmp_path):
    workdir = tmp_path / "gpu-check"
    finished = subprocess.run(
        [str(REPO / "tools/gpu-check.sh"), "--cpu", "--workdir", str(workdir), "--cores", "2",
         "--set", "treatment=mean_ablate", "--set", "positions=all",
         "--set", "validation.pairs=24"],
        capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["scale"] == "cpu" and result["snakemake_exit"] == 0
    assert set(result["rules"]) == RULES
    for rule, entry in result["rules"].items():
        assert entry["jobs"] >= 1 and entry["wall_s"] > 0 and entry["peak_rss_mb"] > 0, rule
        assert entry["work_s"] + entry["fixed_s"] == pytest.approx(entry["wall_s"], abs=0.02)
        assert entry["peak_gpu_gib"] is None  # no CUDA on the CPU
    assert result["rules"]["compute_effects"]["jobs"] == 2
    assert result["rows"] == 2 * 12 and result["rows_per_s"] > 0
    validation = result["validation"]
    assert validation["passed"] is True, validation["failure"]
    assert validation["reference_dtype"] == "float64" and validation["non_finite_columns"] == []
    # every (prompt, neuron) row of the run was recomputed by the reference
    pairs = pd.read_parquet(workdir / "results/validation/pairs.parquet")
    per_prompt = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    assert len(pairs) == len(per_prompt) == 24
    assert (per_prompt["scale"] != -per_prompt["activation"]).all()  # mean_ablate: s = mean - a
    # prompts are chat turns of about 150 tokens
    prompts = pd.read_parquet(workdir / "results/summary/prompts.parquet")
    assert prompts["n_tokens"].between(140, 220).all()
    assert prompts["text"].str.contains("<|im_start|>assistant\n", regex=False).all()
    assert_clean_runs_match_direct_computation(workdir, workdir / "model", 100, 0.1)
    # the random model predicts none of the targets: listed in the log and the report
    assert prompts["target_low_rank"].all()
    page = (workdir / "results/report/report.html").read_text()
    assert 'id="low-rank-targets"' in page and "2 of 2 prompts" in page
