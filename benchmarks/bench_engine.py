"""Benchmark: the fast exact path against the naive reference path, in one run.

SmolLM2-135M-Instruct (float32, CPU), the demo prompts with at least ``--min-tokens`` tokens and a
uniform mix of neurons over all 30 layers, every metric on (full vocabulary: probability changes
and top-k). Both paths share the clean forward of each prompt (cached once, as in the workflow)
and compute the direct effect algebraically; they differ in the TOTAL effect:

* naive (the plan's method): one full forward per (neuron, prompt) with a hook adding V after
  layer L (``logits_to_keep=1``), then the metrics of that row;
* fast: :func:`neuron_effects.effects.compute_effects` (replay of layers L+1.. for the last
  token only against the cached prefix keys/values, batched over neurons of all layers).

The fast path runs twice per prompt, with and without the mediation split (``mediators``, on
by default in the workflow), alternating which goes first, to measure its overhead.

A third path, the batched hook peer (``--peer-per-layer``, :func:`peer_rows`), is what a user
of hook libraries would write: 64 copies of the prompt per forward, a hook adding each row's V
after its layer, last-position logits.

The naive path runs on a subset (``--naive-per-layer`` neurons per layer, same prompts); the
fast path on all neurons. ``max_abs_diff`` is over every compared metric of the shared rows.

Usage: .venv/bin/python benchmarks/bench_engine.py [--per-layer 16] [--naive-per-layer 2]
       [--chat-template]   (prompts as chat user turns, as config/llama-3.1-8b.yaml runs them)
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

from neuron_effects.cost import ModelShape
from neuron_effects.clean import run_clean
from neuron_effects.demo import prepared_demo_model
from neuron_effects.direct import Readout, direct_effects
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.error_scale import ratio_noise_floor
from neuron_effects.inputs import Neuron, read_prompts
from neuron_effects.metrics import effect_metrics
from neuron_effects.model import ModelSpec, load_model, load_tokenizer
from neuron_effects.prompts import prepare_prompt
from neuron_effects.reference import reference_clean_logits, treated_logits
from neuron_effects.validation import COMPARED


def naive_row(model, clean, clean_logits, readout, neuron: Neuron, target: int,
              distractor: int | None, settings: EffectSettings) -> dict[str, float]:
    """One (neuron, prompt) the plan's way: a hooked full forward for the total effect."""
    layer, index = neuron.layer, neuron.neuron
    activation = clean.activations[layer, index]
    direction = model.output_directions(torch.tensor([layer]), torch.tensor([index]))
    vector = activation * direction[0]
    total = (treated_logits(model, clean.input_ids, layer, vector) - clean_logits)[None]
    columns = torch.tensor([target] + ([distractor] if distractor is not None else []))
    direct, frozen, _ = direct_effects(readout, clean.final_hidden, activation[None], direction,
                                       readout.unnormalized(direction), columns)
    columns = effect_metrics(direct, frozen, total, clean_logits, target, distractor, True,
                             settings.top_k, ratio_noise_floor(settings.noise_floor, clean.logits))
    return {name: float(columns[name][0]) for name in COMPARED}


def peer_rows(model, clean, clean_logits, readout, neurons: list[Neuron], target: int,
              distractor: int | None, settings: EffectSettings,
              batch: int = 64) -> list[dict[str, float]]:
    """The batched hook peer, as a user of hook libraries would write it: ``batch`` copies of
    the prompt per forward, a forward hook on each decoder layer adding each row's V at the last
    position of its own layer's output, last-position logits (``logits_to_keep=1``); the
    direct effect and the metrics as the fast path computes them."""
    rows = []
    input_ids = clean.input_ids.reshape(1, -1)
    columns = torch.tensor([target] + ([distractor] if distractor is not None else []))
    for start in range(0, len(neurons), batch):
        members = neurons[start:start + batch]
        layers = torch.tensor([n.layer for n in members])
        indices = torch.tensor([n.neuron for n in members])
        activation = clean.activations[layers, indices]
        directions = model.output_directions(layers, indices)
        vectors = (activation[:, None] * directions).to(model.dtype)

        def adding(rows_of_layer: torch.Tensor):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden[rows_of_layer, -1] += vectors[rows_of_layer]
                return output
            return hook

        handles = [model.layers[layer].register_forward_hook(
            adding((layers == layer).nonzero().squeeze(1)))
            for layer in torch.unique(layers).tolist()]
        try:
            with torch.inference_mode():
                logits = model.causal_lm(input_ids=input_ids.repeat(len(members), 1),
                                         logits_to_keep=1).logits[:, -1].float()
        finally:
            for handle in handles:
                handle.remove()
        direct, frozen, _ = direct_effects(readout, clean.final_hidden, activation, directions,
                                           readout.unnormalized(directions), columns)
        metrics = effect_metrics(direct, frozen, logits - clean_logits, clean_logits, target,
                                 distractor, True, settings.top_k,
                                 ratio_noise_floor(settings.noise_floor, clean.logits))
        rows.extend({"neuron_id": neuron.neuron_id,
                     **{name: float(metrics[name][i]) for name in COMPARED}}
                    for i, neuron in enumerate(members))
    return rows


