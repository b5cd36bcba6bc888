"""The workflow's parse at the user's shape (dry runs, nothing computed): Llama-3.1-8B's config
(no weights), 8,177 neurons x 100 prompts with the real config and the Slurm profile. Profile
edges (six ``top_downstream_targets`` per neuron) once made the parse quadratic in the neurons:
182 s against 5 s without them (BENCHMARKS.md, "Parse time at the user's shape")."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from workflow_helpers import REPO, jobs_of, snakemake_command, write_workdir


def user_workdir(root: Path, model: Path | str, n_neurons: int = 8177, n_prompts: int = 100,
                 edges_per_neuron: int = 0, census: bool = False, seed: int = 2026) -> Path:
    """A working directory with the real config's settings (``config/llama-3.1-8b.yaml``),
    ``n_neurons`` random neurons over the 32 layers, each with ``edges_per_neuron`` edges in the
    user's format (neuron targets in later layers, logits from the last layer), and
    ``n_prompts`` prompts; ``census``: every neuron of every layer besides."""
    seed_config = yaml.safe_load((REPO / "config/llama-3.1-8b.yaml").read_text())
    overrides = {key: value for key, value in seed_config.items()
                 if key not in ("model", "neurons", "prompts")}
    if census:  # (a census computes every neuron: no candidates to verify)
        overrides["census"] = {"layers": "all"}
        overrides["atp"] = {**overrides["atp"], "verify_candidates": 0}
    workdir = write_workdir(root, str(model), **overrides)
    rng = random.Random(seed)
    units: set[tuple[int, int]] = set()
    while len(units) < n_neurons:
        units.add((rng.randrange(32), rng.randrange(14336)))
    profiles = []
    for index, (layer, neuron) in enumerate(sorted(units)):
        profile = {"neuron_id": f"L{layer}/N{neuron}", "layer": layer, "neuron": neuron,
                   "label": f"profile {index}", "mean_activation": round(rng.gauss(0, 1), 4)}
        if edges_per_neuron:
            profile["top_downstream_targets"] = [
                {"target": (f"{rng.randrange(layer + 1, 32)}_{rng.randrange(14336)}"
                            if layer < 31 else f"L_{rng.randrange(128256)}")
                 + f"_{rng.randrange(150)}", "avg_weight": round(rng.gauss(0, 0.3), 4)}
                for _ in range(edges_per_neuron)]
        profiles.append(profile)
    (workdir / "neurons.json").write_text(json.dumps({"model": "Llama-3.1-8B",
                                                       "profiles": profiles}))
    (workdir / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt_id": f"q{i:03d}", "prompt": f"Clinical question {i}: the answer is",
                    "target": " yes", "distractor": " no"}) + "\n" for i in range(n_prompts)))
    return workdir


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
