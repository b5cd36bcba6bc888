"""The workflow's parse at the user's shape (dry runs, nothing computed): Llama-3.1-8B's config
(no weights), 8,177 neurons x 100 prompts with the real config and the Slurm profile. Profile
edges (six ``top_downstream_targets`` per neuron) once made the parse quadratic in the neurons:
182 s against 5 s without them (BENCHMARKS.md, "Parse time at the user's shape"). And the parse
imports no torch: its import was ~2 s of every parse."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_helpers import REPO, jobs_of, snakemake_command, user_workdir


def dry_run(workdir: Path, jobs: int = 32) -> tuple[float, str]:
    """Seconds and output of ``snakemake -n`` with the Slurm profile (its ``jobs: 32``)."""
    command = snakemake_command(workdir, "-n", "--profile", str(REPO / "profiles/slurm"),
                                "--jobs", str(jobs))
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{output[-6000:]}")
    return seconds, output


@pytest.mark.slow
def test_profile_edges_cost_the_parse_little(tmp_path, llama_8b_dir):
    """The user's job with six edges per neuron parses within 1.5x of the same job without
    edges (measured after a first parse of each, which tokenizes the prompts; best of up to
    three alternating rounds, the machine being shared)."""
    plain = user_workdir(tmp_path / "plain", llama_8b_dir)
    edges = user_workdir(tmp_path / "edges", llama_8b_dir, edges_per_neuron=6)
    for workdir in (plain, edges):
        _, output = dry_run(workdir)
        assert jobs_of(output, "compute_effects")
    times: dict[str, list[float]] = {"plain": [], "edges": []}
    for _ in range(3):
        for name, workdir in (("edges", edges), ("plain", plain)):
            times[name].append(dry_run(workdir)[0])
        if min(times["edges"]) <= 1.5 * min(times["plain"]):
            break
    assert min(times["edges"]) <= 1.5 * min(times["plain"]), times


def modules_loaded(*modules: str) -> set[str]:
    """The heavy libraries (torch, transformers) that importing ``modules`` loads, in a fresh
    interpreter."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'src')!r}); "
            f"[__import__(m) for m in {list(modules)!r}]; "
            "print(__import__('json').dumps([m for m in ('torch', 'transformers') "
            "if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    return set(json.loads(result.stdout))


def test_the_parse_imports_no_torch():
    """The package modules the Snakefile and its rule files import (what every ``snakemake``
    call and every cluster job's parse loads) import neither torch nor transformers; the
    control, a model module, does."""
    rules = [REPO / "Snakefile", *sorted((REPO / "workflow/rules").glob("*.smk"))]
    modules = sorted({name for path in rules for name in re.findall(
        r"^from (neuron_effects[\w.]*) import", path.read_text(), re.MULTILINE)})
    assert "neuron_effects.plan" in modules and len(modules) >= 10, modules
    assert modules_loaded(*modules) == set()
    assert modules_loaded("neuron_effects.model") == {"torch"}
