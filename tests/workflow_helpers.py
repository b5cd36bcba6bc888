"""Running the real workflow in a scratch directory (used by the workflow and Slurm tests)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# A shard's log line for each unit it computes (not for those it finds already saved).
UNIT = re.compile(r"INFO unit (n\d+_p\d+) ")


def write_workdir(
    root: Path, model: str, n_prompts: int = 6, neurons_per_layer: int = 3, n_layers: int = 6,
    **overrides: Any,
) -> Path:
    """A working directory with a config (the repo's defaults, then ``overrides``; nested dicts
    are merged), the first ``n_prompts`` demo prompts (each with two fields of the user's own,
    ``source`` and ``rank``) and a profile file in the user's shape with ``neurons_per_layer``
    neurons in each of ``n_layers`` layers."""
    root.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "config/demo/prompts.jsonl").read_text().splitlines()[:n_prompts]
    records = [{**json.loads(line), "source": "demo", "rank": rank}
               for rank, line in enumerate(lines)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    profiles = [{"neuron_id": f"L{layer}/N{7 * k + layer}", "layer": layer,
                 "neuron": 7 * k + layer, "label": f"test neuron {k}", "tags": ["kept"]}
                for layer in range(n_layers) for k in range(neurons_per_layer)]
    for profile in profiles[::neurons_per_layer]:  # downstream edges in the user's format
        profile["top_downstream_targets"] = [
            {"target": f"{profile['layer'] + 1}_{n}_9", "avg_weight": weight}
            for n, weight in ((5, 0.4), (11, -0.3))] + [
            {"target": "L_42_9", "avg_weight": 0.2}, {"target": "E_13_0", "avg_weight": 0.1}]
    (root / "neurons.json").write_text(json.dumps({"source": "test", "profiles": profiles},
                                                  indent=1))
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config.update(model=model, neurons="neurons.json", prompts="prompts.jsonl")
    config["sharding"] = {"layers_per_shard": 2, "prompts_per_chunk": 3}
    config["validation"] = {**config["validation"], "pairs": 4}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def user_workdir(root: Path, model: Path | str, n_neurons: int = 8177, n_prompts: int = 100,
                 edges_per_neuron: int = 0, census: bool = False, seed: int = 2026,
                 n_layers: int = 32, intermediate: int = 14336, vocab: int = 128256) -> Path:
    """A working directory with the real config's settings (``config/llama-3.1-8b.yaml``),
    ``n_neurons`` random neurons over the ``n_layers`` layers of ``intermediate`` neurons (the
    defaults: Llama-3.1-8B's), each with ``edges_per_neuron`` edges in the user's format (neuron
    targets in later layers, logits of a ``vocab``-token vocabulary from the last layer), and
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
        units.add((rng.randrange(n_layers), rng.randrange(intermediate)))
    profiles = []
    for index, (layer, neuron) in enumerate(sorted(units)):
        profile = {"neuron_id": f"L{layer}/N{neuron}", "layer": layer, "neuron": neuron,
                   "label": f"profile {index}", "mean_activation": round(rng.gauss(0, 1), 4)}
        if edges_per_neuron:
            profile["top_downstream_targets"] = [
                {"target": (f"{rng.randrange(layer + 1, n_layers)}_{rng.randrange(intermediate)}"
                            if layer < n_layers - 1 else f"L_{rng.randrange(vocab)}")
                 + f"_{rng.randrange(150)}", "avg_weight": round(rng.gauss(0, 0.3), 4)}
                for _ in range(edges_per_neuron)]
        profiles.append(profile)
    (workdir / "neurons.json").write_text(json.dumps({"model": "Llama-3.1-8B",
                                                       "profiles": profiles}))
    (workdir / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt_id": f"q{i:03d}", "prompt": f"Clinical question {i}: the answer is",
                    "target": " yes", "distractor": " no"}) + "\n" for i in range(n_prompts)))
    return workdir


def snakemake_command(workdir: Path, *arguments: str) -> list[str]:
    """The command that runs the repository's Snakefile in ``workdir`` with its ``config.yaml``."""
    return [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), *arguments]


def snakemake(workdir: Path, *arguments: str, check: bool = True, timeout: float = 900,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run :func:`snakemake_command`; output captured (stdout and stderr together)."""
    result = subprocess.run(snakemake_command(workdir, *arguments), cwd=workdir,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    result.stdout = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-8000:]}")
    return result


def copy_run(source: Path, destination: Path) -> Path:
    """A copy of a finished run that Snakemake sees as up to date (mtimes and metadata kept;
    the Slurm job logs of a cluster run are left behind)."""
    shutil.copytree(source, destination, symlinks=True)
    shutil.rmtree(destination / ".snakemake" / "slurm_logs", ignore_errors=True)
    assert "Nothing to be done" in snakemake(destination, "-n").stdout
    return destination


def move_neuron(workdir: Path, neuron_id: str, new_index: int) -> str:
    """Edit one profile of ``workdir/neurons.json``: neuron ``neuron_id`` gets index
    ``new_index`` (and the matching id, returned), its layer and other fields unchanged."""
    path = workdir / "neurons.json"
    document = json.loads(path.read_text())
    profile = next(p for p in document["profiles"] if p["neuron_id"] == neuron_id)
    profile.update(neuron=new_index, neuron_id=f"L{profile['layer']}/N{new_index}")
    path.write_text(json.dumps(document, indent=1))
    return profile["neuron_id"]


def executed_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """``(rule, wildcards)`` of every job block Snakemake printed (run, touch or dry run), in
    order: the blocks start with ``rule X:``, ``localrule X:``, ``checkpoint X:`` or
    ``localcheckpoint X:``."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in output.splitlines():
        header = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line)
        if header:
            jobs.append((header.group(1), {}))
        elif jobs and line.startswith("    wildcards: "):
            jobs[-1][1].update(
                part.split("=", 1) for part in line[len("    wildcards: "):].split(", "))
    return jobs


def jobs_of(output: str, rule: str) -> set[str]:
    """The jobs of ``rule`` in Snakemake's output, named by their wildcard values joined by
    ``_`` (``L00-01_c000`` for a shard, ``c000`` for a chunk)."""
    return {"_".join(wildcards.values()) for name, wildcards in executed_jobs(output)
            if name == rule}
