"""The host work of one shard unit at the real job's table shapes, against its GPU compute.

A unit is a block of neurons x one prompt. Besides its replay on the device, it builds three
tables on the host (per-prompt rows, the long mediation table, the top-k mediators) and writes
them as parquet files. This measures that host work on the CPU with a random model of
Llama-3.1-8B's depth (32 layers, so the tables have the real job's rows per neuron) and a tiny
width. On the unit's critical path: the per-prompt frame with its top-k token lists and the
split columns. Overlapped with the next unit's compute by the shard's writer thread: building
the long mediation and top-k tables (``mediation_rows``, ``mediator_rows``, counted inside the
save) and writing the unit's parquet files. Each is set against the unit's estimated H200
compute from the cost model (Llama-3.1-8B, 150-token prompts).

    .venv/bin/python benchmarks/bench_unit_host.py [--rows 2048] [--repeats 5]

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import LLAMA_8B_CONFIG, tiny_model  # noqa: E402

from neuron_effects import cache, effects  # noqa: E402
from neuron_effects.clean import run_clean  # noqa: E402
from neuron_effects.cost import ModelShape, device_rates  # noqa: E402
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block  # noqa: E402
from neuron_effects.inputs import Neuron  # noqa: E402
from neuron_effects.jobs.shard import save_unit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="neurons per unit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_model("llama", num_hidden_layers=32, hidden_size=32, intermediate_size=14336,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                       max_position_embeddings=512)
    builders = {"mediation_rows": 0.0, "mediator_rows": 0.0, "_split_columns": 0.0}

    def timed(function):
        def wrapper(*arguments, **keywords):
            started = time.perf_counter()
            result = function(*arguments, **keywords)
            builders[function.__name__] += time.perf_counter() - started
            return result
        return wrapper

    # the host-side table builders of compute_effects and the save (the rest is device work)
    for name in ("mediation_rows", "mediator_rows", "_split_columns"):
        setattr(effects, name, timed(getattr(effects, name)))
    rng = random.Random(0)
    picks = sorted({(rng.randrange(32), rng.randrange(14336)) for _ in range(args.rows * 2)})
    neurons = [Neuron(f"L{layer}/N{n}", layer, n) for layer, n in rng.sample(picks, args.rows)]
    clean = run_clean(model, [rng.randrange(1000) for _ in range(args.tokens)], "p")
    block = neuron_block(model, neurons, True)
    settings = EffectSettings()
    compute_effects(model, clean, block, settings, 5, 7)  # warm-up
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        rows = [cache.row_key(n.layer, n.neuron) for n in sorted(
            neurons, key=lambda n: (n.layer, n.neuron))]
        for repeat in range(args.repeats):
            builders.update(mediation_rows=0.0, mediator_rows=0.0, _split_columns=0.0)
            tables = compute_effects(model, clean, block, settings, 5, 7)
            started = time.perf_counter()
            # the per-prompt frame and its top-k token lists, rebuilt as compute_effects does
            columns = {name: tables.per_prompt[name].to_numpy() for name in tables.per_prompt
                       if not name.endswith("_tokens")}
            frame = pd.DataFrame({"neuron_id": block.neuron_ids, **columns})
            for name in tables.per_prompt:
                if name.endswith("_tokens"):
                    frame[name] = [list(map(int, tokens)) for tokens in tables.per_prompt[name]]
            built = time.perf_counter()
            save_unit(cache.RowCache(folder, f"u{repeat}"), {}, rows, tables, "bench")
            for name, value in {**builders, "per_prompt_frame": built - started,
                                "save_unit": time.perf_counter() - built}.items():
                seconds.setdefault(name, []).append(value)
    host = {name: sorted(values)[len(values) // 2] for name, values in seconds.items()}
    critical = host["_split_columns"] + host["per_prompt_frame"]
    shape, rates = ModelShape.from_config(LLAMA_8B_CONFIG), device_rates("h200")
    layers = [neuron.layer for neuron in neurons]
    gpu = sum(shape.row_flops(layer, args.tokens) for layer in layers) / rates.flops_per_s
    result = {
        "rows": args.rows, "mediation_rows": len(tables.mediation),
        "mediator_rows": len(tables.mediators),
        "by_part_s": {name: round(value, 4) for name, value in host.items()},
        "critical_path_s": round(critical, 4),
        "overlapped_save_s": round(host["save_unit"], 4),  # tables built and written
        "critical_us_per_row": round(1e6 * critical / args.rows, 1),
        "h200_unit_compute_s": round(gpu, 4),
        "critical_share_of_compute": round(critical / gpu, 3),
        "save_share_of_compute": round(host["save_unit"] / gpu, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
