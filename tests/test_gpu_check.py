"""tools/gpu-check.sh --cpu: the GPU check's steps at toy scale, which is also the workflow's end-to-end
run with treatment mean_ablate and positions all, every row checked against the reference and
the clean records and activation statistics against a direct computation. Run in a folder that an
earlier run left (its results, cache, logs, benchmarks and a checkpoint of another shape): the run
computes everything again and counts nothing of the earlier one (what a second run in one folder
does, without paying for two runs); the checkpoint of the same shape kept is tested directly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO
from direct_checks import assert_clean_runs_match_direct_computation

RULES = {"prepare_model", "cache_clean_runs", "extract_activations", "compute_effects", "estimate_attribution",
         "summarize_attribution", "aggregate_block", "aggregate_effects", "validate_sample"}


def run_gpu_check(workdir, *options: str) -> dict:
    finished = subprocess.run(
        [str(REPO / "tools/gpu-check.sh"), "--cpu", "--workdir", str(workdir), "--cores", "2",
         "--set", "treatment=mean_ablate", "--set", "positions=all",
         "--set", "validation.pairs=24", *options],
        capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def assert_everything_computed(result: dict, workdir, since: float) -> None:
    """Every rule ran and did work in this run; the shards logged their units during it."""
    assert result["scale"] == "cpu" and result["snakemake_exit"] == 0
    assert result["transformers"] and result["torch"]
    assert set(result["rules"]) == RULES
    for rule, entry in result["rules"].items():
        assert entry["jobs"] >= 1 and entry["wall_s"] > 0 and entry["peak_rss_mb"] > 0, rule
        assert entry["peak_gpu_gib_allocated"] is None  # no CUDA on the CPU
        assert entry["peak_gpu_gib_reserved"] is None
    for rule in ("cache_clean_runs", "compute_effects", "estimate_attribution",
                 "validate_sample"):  # the model jobs log their work ("... in X s")
        assert result["rules"][rule]["work_s"] > 0, rule
    shard_logs = list((workdir / "logs/compute_effects").glob("*.log"))
    assert shard_logs and all(log.stat().st_mtime >= since for log in shard_logs)
    # the automatic plan at the real job's operating point: one shard here
    assert result["rules"]["compute_effects"]["jobs"] == result["plan"]["shards"] == 1
    assert result["plan"]["jobs"] == result["plan"]["estimated_jobs"] == 4
    assert result["plan"]["estimated_fixed_s"] > 0 and result["plan"]["measured_fixed_s"] > 0
    assert result["rows"] == 2 * 12 and result["rows_per_s"] > 0
    assert result["edges"] > 0
    # the model came from a hub cache through prepare_model (links to the snapshot's blobs)
    assert result["model_source"] == "hub-snapshot"
    prepared = workdir / "resources/prepared/neuron-effects-check--random-llama"
    assert (prepared / "config.json").resolve().parent.name == "blobs"
    products = result["products"]
    assert products["rows"] == 64
    products = {key: value for key, value in products.items() if key not in ("measured", "rows")}
    assert set(products) == {"float32", "split_bf16_2", "split_bf16_3"}
    assert all(entry["rows_per_s"] > 0 for entry in products.values())
    # float32 and 3 parts are float32-accurate; 2 parts keep 16 bits of the hidden state
    assert products["split_bf16_3"]["max_abs_err"] < 1e-4
    assert products["float32"]["max_abs_err"] < 1e-4
    assert products["split_bf16_2"]["max_abs_err"] > products["split_bf16_3"]["max_abs_err"]


@pytest.mark.slow
def test_gpu_check_on_the_cpu_with_mean_ablate_at_every_position(demo_model_path, tmp_path):
    workdir = tmp_path / "gpu-check"
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("not the check's")
    refused = subprocess.run([str(REPO / "tools/gpu-check.sh"), "--cpu", "--workdir",
                              str(tmp_path / "other")], capture_output=True, text=True)
    assert refused.returncode != 0 and "give an empty or new folder" in refused.stderr
    assert (tmp_path / "other/notes.txt").exists()
    # a folder left by an earlier run (the marker, its results, cache, logs and benchmarks, and
    # a checkpoint of another shape): the run computes everything again and counts nothing old
    stale = {"results/validation/summary.json": '{"passed": true}',
             "results/cache/effects/old/entry.json": "{}",
             "logs/compute_effects/L00-03_c000.log": "rows computed: 0, reused: 99",
             "benchmarks/compute_effects/old.tsv": "s\n999\n",
             "model/config.json": '{"num_hidden_layers": 99}', ".gpu-check-workdir": ""}
    for name, text in stale.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    since = time.time()
    result = run_gpu_check(workdir)
    assert_everything_computed(result, workdir, since)
    assert not (workdir / "results/cache/effects/old").exists()
    assert not (workdir / "benchmarks/compute_effects/old.tsv").exists()
    assert (workdir / "model/config.json").stat().st_mtime >= since  # another shape: rebuilt
    # the parse at the profile's shape, scaled down: 200 neurons x 6 edges, 10 prompts, on the
    # checkpoint's 4 layers (a dry run of the hub id, offline)
    parse = result["parse"]
    assert (parse["neurons"], parse["edges"], parse["prompts"], parse["layers"]) == (
        200, 1200, 10, 4)
    assert parse["first_s"] > 0 and parse["again_s"] > 0
    assert parse["cluster_job_fixed_s"] > parse["again_s"]
    assert parse["cost_model_startup_s"] > 0 and parse["cost_model_job_fixed_s"] > 0
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


def test_a_second_run_keeps_only_a_checkpoint_of_its_shape(tmp_path):
    """clear_workdir: everything of an earlier run goes but the marker and a checkpoint of the
    same shape (a second run in one folder computes all again without rebuilding 16 GB)."""
    sys.path.insert(0, str(REPO / "tools"))
    from gpu_check import WORKDIR_MARK, clear_workdir

    shape = {"num_hidden_layers": 4, "hidden_size": 64}
    for name in (WORKDIR_MARK, "results/cache/effects/x.json", "logs/a.log", ".snakemake/x",
                 "hf-home/hub/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text(json.dumps(shape))
    clear_workdir(tmp_path, shape)
    assert sorted(path.name for path in tmp_path.iterdir()) == [WORKDIR_MARK, "model"]
    clear_workdir(tmp_path, {**shape, "num_hidden_layers": 32})
    assert sorted(path.name for path in tmp_path.iterdir()) == [WORKDIR_MARK]
