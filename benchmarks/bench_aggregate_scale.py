"""The census aggregation (``neuron_effects.jobs.aggregation.aggregate_effects``) at Llama-3.1-8B scale, on synthetic shards.

Writes the inputs of one aggregation job in the shard unit format (one row group per unit: a
block of ``--block`` neurons of one layer x one prompt), with the columns and dtypes of the
shards that ``compute_shard`` writes (checked against a real shard with ``--template``):

* ``L<a>-<b>_c<chunk>.parquet``: the per-prompt rows (46 columns, 3 token lists);
* ``.mediation.parquet``: per (prompt, neuron of layer L) ``2 (n_layers - 1 - L) + 1`` rows;
* ``.mediators.parquet``: per (prompt, neuron) the top ``--top-k`` neurons and heads (20 rows),
  drawn so that a neuron's mediators recur over prompts about as on the demo census (there about
  190 distinct mediators per neuron over 21 prompts: here each slot comes with probability 0.6
  from a pool of 15 neurons / 8 heads of the neuron, else uniformly from the later layers);
* ``.edges.parquet``: the profile neurons' ``Δa_t`` for 5 neuron targets each;
* the estimates file of attribution patching ([prompts, n_layers, width] for atp, relp, and the
  gradient, as the real job's, so a job loads the whole model's estimates), the prompts table,
  a clean-run file holding only the records, and a profile of ``--profile-per-layer`` neurons
  per census layer (8,177 / 32 = 256 on the real config) with edges;

then runs the aggregation (census on, mediation, estimates and edges on, the real config's
``top_k`` 10) in a fresh process under ``/usr/bin/time -v`` and prints wall time, CPU time, peak
RSS and the time of each phase.

    python benchmarks/bench_aggregate_scale.py --out /tmp/agg-scale --layers 14 15 16 \
        --prompts 107 --template results/effects/shards/L04-05_c000.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

DOUBLES_1 = ("direct", "direct_logit_diff", "total", "total_logit_diff", "direct_frozen_norm",
             "direct_frozen_norm_logit_diff", "indirect", "norm_mediated", "indirect_logit_diff",
             "norm_mediated_logit_diff", "prob_change_direct", "top_k_direct_mean",
             "top_k_direct_max", "prob_change_indirect", "top_k_indirect_mean",
             "top_k_indirect_max", "prob_change_total", "top_k_total_mean", "top_k_total_max",
             "direct_ratio", "cancellation")
DOUBLES_2 = ("indirect_attn", "indirect_mlp", "indirect_norm", "indirect_attn_logit_diff",
             "indirect_mlp_logit_diff", "indirect_norm_logit_diff")
TOKEN_LISTS = ("top_k_direct_tokens", "top_k_indirect_tokens", "top_k_total_tokens")

STRING = pa.large_string()
PER_PROMPT = pa.schema(
    [("neuron_id", STRING)] + [(name, pa.float64()) for name in DOUBLES_1]
    + [("sign_aligned", pa.bool_()), ("ratio_defined", pa.bool_()),
       ("direct_ratio_frozen_norm", pa.float64()), ("layer", pa.int64()), ("neuron", pa.int64()),
       ("activation", pa.float64()), ("scale", pa.float64())]
    + [(name, pa.float64()) for name in DOUBLES_2]
    + [(name, pa.list_(pa.int64())) for name in TOKEN_LISTS]
    + [("prompt_id", STRING), ("target_id", pa.int64()), ("target_token", STRING),
       ("target_source", STRING), ("distractor_id", pa.int64()), ("distractor_token", STRING)])
MEDIATION = pa.schema([("prompt_id", STRING), ("neuron_id", pa.dictionary(pa.int32(), pa.string())),
                       ("layer", pa.int16()), ("component", STRING),
                       ("contribution", pa.float32())])
MEDIATORS = pa.schema([("prompt_id", STRING), ("neuron_id", pa.dictionary(pa.int32(), pa.string())),
                       ("kind", STRING), ("rank", pa.int16()), ("layer", pa.int16()),
                       ("index", pa.int32()), ("contribution", pa.float32())])
EDGES = pa.schema([("prompt_id", STRING), ("neuron_id", STRING), ("target_layer", pa.int16()),
                   ("target_neuron", pa.int32()), ("delta_activation", pa.float64()),
                   ("target_activation", pa.float64())])
N_HEADS = 32
POOL_NEURONS, POOL_HEADS, FROM_POOL = 15, 8, 0.6
EDGE_TARGETS = 5


def check_template(template: str) -> None:
    """The generated schemas equal those of a real shard (and its named tables)."""
    base = template.removesuffix(".parquet")
    for schema, path in ((PER_PROMPT, f"{base}.parquet"), (MEDIATION, f"{base}.mediation.parquet"),
                         (MEDIATORS, f"{base}.mediators.parquet"), (EDGES, f"{base}.edges.parquet")):
        real = pq.read_schema(path).remove_metadata()
        if not real.equals(schema):
            raise SystemExit(f"the generated schema differs from {path}:\n{real}\n---\n{schema}")
    print(f"schemas equal those of {base}.*.parquet")


def constant(value: str, n: int) -> pa.Array:
    return pa.array([value], STRING).take(pa.array(np.zeros(n, dtype=np.int32)))


def per_prompt_unit(rng, layer, neurons, prompt, width) -> pa.Table:
    n = len(neurons)
    ids = pa.array([f"L{layer}/N{index}" for index in neurons], STRING)
    columns = {"neuron_id": ids}
    values = {name: rng.standard_normal(n) * 0.01 for name in DOUBLES_1}
    values["total"] = values["direct"] + values["indirect"]
    defined = rng.random(n) > 0.05
    ratio = np.abs(values["direct"]) / (np.abs(values["direct"]) + np.abs(values["indirect"]))
    values["direct_ratio"] = np.where(defined, ratio, np.nan)
    values["cancellation"] = np.where(defined, rng.random(n) * 0.2, np.nan)
    columns.update({name: pa.array(values[name]) for name in DOUBLES_1})
    columns["sign_aligned"] = pa.array(np.sign(values["direct"]) == np.sign(values["indirect"]))
    columns["ratio_defined"] = pa.array(defined)
    columns["direct_ratio_frozen_norm"] = pa.array(np.where(defined, rng.random(n), np.nan))
    columns["layer"] = pa.array(np.full(n, layer, dtype=np.int64))
    columns["neuron"] = pa.array(np.asarray(neurons, dtype=np.int64))
    activation = rng.standard_normal(n)
    columns["activation"] = pa.array(activation)
    columns["scale"] = pa.array(activation)
    columns.update({name: pa.array(rng.standard_normal(n) * 0.01) for name in DOUBLES_2})
    offsets = pa.array(np.arange(0, 10 * n + 1, 10, dtype=np.int32))
    for name in TOKEN_LISTS:
        columns[name] = pa.ListArray.from_arrays(
            offsets, pa.array(rng.integers(0, 128_256, 10 * n, dtype=np.int64)))
    columns["prompt_id"] = constant(prompt["prompt_id"], n)
    columns["target_id"] = pa.array(np.full(n, prompt["target_id"], dtype=np.int64))
    columns["target_token"] = constant(prompt["target_token"], n)
    columns["target_source"] = constant("given", n)
    columns["distractor_id"] = pa.array(np.full(n, prompt["distractor_id"], dtype=np.int64))
    columns["distractor_token"] = constant(prompt["distractor_token"], n)
    return pa.table(columns, schema=PER_PROMPT)


def mediation_unit(rng, layer, ids, prompt_id, n_layers) -> pa.Table:
    n = len(ids)
    later = np.arange(layer + 1, n_layers, dtype=np.int16)
    template_layers = np.concatenate([np.repeat(later, 2), [-1]]).astype(np.int16)
    template_components = np.concatenate([np.tile([0, 1], len(later)), [2]]).astype(np.int32)
    m = len(template_layers)
    components = pa.array(["attn", "mlp", "norm"], STRING).take(pa.array(np.tile(
        template_components, n)))
    return pa.table({
        "prompt_id": constant(prompt_id, n * m),
        "neuron_id": pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.arange(n, dtype=np.int32), m)), ids),
        "layer": pa.array(np.tile(template_layers, n)), "component": components,
        "contribution": pa.array(rng.standard_normal(n * m).astype(np.float32) * 0.01),
    }, schema=MEDIATION)


def mediator_unit(rng, layer, ids, prompt_id, n_layers, top_k, pools) -> pa.Table:
    """Per neuron ``top_k`` neurons then ``top_k`` heads, rank 1 the largest |contribution|."""
    n = len(ids)
    parts = []
    for kind, (pool_layers, pool_index), high in (("neuron", pools[0], None),
                                                  ("head", pools[1], N_HEADS)):
        high = high or pools[2]
        pick = rng.integers(0, pool_layers.shape[1], (n, top_k))
        rows = np.arange(n)[:, None]
        random_layers = rng.integers(layer + 1, n_layers, (n, top_k))
        random_index = rng.integers(0, high, (n, top_k))
        pooled = rng.random((n, top_k)) < FROM_POOL
        layers = np.where(pooled, pool_layers[rows, pick], random_layers)
        index = np.where(pooled, pool_index[rows, pick], random_index)
        values = -np.sort(-np.abs(rng.standard_normal((n, top_k)))) * 0.01
        values *= rng.choice([-1.0, 1.0], (n, top_k))
        parts.append((kind, layers, index, values))
    kinds = np.repeat([0, 1], top_k)
    ranks = np.tile(np.arange(1, top_k + 1), 2)
    layers = np.concatenate([parts[0][1], parts[1][1]], axis=1).reshape(-1)
    index = np.concatenate([parts[0][2], parts[1][2]], axis=1).reshape(-1)
    values = np.concatenate([parts[0][3], parts[1][3]], axis=1).reshape(-1)
    width = 2 * top_k
    return pa.table({
        "prompt_id": constant(prompt_id, n * width),
        "neuron_id": pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.arange(n, dtype=np.int32), width)), ids),
        "kind": pa.array(["neuron", "head"], STRING).take(pa.array(np.tile(kinds, n))),
        "rank": pa.array(np.tile(ranks, n).astype(np.int16)),
        "layer": pa.array(layers.astype(np.int16)), "index": pa.array(index.astype(np.int32)),
        "contribution": pa.array(values.astype(np.float32)),
    }, schema=MEDIATORS)


def edge_unit(rng, neuron_ids, targets, prompt_id) -> pa.Table:
    rows = [(neuron_id, layer, index) for neuron_id in neuron_ids
            for layer, index in targets[neuron_id]]
    n = len(rows)
    return pa.table({
        "prompt_id": constant(prompt_id, n), "neuron_id": pa.array([r[0] for r in rows], STRING),
        "target_layer": pa.array(np.array([r[1] for r in rows], dtype=np.int16)),
        "target_neuron": pa.array(np.array([r[2] for r in rows], dtype=np.int32)),
        "delta_activation": pa.array(rng.standard_normal(n) * 0.05),
        "target_activation": pa.array(rng.standard_normal(n)),
    }, schema=EDGES)


def generate(args) -> dict:
    out = Path(args.out)
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_id": f"p{p:03d}", "target_id": int(1000 + p),
                "target_token": f" target{p}", "distractor_id": int(5000 + p),
                "distractor_token": f" distractor{p}"} for p in range(args.prompts)]
    # the profile: the first --profile-per-layer neurons of a random order, per census layer
    profile, targets = [], {}
    for layer in args.layers:
        for index in sorted(rng.permutation(args.width)[:args.profile_per_layer].tolist()):
            neuron_id = f"L{layer}/N{index}"
            edges = [(int(rng.integers(layer + 1, args.n_layers)), int(rng.integers(args.width)))
                     for _ in range(EDGE_TARGETS)]
            targets[neuron_id] = edges
            profile.append({"neuron_id": neuron_id, "layer": layer, "neuron": index,
                            "label": f"synthetic {neuron_id}", "tags": [],
                            "top_downstream_targets": [
                                {"target": f"{l}_{i}_-1", "avg_weight": 0.1} for l, i in edges]
                            + [{"target": "L_1000_-1", "avg_weight": 0.2}]})
    (out / "neurons.json").write_text(json.dumps({"source": "synthetic", "profiles": profile}))
    import pandas as pd
    pd.DataFrame([{"prompt_id": p["prompt_id"], "prompt": f"prompt {p['prompt_id']}",
                   "text": f"prompt {p['prompt_id']}", "n_tokens": 150,
                   "input_ids": list(range(150)), "target": p["target_token"],
                   "target_id": p["target_id"], "distractor": p["distractor_token"],
                   "distractor_id": p["distractor_id"], "warnings": [], "source": "synthetic",
                   "rank": 0} for p in prompts]).to_parquet(out / "prompts.parquet", index=False)
    records = [{**p, "n_tokens": 150, "target_source": "given", "clean_top_token": " x",
                "clean_top_prob": 0.5, "clean_target_prob": 0.1, "clean_target_rank": 3}
               for p in prompts]
    save_file({"0.dummy": torch.zeros(1)}, str(out / "clean.safetensors"),
              metadata={"records": json.dumps(records)})
    shape = (args.prompts, args.n_layers, args.width)
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=generator) * 0.01
               for name in ("estimates", "relp", "gradient")}, str(out / "estimates.safetensors"),
              metadata={"prompt_ids": json.dumps([p["prompt_id"] for p in prompts]),
                        "methods": json.dumps({"atp": [], "relp": ["ln", "identity", "half",
                                                                   "frozen_attention"]})})
    # each neuron's recurring mediators (layers after its own)
    pools = {}
    for layer in args.layers:
        pools[layer] = (
            (rng.integers(layer + 1, args.n_layers, (args.width, POOL_NEURONS)),
             rng.integers(0, args.width, (args.width, POOL_NEURONS))),
            (rng.integers(layer + 1, args.n_layers, (args.width, POOL_HEADS)),
             rng.integers(0, N_HEADS, (args.width, POOL_HEADS))), args.width)
    blocks = [(layer, list(range(start, min(start + args.block, args.width))))
              for layer in args.layers for start in range(0, args.width, args.block)]
    chunks = [prompts[start:start + args.prompts_per_chunk]
              for start in range(0, len(prompts), args.prompts_per_chunk)]
    name = f"L{min(args.layers):02d}-{max(args.layers):02d}"
    counts = {"rows": 0, "mediation": 0, "mediators": 0, "edges": 0}
    started = time.perf_counter()
    for c, chunk in enumerate(chunks):
        base = shards / f"{name}_c{c:03d}"
        writers = {table: pq.ParquetWriter(f"{base}{suffix}.parquet", schema, compression="zstd")
                   for table, suffix, schema in (("rows", "", PER_PROMPT),
                                                 ("mediation", ".mediation", MEDIATION),
                                                 ("mediators", ".mediators", MEDIATORS),
                                                 ("edges", ".edges", EDGES))}
        for layer, neurons in blocks:  # units: neuron block outer, prompt inner
            ids = pa.array([f"L{layer}/N{index}" for index in neurons], pa.string())
            listed = [f"L{layer}/N{index}" for index in neurons
                      if f"L{layer}/N{index}" in targets]
            for prompt in chunk:
                tables = {
                    "rows": per_prompt_unit(rng, layer, neurons, prompt, args.width),
                    "mediation": mediation_unit(rng, layer, ids, prompt["prompt_id"],
                                                args.n_layers),
                    "mediators": mediator_unit(rng, layer, ids, prompt["prompt_id"],
                                               args.n_layers, args.top_k, pools[layer]),
                    "edges": edge_unit(rng, listed, targets, prompt["prompt_id"]),
                }
                for table, value in tables.items():
                    writers[table].write_table(value)
                    counts[table] += value.num_rows
        for writer in writers.values():
            writer.close()
        print(f"chunk {c}: {counts} after {time.perf_counter() - started:.0f} s", flush=True)
    (out / "counts.json").write_text(json.dumps(counts))
    return counts


RUNNER = r"""
import json, sys, time
from pathlib import Path
import pandas as pd
from neuron_effects import store
from neuron_effects.jobs import aggregation, mediation_tables
from neuron_effects.jobs.setup import configure_job
from neuron_effects.aggregate import BLOCK_PARTS, Thresholds

