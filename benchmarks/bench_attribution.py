"""Benchmark: the cost of attribution patching against a clean forward, and its memory.

SmolLM2-135M-Instruct (float32, CPU) on the demo prompts. Per prompt, alternating so that a
change in the machine's load weighs on both:

* clean: :func:`neuron_effects.clean.run_clean`, the hooked forward the workflow caches per
  prompt (cache_clean_runs);
* attribution: :func:`neuron_effects.attribution.neuron_gradients` (one forward with autograd,
  one backward to the input embeddings, the per-layer projection ``W_down^T g``) plus
  :func:`~neuron_effects.attribution.first_order_estimates` for every neuron of every layer;
* attribution + RelP: :func:`~neuron_effects.attribution.method_gradients` with AtP and RelP
  (all four rules): the same forward with the rules' routing hooks, two backward passes, and the
  estimates of both (what the workflow's attribution job does by default).

Memory: the bytes of the tensors autograd saves for the backward (activations only; the frozen
weights it also references are not counted), per prompt token and decoder layer, counted with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once).

Usage: .venv/bin/python benchmarks/bench_attribution.py [--chat-template] [--repeats 3]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from neuron_effects.attribution import first_order_estimates, method_gradients, neuron_gradients
from neuron_effects.clean import run_clean
from neuron_effects.demo import prepared_demo_model
from neuron_effects.inputs import read_prompts
from neuron_effects.model import ModelSpec, load_model, load_tokenizer
from neuron_effects.prompts import prepare_prompt
from neuron_effects.relp_rules import DEFAULT_RULES


def saved_activation_bytes(model, input_ids: list[int], target: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one attribution
    forward (what the backward needs in memory at once)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.causal_lm.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        neuron_gradients(model, input_ids, target)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="config/demo/prompts.jsonl")
    parser.add_argument("--chat-template", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = ModelSpec(str(prepared_demo_model()), dtype="float32", device="cpu")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    prepared = [prepare_prompt(tokenizer, record, args.chat_template)
                for record in read_prompts(args.prompts)]
    clean_seconds = attribution_seconds = relp_seconds = 0.0
    both = {"atp": (), "relp": DEFAULT_RULES}
    run_clean(model, prepared[0].input_ids, "warm-up")
    neuron_gradients(model, prepared[0].input_ids, 0)
    method_gradients(model, prepared[0].input_ids, 0, "last", both)
    for _ in range(args.repeats):
        for p in prepared:
            started = time.perf_counter()
            clean = run_clean(model, p.input_ids, p.prompt_id)
            clean_seconds += time.perf_counter() - started
            target = p.target_id if p.target_id is not None else int(clean.logits.argmax())
            started = time.perf_counter()
            projections, _ = neuron_gradients(model, p.input_ids, target)
            first_order_estimates(projections, clean.activations, "add")
            attribution_seconds += time.perf_counter() - started
            started = time.perf_counter()
            gradients, _, _ = method_gradients(model, p.input_ids, target, "last", both)
            for projections in gradients.values():
                first_order_estimates(projections, clean.activations, "add")
            relp_seconds += time.perf_counter() - started
    runs = args.repeats * len(prepared)
    tokens = [len(p.input_ids) for p in prepared]
    longest = max(prepared, key=lambda p: len(p.input_ids))
    saved = saved_activation_bytes(model, longest.input_ids, 0)
    per_token_layer = saved / (len(longest.input_ids) * model.n_layers)
    clean_ms, attribution_ms = 1e3 * clean_seconds / runs, 1e3 * attribution_seconds / runs
    relp_ms = 1e3 * relp_seconds / runs
    print(f"prompts: {len(prepared)} ({np.mean(tokens):.1f} tokens on average), {args.repeats} "
          f"repeats")
    print(f"clean forward: {clean_ms:.1f} ms; forward + backward + estimates: "
          f"{attribution_ms:.1f} ms per prompt; ratio {attribution_ms / clean_ms:.2f}")
    print(f"with RelP (forward + 2 backward + both estimates): {relp_ms:.1f} ms per prompt; "
          f"{relp_ms / clean_ms:.2f}x a clean forward, {relp_ms / attribution_ms:.2f}x AtP alone")
    print(f"saved for the backward: {saved / 2**20:.1f} MiB at {len(longest.input_ids)} tokens "
          f"= {per_token_layer / 1024:.1f} KiB per token and layer")
    print(json.dumps({
        "cost_ratio_vs_clean_forward": round(attribution_ms / clean_ms, 2),
        "clean_ms_per_prompt": round(clean_ms, 2),
        "attribution_ms_per_prompt": round(attribution_ms, 2),
        "atp_relp_ms_per_prompt": round(relp_ms, 2),
        "atp_relp_ratio_vs_clean_forward": round(relp_ms / clean_ms, 2),
        "atp_relp_ratio_vs_atp_alone": round(relp_ms / attribution_ms, 2),
        "prompt_tokens_mean": round(float(np.mean(tokens)), 2),
        "saved_bytes_longest_prompt": saved, "longest_prompt_tokens": len(longest.input_ids),
        "saved_bytes_per_token_layer": round(per_token_layer),
        "n_prompts": len(prepared), "repeats": args.repeats, "threads": args.threads,
        "chat_template": args.chat_template,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
