"""Known-fatal conditions stop a run once, clearly, and before any work: CUDA unusable in a model
job (no retry of any model job after it) and the Slurm profile's placeholder account (a real run
stops before its first job; a dry run warns)."""

from __future__ import annotations

import pytest

from workflow_helpers import REPO, snakemake, write_workdir


@pytest.mark.slow
def test_cuda_unusable_is_not_retried(tiny_model_dir, tmp_path):
    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), n_prompts=3, device="cuda")
    result = snakemake(workdir, "--cores", "2", "--retries", "2", "all", check=False,
                       env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert "not retried: a model job found CUDA unusable (logs/cuda_unusable.txt): device " \
        "'cuda' requested but CUDA is unusable here" in result.stdout, result.stdout[-4000:]
    # the first failure is the only one: its retry stopped the run before it was started
    assert result.stdout.count("Error in rule cache_clean_runs") == 1, result.stdout[-4000:]
    assert (workdir / "logs/cuda_unusable.txt").exists()
    # the next run starts without it (and fails the same way, once)
    again = snakemake(workdir, "--cores", "2", "--retries", "0", "all", check=False)
    assert "not retried" not in again.stdout and again.returncode != 0


@pytest.mark.slow
def test_placeholder_account_warns_in_a_dry_run_and_stops_a_real_run(tiny_model_dir, tmp_path):
    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), n_prompts=3)
    profile = ("--profile", str(REPO / "profiles/slurm"))
    dry = snakemake(workdir, *profile, "-n")
    assert "slurm_account is still 'CHANGE_ME' in the profile (default-resources)" in dry.stdout
    assert "a real run stops before its first job" in dry.stdout
    real = snakemake(workdir, *profile, check=False)
    assert real.returncode != 0
    assert "slurm_account is still 'CHANGE_ME'" in real.stdout.split("a real run stops")[-1]
    assert "Submitted job" not in real.stdout and not (workdir / "logs").exists()
