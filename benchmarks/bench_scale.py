"""Benchmark at scale: a random-weight model with Llama-3.1-8B's exact shape (float32 or bf16).

Measures the fast exact path (:func:`neuron_effects.effects.compute_effects`) on one prompt of
``--prompt-tokens`` random tokens: treated rows per second for neurons of one start layer (at
several layer positions) and for a uniform mix of all layers, with full-vocabulary metrics and
with target-only metrics; achieved TFLOP/s against a FLOP model; peak memory; and the projected
time of the user's job (8,177 neurons x 100 prompts) from the measured mixed-layer throughput.

On CUDA the model is Llama-3.1-8B-shaped (no download: random weights, 32 GB in float32, 16 GB
in bf16). Without a
GPU it runs a scaled-down Llama config (same code path) so that it stays runnable here; the
projection then also gives the H200 time implied by the FLOP model.

Usage: .venv/bin/python benchmarks/bench_scale.py [--device auto] [--prompt-tokens 128]
       [--dtype float32|bfloat16] [--tf32]   (--tf32: allow TF32, to measure what it would gain)
       [--products split_bf16 --split-parts 3]   (float32 model, split-bf16 products)
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neuron_effects.clean import run_clean
from neuron_effects.cost import ModelShape
from neuron_effects.effects import EffectSettings, auto_batch_rows, compute_effects, neuron_block
from neuron_effects.inputs import Neuron
from neuron_effects.model import (DTYPES, LlamaFamily, precision_flags, round_parameters,
                                  set_precision_flags)
from neuron_effects.products import PRODUCTS, SPLIT_PARTS, use_products

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
)
# The same architecture, scaled down for a CPU (about 1/40 of the FLOPs per row).
CPU_SCALED = {**LLAMA_31_8B, "hidden_size": 1024, "intermediate_size": 3584,
              "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4,
              "vocab_size": 32064}
USER_JOB = {"neurons": 8177, "prompts": 100}
H200_BF16_PEAK = 790e12  # dense bf16 FLOP/s measured on such a machine (issue 5)
H200_FP32_PEAK = 67e12  # dense float32 FLOP/s without TF32 (H100 SXM and H200 alike)


def row_flops(config: LlamaConfig, start_layer: int, n_tokens: int, full_vocab: bool) -> float:
    """Per treated row: the replay of layers start+1.. plus the total's unembedding, counted
    without the mediation split (as the achieved TFLOP/s of BENCHMARKS.md section 0 were)."""
    return ModelShape.from_config(config).row_flops(start_layer, n_tokens, full_vocab,
                                                    mediators=False)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(function, device: torch.device, repeats: int) -> float:
    function()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, default=0, help="rows per batch (0: auto)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 products")
    parser.add_argument("--products", default="float32", choices=PRODUCTS,
                        help="split_bf16: bf16-exact weights, split-bf16 products (float32 model)")
    parser.add_argument("--split-parts", type=int, default=3, choices=SPLIT_PARTS)
    args = parser.parse_args()
    set_precision_flags()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    shape = LLAMA_31_8B if device.type == "cuda" else CPU_SCALED
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        torch.set_default_dtype(DTYPES[args.dtype])
        causal_lm = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    if args.products == "split_bf16":  # published Llama weights are exactly bf16
        round_parameters(causal_lm, torch.bfloat16)
    model = LlamaFamily(causal_lm)
    use_products(model, args.products, args.split_parts)
    build_seconds = time.perf_counter() - started
    ids = torch.randint(0, config.vocab_size, (args.prompt_tokens,)).tolist()
    clean_seconds = timed(lambda: run_clean(model, ids, "bench"), device, args.repeats)
    clean = run_clean(model, ids, "bench")
    target = int(clean.logits.argmax())
    generator = torch.Generator().manual_seed(1)

    def neurons_at(layers: list[int], count: int) -> list[Neuron]:
        picks = torch.randint(0, config.intermediate_size, (count,), generator=generator)
        return [Neuron(f"L{layers[i % len(layers)]}/N{int(n)}", layers[i % len(layers)], int(n))
                for i, n in enumerate(picks)]

    results: dict[str, dict] = {}
    last = config.num_hidden_layers - 1
    positions = sorted({0, last // 4, last // 2, 3 * last // 4, last})
    for full_vocab in (True, False):
        rows = args.rows or auto_batch_rows(model, len(ids), full_vocab)
        settings = EffectSettings(batch_rows=rows, full_vocab=full_vocab)
        mode = "full_vocab" if full_vocab else "target_only"
        per_layer = {}
        for layer in positions:
            block = neuron_block(model, neurons_at([layer], rows), full_vocab)
            seconds = timed(lambda: compute_effects(model, clean, block, settings, target),
                            device, args.repeats)
            flops = rows * row_flops(config, layer, len(ids), full_vocab)
            per_layer[layer] = {"rows_per_s": round(rows / seconds, 1),
                                "tflop_per_s": round(flops / seconds / 1e12, 3)}
        mixed_neurons = neurons_at(list(range(config.num_hidden_layers)), 2 * rows)
        block_seconds = timed(lambda: neuron_block(model, mixed_neurons, full_vocab), device, 1)
        block = neuron_block(model, mixed_neurons, full_vocab)
        seconds = timed(lambda: compute_effects(model, clean, block, settings, target), device,
                        args.repeats)
        flops = sum(row_flops(config, n.layer, len(ids), full_vocab) for n in mixed_neurons)
        mixed_rate = len(mixed_neurons) / seconds
        results[mode] = {
            "batch_rows": rows, "by_start_layer": per_layer,
            "mixed_rows_per_s": round(mixed_rate, 1),
            "mixed_tflop_per_s": round(flops / seconds / 1e12, 3),
            "mixed_gflop_per_row": round(flops / len(mixed_neurons) / 1e9, 3),
            "block_ms_per_neuron": round(1e3 * block_seconds / len(mixed_neurons), 4),
        }
        print(f"{mode}: {rows} rows/batch, mixed layers {mixed_rate:.1f} rows/s "
              f"({results[mode]['mixed_tflop_per_s']} TFLOP/s); by start layer: {per_layer}")

    # The user's job on the measured device: every (neuron, prompt) row, the per-block
    # unembedded directions once per neuron and prompt chunk (25 prompts), one clean forward
    # per prompt. On a CPU this is the scaled-down model: read it as a code-path check.
    full = results["full_vocab"]
    perturbations = USER_JOB["neurons"] * USER_JOB["prompts"]
    job_seconds = (perturbations / full["mixed_rows_per_s"]
                   + USER_JOB["neurons"] * 4 * full["block_ms_per_neuron"] / 1e3
                   + USER_JOB["prompts"] * clean_seconds)
    llama = LlamaConfig(**LLAMA_31_8B)
    peak = H200_FP32_PEAK if args.dtype == "float32" else H200_BF16_PEAK
    job_flop = USER_JOB["prompts"] * sum(
        row_flops(llama, layer, args.prompt_tokens, True) * USER_JOB["neurons"]
        / llama.num_hidden_layers for layer in range(llama.num_hidden_layers))
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_shape": "Llama-3.1-8B" if shape is LLAMA_31_8B else "Llama-3.1-8B scaled down",
        "dtype": args.dtype, "products": args.products, "split_parts": args.split_parts,
        "precision_flags": precision_flags(),
        "prompt_tokens": args.prompt_tokens,
        "build_seconds": round(build_seconds, 1), "clean_forward_ms": round(1e3 * clean_seconds, 2),
        **{f"{mode}_{key}": value for mode, values in results.items()
           for key, value in values.items()},
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        "user_job_perturbations": perturbations,
        "projected_user_job_seconds_this_device": round(job_seconds, 1),
        "user_job_pflop_llama_8b": round(job_flop / 1e15, 2),
        "h200_seconds_at_peak": round(job_flop / peak, 1),
        "h200_seconds_at_40pct_mfu": round(job_flop / (0.4 * peak), 1),
    }))


if __name__ == "__main__":
    main()