out = Path(sys.argv[1]); top_k = int(sys.argv[2])
phases, started = {}, time.perf_counter()

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

def timed(module, name):
    inner = getattr(module, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        result = inner(*a, **k)
        if hasattr(result, "__next__"):  # a generator: time it to exhaustion
            def gen():
                yield from result
                phases[name] = phases.get(name, 0) + time.perf_counter() - t
            return gen()
        phases[name] = phases.get(name, 0) + time.perf_counter() - t
        phases[name + " peak MB"] = peak_mb()
        return result
    setattr(module, name, wrapper)

for module, name in ((aggregation, "layer_rows"), (aggregation, "aggregate_mediation"),
                     (mediation_tables, "layer_mediator_summaries"),
                     (aggregation, "aggregate_edges"), (aggregation, "stacked_estimates"),
                     (store, "concat_parquet")):
    timed(module, name)
res = out / "results"; res.mkdir(exist_ok=True)
shards = sorted(str(p) for p in (out / "shards").glob("*.parquet") if p.name.count(".") == 1)
configure_job(1)
parts = {part: str(res / f"block.{part}.parquet") for part in BLOCK_PARTS}
aggregation.aggregate_block(  # the generated layers are one layer block: one aggregate_block job
    shard_paths=shards, prompt_order=list(pd.read_parquet(out / "prompts.parquet")["prompt_id"]),
    profile_path=str(out / "neurons.json"), thresholds=Thresholds(), parts=parts,
    mediation_shards=[s.replace(".parquet", ".mediation.parquet") for s in shards],
    mediator_shards=[s.replace(".parquet", ".mediators.parquet") for s in shards],
    edge_shards=[s.replace(".parquet", ".edges.parquet") for s in shards],
    mediator_top_k=top_k, estimate_chunks=[str(out / "estimates.safetensors")],
    census=True)
phases["block job"] = time.perf_counter() - started
aggregation.aggregate_effects(  # the final step, joining the block's parts
    blocks=[parts], prompts_table=str(out / "prompts.parquet"),
    clean_paths=[str(out / "clean.safetensors")], profile_path=str(out / "neurons.json"),
    per_prompt_out=str(res / "per_prompt.parquet"), neurons_out=str(res / "neurons.parquet"),
    neurons_json_out=str(res / "neurons.json"), layers_out=str(res / "layers.parquet"),
    prompts_out=str(res / "prompts.parquet"), labels_out=str(res / "labels.json"),
    mediation_out=str(res / "mediation.parquet"), mediators_out=str(res / "mediators.parquet"),
    mediation_layers_out=str(res / "mediation_layers.parquet"),
    edges_out=str(res / "edges.parquet"), mediator_top_k=top_k, max_rank=100, census=True)
phases["all"] = time.perf_counter() - started
phases["peak MB"] = peak_mb()
print("PHASES " + json.dumps(phases))
"""


def measure(args) -> dict:
    out = Path(args.out)
    counts = json.loads((out / "counts.json").read_text())
    command = ["/usr/bin/time", "-v", sys.executable, "-c", RUNNER, str(out), str(args.top_k)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - started
    if done.returncode:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(done.returncode)
    report = done.stderr
    field = lambda pattern: re.search(pattern, report).group(1)  # noqa: E731
    phases = json.loads(re.search(r"PHASES (.*)", done.stdout).group(1))
    result = {**counts, "wall_s": wall,
              "user_s": float(field(r"User time \(seconds\): ([0-9.]+)")),
              "system_s": float(field(r"System time \(seconds\): ([0-9.]+)")),
              "peak_rss_mb": int(field(r"Maximum resident set size \(kbytes\): (\d+)")) / 1024,
              "phases": phases, "load_average": os.getloadavg()}
    table_rows = counts["mediation"] + counts["mediators"]
    result["us_per_row_all"] = 1e6 * wall / counts["rows"]
    result["table_rows"] = table_rows
    print(json.dumps(result, indent=1))
    (out / f"measured-{int(time.time())}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[14, 15, 16])
    parser.add_argument("--width", type=int, default=14_336)
    parser.add_argument("--n-layers", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=107)
    parser.add_argument("--prompts-per-chunk", type=int, default=27)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--profile-per-layer", type=int, default=256)
    parser.add_argument("--template", help="a real shard whose schemas the generated must equal")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-measure", action="store_true")
    args = parser.parse_args()
    if args.template:
        check_template(args.template)
    if not args.skip_generate:
        generate(args)
    if not args.skip_measure:
        measure(args)


if __name__ == "__main__":
    main()
