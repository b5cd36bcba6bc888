"""Only new work runs: the demo's edits, each counted in the rows its jobs computed.

After a full run of the embedded demo (SmolLM2-135M, 21 prompts, 420 neurons, the default
``sharding: auto``) in a scratch folder, each edit of the inputs is made to the original inputs,
the workflow runs again, and the ``rows computed: N, reused: M`` lines of the compute_effects
logs that run wrote are added up (with the clean runs' ``prompts computed``). Then the original
inputs come back: nothing is computed, and ``per_prompt.parquet`` equals the first run's.

    .venv/bin/python benchmarks/bench_edits.py [--workdir DIR]

Prints a markdown table (the BENCHMARKS.md section "Only new work runs").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPUTED = re.compile(r"(rows|prompts) computed: (\d+), reused: (\d+)")
NEW_PROMPT = {"prompt_id": "vitamin_c", "prompt": "Sailors on long voyages once suffered from a "
              "disease caused by a lack of fresh fruit. The disease caused by a lack of vitamin "
              "C is called", "target": " scurvy", "distractor": " rickets"}


def run(workdir: Path) -> tuple[float, dict[str, list[int]]]:
    """Run the workflow in ``workdir``; its wall time and, per model rule, [computed, reused]
    summed over the logs its jobs wrote."""
    started = time.time()
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
               "--profile", str(REPO / "profiles/local")]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stdout[-5000:] + result.stderr[-5000:])
    wall = time.time() - started
    counts: dict[str, list[int]] = {}
    for log in (workdir / "logs").rglob("*.log"):
        if log.stat().st_mtime < started:
            continue  # not written by this run
        for _, computed, reused in COMPUTED.findall(log.read_text()):
            rule = log.parent.name
            totals = counts.setdefault(rule, [0, 0])
            totals[0] += int(computed)
            totals[1] += int(reused)
    return wall, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-edits-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config.update(model=str(REPO / config["model"]), neurons="neurons.json",
                  prompts="prompts.jsonl")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    prompts = (REPO / "config/demo/prompts.jsonl").read_text().splitlines()
    profile = json.loads((REPO / "config/demo/medical_neurons_demo.json").read_text())

    def write_inputs(prompt_lines: list[str], document: dict) -> None:
        (workdir / "prompts.jsonl").write_text("\n".join(prompt_lines) + "\n")
        (workdir / "neurons.json").write_text(json.dumps(document, indent=1))

    write_inputs(prompts, profile)
    first_wall, first = run(workdir)
    rows = sum(first["compute_effects"])
    reference = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    added = {"neuron_id": "L14/N7", "layer": 14, "neuron": 7, "selection": "added"}
    assert all((p["layer"], p["neuron"]) != (14, 7) for p in profile["profiles"])
    retarget = json.loads(prompts[0])
    edits = {
        "add one prompt": (prompts + [json.dumps(NEW_PROMPT)], profile),
        "add one neuron": (prompts, {**profile, "profiles": profile["profiles"] + [added]}),
        "change one prompt's target": (
            [json.dumps({**retarget, "target": " Pasteur", "distractor": " Fleming"}),
             *prompts[1:]], profile),
        "remove one neuron": (prompts, {**profile, "profiles": profile["profiles"][1:]}),
        "go back to the original inputs": (prompts, profile),
    }
    lines = ["| edit | rows computed | rows reused | share computed | clean runs computed | "
             "wall |", "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| first full run | {first['compute_effects'][0]} | {first['compute_effects'][1]} "
             f"| 100 % | {first['cache_clean_runs'][0]} | {first_wall:.0f} s |"]
    for edit, (prompt_lines, document) in edits.items():
        write_inputs(prompt_lines, document)
        wall, counts = run(workdir)
        computed, reused = counts.get("compute_effects", [0, 0])
        clean = counts.get("cache_clean_runs", [0, 0])[0]
        lines.append(f"| {edit} | {computed} | {reused} | {100 * computed / rows:.1f} % | "
                     f"{clean} | {wall:.0f} s |")
        print(lines[-1], flush=True)
    final = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    equal = final.equals(reference)
    print("\n".join(lines))
    print(f"\nper_prompt.parquet after going back equals the first run's: {equal}")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