def matmul_seconds(clock, repeats: int = 20) -> tuple[float, float]:
    """This machine's float32 matmul rate, measured beside the paths: (seconds, FLOPs) of
    ``repeats`` products [512 x 576] x [576 x 1536] (a replay layer's MLP shape, 512 rows)."""
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    started = clock()
    for _ in range(repeats):
        a @ b
    return clock() - started, repeats * 2.0 * 512 * 576 * 1536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="config/demo/prompts.jsonl")
    parser.add_argument("--min-tokens", type=int, default=20)
    parser.add_argument("--max-prompts", type=int, default=None,
                        help="use only the first N prompts of at least --min-tokens tokens")
    parser.add_argument("--chat-template", action="store_true",
                        help="format prompts as chat user turns (as the real job does)")
    parser.add_argument("--per-layer", type=int, default=16, help="neurons per layer (fast)")
    parser.add_argument("--naive-per-layer", type=int, default=2)
    parser.add_argument("--peer-per-layer", type=int, default=0,
                        help="neurons per layer for the batched hook peer (64 rows a forward)")
    parser.add_argument("--batch-rows", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU time, not the wall clock: robust to "
                             "other processes on a shared machine (use with --threads 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter

    spec = ModelSpec(str(prepared_demo_model()), dtype="float32", device="cpu")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    prepared = [prepare_prompt(tokenizer, record, args.chat_template)
                for record in read_prompts(args.prompts)]
    prepared = [p for p in prepared if len(p.input_ids) >= args.min_tokens][:args.max_prompts]
    cleans = [run_clean(model, p.input_ids, p.prompt_id) for p in prepared]
    targets = [(p.target_id if p.target_id is not None else int(c.logits.argmax()),
                p.distractor_id) for p, c in zip(prepared, cleans)]

    generator = torch.Generator().manual_seed(0)
    neurons = [Neuron(f"L{layer}/N{int(n)}", layer, int(n)) for layer in range(model.n_layers)
               for n in torch.randperm(model.intermediate_size, generator=generator)
               [:args.per_layer]]
    settings = EffectSettings(batch_rows=args.batch_rows)
    plain = EffectSettings(batch_rows=args.batch_rows, mediators=False)

    # The two paths alternate prompt by prompt, so that a change in the machine's load during
    # the run (other processes on a shared machine) weighs on both alike.
    subset = [n for i, n in enumerate(neurons) if i % args.per_layer < args.naive_per_layer]
    peer_subset = [n for i, n in enumerate(neurons) if i % args.per_layer < args.peer_per_layer]
    peer: list[dict] = []
    peer_seconds = 0.0
    matmul_time = matmul_flops = 0.0
    readout = Readout(model)
    started = clock()
    block = neuron_block(model, neurons, settings.full_vocab)
    fast_seconds, naive_seconds = clock() - started, 0.0
    plain_seconds = fast_seconds
    tables, rows = [], []
    for index, (p, clean, (target, distractor)) in enumerate(zip(prepared, cleans, targets)):
        for mediators in ((True, False) if index % 2 == 0 else (False, True)):
            started = clock()
            result = compute_effects(model, clean, block, settings if mediators else plain,
                                     target, distractor)
            if mediators:
                fast_seconds += clock() - started
                tables.append(result.per_prompt.assign(prompt_id=p.prompt_id))
            else:
                plain_seconds += clock() - started
        seconds, flops = matmul_seconds(clock)
        matmul_time, matmul_flops = matmul_time + seconds, matmul_flops + flops
        if peer_subset:
            started = clock()
            with torch.inference_mode():
                peer_clean = model.causal_lm(input_ids=clean.input_ids.reshape(1, -1),
                                             logits_to_keep=1).logits[0, -1].float()
            peer.extend({"prompt_id": p.prompt_id, **row} for row in peer_rows(
                model, clean, peer_clean, readout, peer_subset, target, distractor, settings))
            peer_seconds += clock() - started
        if not subset:
            continue
        started = clock()
        clean_logits = reference_clean_logits(model, clean.input_ids)  # once per prompt
        for neuron in subset:
            rows.append({"prompt_id": p.prompt_id, "neuron_id": neuron.neuron_id,
                         **naive_row(model, clean, clean_logits, readout, neuron, target,
                                     distractor, settings)})
        naive_seconds += clock() - started
    fast = pd.concat(tables)
    naive = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["prompt_id", "neuron_id"])
    fast_count = len(neurons) * len(prepared)

    joined = naive.merge(fast, on=["prompt_id", "neuron_id"], suffixes=("_naive", ""))
    differences = {name: float(np.nanmax(np.abs(joined[f"{name}_naive"] - joined[name])))
                   for name in COMPARED if joined[name].notna().any()} or {"none": np.nan}
    naive_ms = 1e3 * naive_seconds / max(len(naive), 1)  # --naive-per-layer 0: no naive path
    fast_ms = 1e3 * fast_seconds / fast_count
    plain_ms = 1e3 * plain_seconds / fast_count
    by_layer = fast.groupby("layer")["total"].apply(lambda s: float(s.abs().median()))
    peer_ms = 1e3 * peer_seconds / max(len(peer), 1)
    # FLOPs by the cost model of neuron_effects.cost (replay + full-vocabulary readout, counted
    # without the mediation split)
    shape = ModelShape.from_config(model.config)
    fast_flops = sum(shape.row_flops(n.layer, len(p.input_ids), mediators=False)
                     for n in neurons for p in prepared)
    peer_flops = sum(len(p.input_ids) * shape.row_flops(-1, len(p.input_ids), False, False)
                     + shape.row_flops(model.n_layers - 1, 0, mediators=False) for p in prepared)
    fast_gflops, plain_gflops = fast_flops / fast_seconds / 1e9, fast_flops / plain_seconds / 1e9
    peer_gflops = (peer_flops * len(peer_subset) / peer_seconds / 1e9) if peer else None
    matmul_gflops = matmul_flops / matmul_time / 1e9
    peer_joined = pd.DataFrame(peer or [{"prompt_id": None, "neuron_id": None}]).merge(
        fast, on=["prompt_id", "neuron_id"], suffixes=("_peer", ""))
    peer_diff = max((float(np.nanmax(np.abs(peer_joined[f"{name}_peer"] - peer_joined[name])))
                     for name in COMPARED if peer and peer_joined[name].notna().any()),
                    default=float("nan"))
    print(f"prompts: {len(prepared)} ({np.mean([len(p.input_ids) for p in prepared]):.1f} "
          f"tokens on average); neurons: {len(neurons)} (fast), {len(subset)} (naive)")
    print(f"naive: {len(naive)} perturbations in {naive_seconds:.1f} s = {naive_ms:.2f} ms each")
    print(f"fast : {fast_count} perturbations in {fast_seconds:.1f} s = {fast_ms:.3f} ms each")
    print(f"fast without mediators: {plain_seconds:.1f} s = {plain_ms:.3f} ms each "
          f"(mediation overhead x{fast_ms / plain_ms:.3f})")
    if peer:
        print(f"peer : {len(peer)} perturbations in {peer_seconds:.1f} s = {peer_ms:.2f} ms each "
              f"(x{peer_ms / fast_ms:.1f} the fast path with mediators, x{peer_ms / plain_ms:.1f} "
              f"without); max |fast - peer| {peer_diff:.2g}")
    print(f"GFLOP/s: fast {fast_gflops:.1f} (mediators on), {plain_gflops:.1f} (off), peer "
          f"{peer_gflops or float('nan'):.1f}; this machine's float32 matmul "
          f"{matmul_gflops:.1f} (512 x 576 x 1536, measured between prompts)")
    print("max |fast - naive| by metric: " + ", ".join(f"{k} {v:.2g}"
                                                        for k, v in differences.items()))
    print(f"median |total effect| by layer: min {by_layer.min():.2g}, max {by_layer.max():.2g}")
    print(json.dumps({
        "speedup_vs_naive": round(naive_ms / fast_ms, 1) if len(naive) else None,
        "naive_ms_per_perturbation": round(naive_ms, 3),
        "fast_ms_per_perturbation": round(fast_ms, 4),
        "fast_ms_per_perturbation_without_mediators": round(plain_ms, 4),
        "mediation_overhead_ratio": round(fast_ms / plain_ms, 3),
        "peer_ms_per_perturbation": round(peer_ms, 3) if peer else None,
        "speedup_vs_peer": round(peer_ms / fast_ms, 2) if peer else None,
        "speedup_vs_peer_without_mediators": round(peer_ms / plain_ms, 2) if peer else None,
        "max_abs_diff_peer": peer_diff,
        "fast_gflops": round(fast_gflops, 1), "fast_gflops_without_mediators":
        round(plain_gflops, 1), "peer_gflops": round(peer_gflops, 1) if peer else None,
        "matmul_gflops": round(matmul_gflops, 1),
        "max_abs_diff": max(differences.values()),
        "prompt_tokens_mean": round(float(np.mean([len(p.input_ids) for p in prepared])), 2),
        "n_prompts": len(prepared), "n_neurons_fast": len(neurons),
        "n_perturbations_naive": len(naive), "n_perturbations_fast": fast_count,
        "chat_template": args.chat_template, "threads": args.threads, "cpu_time": args.cpu_time,
        "batch_rows": args.batch_rows,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
