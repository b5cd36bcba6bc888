"""What a model job spends before its work: imports (torch, transformers and the Llama model
code), then the model's config, weights and tokenizer, from the demo GGUF (what every job did before) against its prepared folder (what
every job does now). Each measurement is a fresh Python process, as a job is; the two sources
alternate, so that the machine's load weighs on both.

    .venv/bin/python benchmarks/bench_load.py [--repeats 3]

Prints one JSON object as its last line (medians in seconds, and the ratio of the loads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
started = time.perf_counter()
import torch, transformers  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401  (imported lazily otherwise)
from neuron_effects.model import ModelSpec, load_model, load_tokenizer
imported = time.perf_counter()
spec = ModelSpec(sys.argv[1], dtype="float32", device="cpu")
load_model(spec)
loaded = time.perf_counter()
load_tokenizer(spec)
done = time.perf_counter()
print(json.dumps({"imports_s": imported - started, "model_s": loaded - imported,
                  "tokenizer_s": done - loaded, "load_s": done - imported}))
"""


def measure(location: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, location], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from neuron_effects.demo import DEFAULT_PATH, prepared_demo_model

    prepared = prepared_demo_model(REPO / "resources/prepared", REPO / DEFAULT_PATH)
    gguf = REPO / DEFAULT_PATH
    runs: dict[str, list[dict[str, float]]] = {"gguf": [], "prepared": []}
    for _ in range(args.repeats):
        runs["gguf"].append(measure(str(gguf)))
        runs["prepared"].append(measure(str(prepared)))
    medians = {source: {key: round(statistics.median(run[key] for run in values), 2)
                        for key in values[0]} for source, values in runs.items()}
    print(json.dumps({**medians, "load_ratio": round(medians["gguf"]["load_s"]
                                                     / medians["prepared"]["load_s"], 1)}))


if __name__ == "__main__":
    main()
