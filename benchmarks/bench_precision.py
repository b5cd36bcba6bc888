"""Benchmark: how much of a single neuron's effect survives bfloat16, float16, float32 and split-bf16.

SmolLM2-135M-Instruct with its weights rounded to bfloat16 (so that every dtype below holds
exactly the same weights), ``--per-layer`` random neurons in each of the 30 layers (seeded),
the first ``--prompts-used`` demo prompts, treatment ``add``, effects on the target logit (the
given target, else the float64 clean top token). The effects are computed by the workflow's
engine (:func:`neuron_effects.effects.compute_effects`, target-only metrics) with the model in
bfloat16, float16, float32 and float64, and with ``compute.products: split_bf16`` (2 or 3 bf16
parts per float32 activation, :mod:`neuron_effects.products`) on the float32 model; float64 is
taken as the truth.

Per dtype and per effect (total, indirect, direct), against the truth:

* ``median_abs_error``, ``max_abs_error``: of |run - truth|;
* ``median_abs_truth``: median |truth|;
* ``rows_off_10pct``: fraction of rows with |run - truth| > 0.1 |truth|, over the rows whose
  |truth| is at least ``RELATIVE_ERROR_FLOOR`` (1e-3);
* ``sign_flips``: fraction of those rows where run and truth have opposite signs;
* ``correlation``: Pearson correlation with the truth over all rows.

Usage: .venv/bin/python benchmarks/bench_precision.py [--per-layer 10] [--prompts-used 6]
       [--device cpu|cuda] [--tf32]   (--tf32: allow TF32 for the float32 run, GPU only)
       [--modes float32 split_bf16_3 split_bf16_2]   (default: every dtype and split mode)
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import numpy as np
import pandas as pd
import torch

from neuron_effects.clean import run_clean
from neuron_effects.demo import prepared_demo_model
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.inputs import Neuron, read_prompts
from neuron_effects.model import (LlamaFamily, ModelSpec, cast_parameters, load_model,
                                  load_tokenizer, precision_flags, round_parameters)
from neuron_effects.products import use_products
from neuron_effects.prompts import prepare_prompt

# Rows counted in the relative figures: |truth| at least this (the validation's floor at the
# time of the 2026-11-25 measurements; it now derives from the logit scale).
RELATIVE_ERROR_FLOOR = 1e-3

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}
# compute.products: split_bf16 on a float32 model, with 2 or 3 bf16 parts per activation
SPLIT_MODES = {"split_bf16_2": 2, "split_bf16_3": 3}
EFFECTS = ("total", "indirect", "direct")


def effects_in(model: LlamaFamily, prompts, targets, neurons, settings) -> pd.DataFrame:
    """The engine's per-(prompt, neuron) table for every prompt, in the model's dtype."""
    block = neuron_block(model, neurons, settings.full_vocab)
    frames = []
    for prepared, target in zip(prompts, targets):
        clean = run_clean(model, prepared.input_ids, prepared.prompt_id)
        frames.append(compute_effects(model, clean, block, settings, target).per_prompt
                      .assign(prompt_id=prepared.prompt_id))
    return pd.concat(frames, ignore_index=True)


def errors(run: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    error = np.abs(run - truth)
    above = np.abs(truth) >= RELATIVE_ERROR_FLOOR
    return {
        "median_abs_error": float(np.median(error)), "max_abs_error": float(error.max()),
        "median_abs_truth": float(np.median(np.abs(truth))),
        "rows_off_10pct": float((error[above] > 0.1 * np.abs(truth[above])).mean()),
        "sign_flips": float((np.sign(run[above]) != np.sign(truth[above])).mean()),
        "correlation": float(np.corrcoef(run, truth)[0, 1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="config/demo/prompts.jsonl")
    parser.add_argument("--prompts-used", type=int, default=6)
    parser.add_argument("--per-layer", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 (GPU float32 only)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--modes", nargs="+", default=[*DTYPES, *SPLIT_MODES],
                        choices=[*DTYPES, *SPLIT_MODES],
                        help="dtypes and split_bf16 modes to compute (float64 always runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = ModelSpec(str(prepared_demo_model()), dtype="float32", device=args.device)
    base, tokenizer = load_model(spec), load_tokenizer(spec)
    round_parameters(base.causal_lm, torch.bfloat16)  # the same bf16 weights for every dtype
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    prompts = [prepare_prompt(tokenizer, record, False)
               for record in read_prompts(args.prompts)[:args.prompts_used]]
    generator = torch.Generator().manual_seed(args.seed)
    neurons = [Neuron(f"L{layer}/N{int(index)}", layer, int(index))
               for layer in range(base.n_layers)
               for index in torch.randperm(base.intermediate_size,
                                           generator=generator)[:args.per_layer]]
    settings = EffectSettings(treatment="add", full_vocab=False)
    modes = [name for name in [*DTYPES, *SPLIT_MODES] if name in args.modes or name == "float64"]
    models = {name: LlamaFamily(cast_parameters(copy.deepcopy(base.causal_lm),
                                                DTYPES.get(name, torch.float32)))
              for name in modes}
    for name, parts in SPLIT_MODES.items():
        if name in models:
            use_products(models[name], "split_bf16", parts)
    truth_model = models["float64"]
    targets = [prepared.target_id if prepared.target_id is not None
               else int(run_clean(truth_model, prepared.input_ids, "p").logits.argmax())
               for prepared in prompts]
    tables, seconds = {}, {}
    for name, model in models.items():
        started = time.perf_counter()
        tables[name] = effects_in(model, prompts, targets, neurons, settings)
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {len(tables[name])} rows in {seconds[name]:.1f} s", flush=True)
    truth = tables["float64"]
    results = {name: {effect: errors(tables[name][effect].to_numpy(), truth[effect].to_numpy())
                      for effect in EFFECTS}
               for name in models if name != "float64"}
    for name, per_effect in results.items():
        for effect, figures in per_effect.items():
            print(f"{name:9s} {effect:9s} " + "  ".join(f"{key} {value:.3g}"
                                                      for key, value in figures.items()))
    print(json.dumps({
        "benchmark": "bench_precision", "model": "SmolLM2-135M-Instruct, weights rounded to bf16",
        "device": str(base.device), "threads": torch.get_num_threads(),
        "neurons": len(neurons), "prompts": len(prompts), "rows": len(truth),
        "treatment": "add", "relative_floor": RELATIVE_ERROR_FLOOR, "tf32": args.tf32,
        "precision_flags": precision_flags(), "seconds": seconds, "results": results,
        "torch": torch.__version__, "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
