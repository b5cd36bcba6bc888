"""Benchmark: RelP and AtP against the exact total effect by layer band, each RelP rule alone,
the exactness of the edges' Δa_t, and what recording Δa_t adds to a shard.

SmolLM2-135M-Instruct (float32, CPU), the demo prompts and the demo profile file (its neurons
and their ``top_downstream_targets``). Per prompt:

* the exact effects of every studied neuron (:func:`neuron_effects.effects.compute_effects`,
  ``full_vocab`` and mediators as the workflow's defaults) with the edges' Δa_t recorded; on the
  first ``--timing-prompts`` prompts also without, ``--repeats`` times each, alternating (so
  that the machine's load weighs on both), the fastest of each counted;
* the gradients of AtP, RelP (all four rules) and of each rule alone from one forward
  (:func:`neuron_effects.attribution.method_gradients`) and their estimates of every studied
  neuron under the treatment.

Agreement with the exact total (:func:`neuron_effects.agreement.agreement`) over all rows
and by layer band (``--bands``, default thirds of the model). Edge exactness: Δa_t of the first
``--edge-checks`` measured edges on the first prompt against
:func:`neuron_effects.reference.reference_activation_changes` (hooked full forwards).

With ``--from-results TREATMENT=DIR ...`` it computes nothing: it reads each finished run's
``DIR/effects/per_prompt.parquet`` (a demo run with the estimates of your choice, e.g.
``atp.methods: [atp, relp, relp_unmasked]``) and prints, as a Markdown table, every estimate's
Spearman and sign agreement with the exact total by band of layers
(:func:`neuron_effects.agreement.band_agreement`; thirds of the layers).

Usage: .venv/bin/python benchmarks/bench_relp.py [--treatment add] [--prompts N]
       .venv/bin/python benchmarks/bench_relp.py --from-results add=results [zero_ablate=...]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import pandas as pd
import torch

from neuron_effects.aggregate import estimate_methods
from neuron_effects.agreement import agreement, band_agreement, layer_bands
from neuron_effects.attribution import first_order_estimates, method_gradients
from neuron_effects.clean import run_clean
from neuron_effects.demo import prepared_demo_model
from neuron_effects.edges import measurable_targets
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.inputs import read_neurons, read_prompts
from neuron_effects.model import ModelSpec, load_model, load_tokenizer
from neuron_effects.profile_edges import neuron_target_weights, read_edges
from neuron_effects.prompts import prepare_prompt
from neuron_effects.reference import reference_activation_changes
from neuron_effects.relp_rules import RULES, method_name
from neuron_effects.treatments import treatment_scales

METHODS = {"atp": (), "relp": RULES, **{method_name([rule]): (rule,) for rule in RULES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="config/demo/prompts.jsonl")
    parser.add_argument("--neurons", default="config/demo/medical_neurons_demo.json")
    parser.add_argument("--n-prompts", type=int, default=None)
    parser.add_argument("--treatment", default="add")
    parser.add_argument("--bands", type=int, default=3)
    parser.add_argument("--edge-checks", type=int, default=40)
    parser.add_argument("--timing-prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--from-results", nargs="+", metavar="TREATMENT=DIR")
    args = parser.parse_args()
    if args.from_results:
        results_by_band(dict(item.split("=", 1) for item in args.from_results))
        return
    torch.set_num_threads(args.threads)

    spec = ModelSpec(str(prepared_demo_model()), dtype="float32", device="cpu")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    prepared = [prepare_prompt(tokenizer, record) for record in read_prompts(args.prompts)]
    prepared = prepared[:args.n_prompts]
    neurons = read_neurons(args.neurons)
    layer_of = {neuron.neuron_id: neuron.layer for neuron in neurons}
    targets = {neuron_id: measurable_targets(neuron_id, layer_of[neuron_id],
                                             list(neuron_target_weights(listed)),
                                             model.n_layers, model.intermediate_size)[0]
               for neuron_id, listed in read_edges(args.neurons).items() if neuron_id in layer_of}
    block = neuron_block(model, neurons, full_vocab=True)
    settings = EffectSettings(treatment=args.treatment)
    seconds = {"without_edges": 0.0, "with_edges": 0.0}
    frames, edge_check = [], None
    for index, p in enumerate(prepared):
        clean = run_clean(model, p.input_ids, p.prompt_id)
        target = p.target_id if p.target_id is not None else int(clean.logits.argmax())
        tables = compute_effects(model, clean, block, settings, target, p.distractor_id,
                                 edge_targets=targets)
        exact, edges = tables.per_prompt, tables.edges
        if index < args.timing_prompts:
            fastest = {name: float("inf") for name in seconds}
            for _ in range(args.repeats):
                for name, edge_targets in (("without_edges", None), ("with_edges", targets)):
                    started = time.perf_counter()
                    compute_effects(model, clean, block, settings, target, p.distractor_id,
                                    edge_targets=edge_targets)
                    fastest[name] = min(fastest[name], time.perf_counter() - started)
            for name in seconds:
                seconds[name] += fastest[name]
        gradients, _, _ = method_gradients(model, p.input_ids, target, "last", METHODS)
        rows = (exact["layer"].to_numpy(), exact["neuron"].to_numpy())
        frames.append(exact[["neuron_id", "layer", "neuron", "total"]].assign(
            prompt_id=p.prompt_id, **{f"total_{name}": first_order_estimates(
                projections, clean.activations, args.treatment).numpy()[rows]
                for name, projections in gradients.items()}))
        if index == 0:
            edge_check = check_edges(model, clean, edges.head(args.edge_checks), neurons,
                                     args.treatment)
    table = pd.concat(frames, ignore_index=True)
    result = {}
    for name in METHODS:
        result[name] = {"all": agreement(table[f"total_{name}"], table["total"], name)}
        for _, first, last in layer_bands(model.n_layers):
            rows = table[table["layer"].between(first, last)]
            result[name][f"layers {first}-{last}"] = agreement(rows[f"total_{name}"],
                                                               rows["total"], name)
    print(f"{len(prepared)} prompts x {len(neurons)} neurons, treatment {args.treatment}")
    for name, values in result.items():
        print(name, {band: round(v[f"{name}_spearman"], 3) for band, v in values.items()})
    overhead = seconds["with_edges"] / seconds["without_edges"] - 1
    n_edges = sum(len(listed) for listed in targets.values())
    print(f"exact effects: {seconds['without_edges']:.1f} s without, {seconds['with_edges']:.1f} s"
          f" with Δa_t of {n_edges} edges: +{100 * overhead:.1f} %")
    print(f"Δa_t vs hooked full forwards on {edge_check['n']} edges: max |diff| "
          f"{edge_check['max_abs_diff']:.2e} (largest |Δa_t| {edge_check['max_abs_delta']:.3g})")
    print(json.dumps({
        "treatment": args.treatment, "n_prompts": len(prepared), "n_neurons": len(neurons),
        "agreement": result, "edges_measured": n_edges,
        "shard_seconds_without_edges": round(seconds["without_edges"], 2),
        "shard_seconds_with_edges": round(seconds["with_edges"], 2),
        "edge_overhead_fraction": round(overhead, 4), "edge_check": edge_check,
        "threads": args.threads, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }))


def results_by_band(results: dict[str, str]) -> None:
    """Print, per treatment's results folder, every estimate's agreement with the exact total
    over all rows and by band of layers, as one Markdown table, then the same as JSON."""
    print("| treatment | estimate | band (layers) | rows | Spearman | sign agreement |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    found = {}
    for treatment, folder in results.items():
        per_prompt = pd.read_parquet(f"{folder}/effects/per_prompt.parquet")
        methods = estimate_methods(per_prompt.columns)
        n_layers = int(per_prompt["layer"].max()) + 1
        overall = pd.DataFrame([
            {"method": method, "band": "all", "layers": f"0-{n_layers - 1}",
             "rows": len(per_prompt), "spearman": values[f"{method}_spearman"],
             "sign_agreement": values[f"{method}_sign_agreement"]}
            for method in methods
            for values in [agreement(per_prompt[f"total_{method}"], per_prompt["total"], method)]])
        bands = pd.concat([overall, band_agreement(per_prompt, n_layers, methods)])
        bands = bands.sort_values("method", key=lambda m: m.map(methods.index), kind="stable")
        for row in bands.itertuples():
            print(f"| {treatment} | {row.method} | {row.band} ({row.layers}) | {row.rows:,} | "
                  f"{row.spearman:.3f} | {100 * row.sign_agreement:.1f} % |")
        found[treatment] = bands.to_dict("records")
    print(json.dumps(found))


def check_edges(model, clean, edges: pd.DataFrame, neurons, treatment: str) -> dict:
    """The largest |Δa_t(replay) - Δa_t(hooked full forwards)| over ``edges`` of one prompt."""
    by_id = {neuron.neuron_id: neuron for neuron in neurons}
    differences, sizes = [], []
    for neuron_id, group in edges.groupby("neuron_id", sort=False):
        neuron = by_id[neuron_id]
        scale = treatment_scales(clean.activations[neuron.layer, neuron.neuron], treatment)
        vector = scale * model.layers[neuron.layer].mlp.down_proj.weight[:, neuron.neuron]
        expected = reference_activation_changes(
            model, clean.input_ids, neuron.layer, vector,
            list(zip(group["target_layer"].astype(int), group["target_neuron"].astype(int))))
        differences += list(np.abs(group["delta_activation"].to_numpy() - expected))
        sizes += list(np.abs(expected))
    return {"n": len(differences), "max_abs_diff": float(max(differences)),
            "max_abs_delta": float(max(sizes))}


if __name__ == "__main__":
    main()
