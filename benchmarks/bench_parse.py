"""Benchmark of the workflow's parse at the user's shape: a dry run (``snakemake -n``) of
``config/llama-3.1-8b.yaml`` with the Slurm profile on Llama-3.1-8B's config.json (no weights;
the demo model's tokenizer), 100 prompts and a synthetic profile of 8,177 neurons: without
edges (``plain``), with six ``top_downstream_targets`` edges per neuron (``edges``), and as a
census of every layer (``census: {layers: all}``: 458,752 neurons) beside that profile without
and with its edges (``census``, ``census-edges``).

Each case runs twice in its own scratch folder: ``first`` tokenizes the prompts (the input
checks' cache is empty), ``again`` is what every later parse (and every cluster job's) costs.

Usage: PYTHONPATH=src .venv/bin/python benchmarks/bench_parse.py [--cases plain edges census ...]
The last line printed is one JSON object (seconds per case and pass).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import LLAMA_8B_CONFIG  # noqa: E402
from test_parse_scale import dry_run as timed_dry_run  # noqa: E402
from workflow_helpers import user_workdir  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def llama_8b_folder(root: Path, tokenizer_dir: Path) -> Path:
    """Llama-3.1-8B's config.json and the demo tokenizer, without weights (as the tests do)."""
    folder = root / "llama-3.1-8b-config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG, indent=1))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def dry_run(workdir: Path) -> float:
    """Seconds of ``snakemake -n`` with the Slurm profile (its ``jobs: 32``)."""
    return timed_dry_run(workdir)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cases = ["plain", "edges", "census", "census-edges"]
    parser.add_argument("--cases", nargs="+", default=cases, choices=cases)
    parser.add_argument("--tokenizer", type=Path, default=REPO / "tests/.cache/tiny-llama",
                        help="a folder with the demo tokenizer's files (made by the tests)")
    parser.add_argument("--repeats", type=int, default=1, help="warm parses per case")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model = llama_8b_folder(Path(scratch), args.tokenizer)
        for case in args.cases:
            workdir = user_workdir(Path(scratch) / case, model,
                                   edges_per_neuron=6 if "edges" in case else 0,
                                   census=case.startswith("census"))
            first = dry_run(workdir)
            again = [dry_run(workdir) for _ in range(args.repeats)]
            results[case] = {"first_s": round(first, 2), "again_s": round(min(again), 2)}
            print(case, results[case], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
