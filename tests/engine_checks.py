"""Comparisons of the fast path with the reference path, shared by the tiny and SmolLM2 tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from neuron_effects.clean import CleanRun, run_clean
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.inputs import Neuron
from neuron_effects.model import LlamaFamily
from neuron_effects.error_scale import float32_error_bound, logit_scale
from neuron_effects.validation import CHECKED, compare_with_reference


def random_neurons(model: LlamaFamily, per_layer: int, seed: int) -> list[Neuron]:
    generator = torch.Generator().manual_seed(seed)
    neurons = []
    for layer in range(model.n_layers):
        for index in torch.randperm(model.intermediate_size, generator=generator)[:per_layer]:
            neurons.append(Neuron(f"L{layer}/N{int(index)}", layer, int(index)))
    return neurons


def fast_and_reference(
    model: LlamaFamily, input_ids: list[int], neurons: list[Neuron], settings: EffectSettings,
    target: int, distractor: int | None, mean_activations: torch.Tensor | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, CleanRun]:
    """The fast path's table and, row by row, |fast - reference| for every checked column
    (:data:`neuron_effects.validation.CHECKED`; 0 where a column is undefined on both sides),
    with the tolerance and noise floor derived from the prompt's logit scale."""
    layers = sorted({n.layer for n in neurons}) if settings.positions == "all" else ()
    clean = run_clean(model, input_ids, "prompt", layers)
    block = neuron_block(model, neurons, settings.full_vocab)
    fast = compute_effects(model, clean, block, settings, target, distractor,
                          mean_activations).per_prompt
    fast = fast.assign(target_id=target, distractor_id=distractor)
    tolerance = float32_tolerance(clean)
    floor = tolerance if settings.noise_floor is None else settings.noise_floor
    differences = pd.DataFrame([
        compare_with_reference(model, clean, row, settings.treatment, settings.positions,
                               settings.full_vocab, settings.top_k, floor, tolerance)
        for _, row in fast.iterrows()
    ], columns=list(CHECKED)).fillna(0.0)  # a missing key: undefined on both sides
    return fast, differences, clean


def float32_tolerance(clean: CleanRun) -> float:
    """float32's error bound at the logit scale of ``clean`` (the validation's tolerance)."""
    return float32_error_bound(logit_scale(clean.logits))


def assert_matches_reference(differences: pd.DataFrame, tolerance: float) -> None:
    """Every checked column of every row within ``tolerance`` (an inf, from a NaN or infinite
    value on one side, fails)."""
    worst = differences.max()
    assert np.isfinite(differences.to_numpy()).all() and worst.max() <= tolerance, \
        worst.sort_values().tail()


def assert_exact_decomposition(frame: pd.DataFrame) -> None:
    """indirect = total - direct and total = frozen + norm_mediated + indirect, exactly."""
    np.testing.assert_array_equal(frame["indirect"], frame["total"] - frame["direct"])
    np.testing.assert_array_equal(
        frame["direct_frozen_norm"] + frame["norm_mediated"] + frame["indirect"], frame["total"])
    np.testing.assert_array_equal(frame["norm_mediated"],
                                  frame["direct"] - frame["direct_frozen_norm"])


def assert_activations_equal_manual_recompute(model: LlamaFamily, input_ids: list[int]) -> CleanRun:
    """activations[L] == act_fn(gate_proj(x)) * up_proj(x) at the last position, x being the
    MLP's input (post_attention_layernorm of the residual) captured by a hook in the forward."""
    inputs = []
    handles = [block.mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
               for block in model.layers]
    try:
        clean = run_clean(model, input_ids, "p")
    finally:
        for handle in handles:
            handle.remove()
    assert len(inputs) == model.n_layers
    for layer, block in enumerate(model.layers):
        x = inputs[layer][0, -1]
        manual = block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)
        torch.testing.assert_close(clean.activations[layer], manual.detach(), rtol=1e-5,
                                   atol=1e-5)
    return clean
