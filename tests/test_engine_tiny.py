"""Exactness of the fast path on tiny random models (seeded), for every architecture and mode."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_model
from engine_checks import (
    assert_activations_equal_manual_recompute,
    assert_exact_decomposition,
    assert_matches_reference,
    fast_and_reference,
    float32_tolerance,
    random_neurons,
)
from neuron_effects.clean import run_clean
from neuron_effects.direct import Readout, direct_effects
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.inputs import InputError, Neuron
from neuron_effects.model import LlamaFamily
from neuron_effects.reference import reference_direct, reference_total
from neuron_effects.total import perturbed_final_hidden

TOLERANCE = 1e-4
PROMPT = [5, 17, 2, 99, 43, 8, 61, 30, 12, 77, 3]


def settings(**overrides) -> EffectSettings:
    return EffectSettings(**{"batch_rows": 5, "vocab_rows": 3, "top_k": 5, **overrides})


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_fast_path_matches_reference_on_every_metric(architecture, positions):
    model = tiny_model(architecture, attention_bias=True) if architecture == "qwen2" \
        else tiny_model(architecture)
    neurons = random_neurons(model, per_layer=3, seed=1)
    fast, differences, clean = fast_and_reference(model, PROMPT, neurons,
                                                  settings(positions=positions), 7, 11)
    assert len(fast) == len(neurons)
    assert_matches_reference(differences, float32_tolerance(clean))
    # the effects are far above float noise, so the comparison is not vacuous
    assert fast["total"].abs().median() > 2e-3
    assert_exact_decomposition(fast)


@pytest.mark.parametrize("treatment", ["zero_ablate", "mean_ablate"])
def test_other_treatments_match_reference(treatment):
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    means = clean.activations * 0.5 + 0.1
    fast, differences, clean = fast_and_reference(model, PROMPT, random_neurons(model, 3, seed=2),
                                                  settings(treatment=treatment), 7, None, means)
    assert_matches_reference(differences, float32_tolerance(clean))
    expected_scale = (-fast["activation"] if treatment == "zero_ablate"
                      else means[fast["layer"], fast["neuron"]].double().numpy()
                      - fast["activation"])
    np.testing.assert_allclose(fast["scale"], expected_scale, rtol=1e-6)


def test_zero_ablate_equals_zeroing_the_neuron():
    """zero_ablate (V = -a w_n after layer L) is exactly the effect of setting a_n to 0."""
    model = tiny_model()
    for positions in ("last", "all"):
        neurons = [Neuron("x", 1, 5), Neuron("y", 2, 40)]
        clean = run_clean(model, PROMPT, "p", [1, 2])
        block = neuron_block(model, neurons, True)
        fast = compute_effects(model, clean, block, settings(treatment="zero_ablate",
                                                             positions=positions), 7).per_prompt
        for row, neuron in zip(fast.itertuples(), neurons):
            def zero(module, args, neuron=neuron):
                acts = args[0].clone()
                acts[0, -1 if positions == "last" else slice(None), neuron.neuron] = 0.0
                return (acts,)

            handle = model.layers[neuron.layer].mlp.down_proj.register_forward_pre_hook(zero)
            try:
                with torch.inference_mode():
                    zeroed = model.causal_lm(input_ids=torch.tensor([PROMPT])).logits[0, -1]
            finally:
                handle.remove()
            assert abs(float(zeroed[7] - clean.logits[7]) - row.total) <= TOLERANCE


def test_zero_ablate_is_add_with_negated_activation():
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    block = neuron_block(model, random_neurons(model, 4, seed=3), True)
    ablated = compute_effects(model, clean, block, settings(treatment="zero_ablate"),
                             7, 11).per_prompt
    clean.activations = -clean.activations
    added = compute_effects(model, clean, block, settings(treatment="add"), 7, 11).per_prompt
    pd.testing.assert_frame_equal(ablated.drop(columns="activation"),
                                  added.drop(columns="activation"))


def test_zero_vector_gives_zero_effects():
    """mean_ablate with the mean equal to the activation: s = 0, so V = 0 in every row.

    The direct side is exactly zero. The total is taken against a V = 0 baseline row in the
    same batch; CPU GEMM kernels may round identical rows at different batch positions
    differently, so it is zero up to that rounding (a few ulp of the logits, vs effects of
    ~1e-2)."""
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    block = neuron_block(model, random_neurons(model, 4, seed=4), True)
    frame = compute_effects(model, clean, block, settings(treatment="mean_ablate"), 7, 11,
                            mean_activations=clean.activations.clone()).per_prompt
    for column in ("direct", "direct_frozen_norm", "norm_mediated", "direct_logit_diff",
                   "prob_change_direct", "top_k_direct_max"):
        assert (frame[column] == 0).all(), column
    for column in ("indirect", "total", "total_logit_diff", "prob_change_total",
                   "top_k_total_max", "top_k_indirect_max"):
        assert frame[column].abs().max() <= 1e-5, column
    assert not frame["ratio_defined"].any() and frame["direct_ratio"].isna().all()


def test_algebraic_direct_equals_frozen_downstream_forward():
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    readout = Readout(model)
    for layer in range(model.n_layers):
        direction = model.output_directions(torch.tensor([layer]), torch.tensor([9]))
        scale = torch.tensor([1.7])
        direct, frozen, _ = direct_effects(readout, clean.final_hidden, scale, direction,
                                           readout.unnormalized(direction))
        vector = scale * direction[0]
        expected = reference_direct(model, clean, layer, vector)
        expected_frozen = reference_direct(model, clean, layer, vector, freeze_norm=True)
        assert (direct[0] - expected).abs().max() <= TOLERANCE
        assert (frozen[0] - expected_frozen).abs().max() <= TOLERANCE
        assert direct.abs().max() > 1e-2 and (direct - frozen).abs().max() > 1e-4


def test_last_layer_total_equals_direct():
    """With no layer downstream, the whole effect is direct."""
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    last = model.n_layers - 1
    block = neuron_block(model, [Neuron("a", last, 3), Neuron("b", last, 50)], True)
    frame = compute_effects(model, clean, block, settings(), 7).per_prompt
    assert (frame["indirect"].abs() <= 1e-5).all()
    assert (frame["direct_ratio"] > 0.999).all()


def test_activations_equal_manual_recompute():
    clean = assert_activations_equal_manual_recompute(tiny_model(), PROMPT)
    assert clean.activations.abs().max() > 0.1


def test_invariant_to_batch_size_and_neuron_order():
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    neurons = random_neurons(model, 5, seed=5)
    frames = []
    for batch_rows, vocab_rows, order in ((1, 1, 1), (4, 2, -1), (64, 64, 1)):
        block = neuron_block(model, neurons[::order], True)
        frame = compute_effects(model, clean, block, settings(batch_rows=batch_rows,
                                                              vocab_rows=vocab_rows),
                                7, 11).per_prompt
        frames.append(frame.set_index("neuron_id").sort_index())
    effects = [c for c in frames[0].select_dtypes("number").columns if "ratio" not in c
               and c != "cancellation"]
    reference = frames[0]
    for other in frames[1:]:
        # rows of different batch positions differ by CPU GEMM rounding only (~2e-6)
        np.testing.assert_allclose(other[effects], reference[effects], rtol=1e-5, atol=1e-5)
        # the ratio amplifies that rounding by 1 / (|d| + |i|)
        magnitude = reference["direct"].abs() + reference["indirect"].abs()
        bound = 1e-5 / magnitude + 1e-6
        assert ((other["direct_ratio"] - reference["direct_ratio"]).abs() <= bound).all()
        # the top-k tokens: the same, but for a near-tie at the k-th place, which other GEMM
        # rounding may swap (seen with one CPU thread): at most one token per row differs, and
        # the top-k values agree
        shared = [len(set(a) & set(b)) for a, b in zip(other["top_k_total_tokens"],
                                                        reference["top_k_total_tokens"])]
        assert min(shared) >= 5 - 1 and sum(shared) >= 5 * len(shared) - 1, shared
        for column in ("top_k_total_max", "top_k_total_mean"):
            np.testing.assert_allclose(other[column], reference[column], rtol=1e-5, atol=1e-5)


def test_rows_of_several_start_layers_share_one_batch():
    """Replaying rows of different layers together equals replaying each layer alone."""
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    layers = torch.tensor([0, 0, 1, 2, 2, 3])
    vectors = torch.randn(6, model.hidden_size, generator=torch.Generator().manual_seed(0))
    together = perturbed_final_hidden(model, clean, layers, vectors)
    for index in range(6):
        alone = perturbed_final_hidden(model, clean, layers[index:index + 1],
                                       vectors[index:index + 1])
        # float32 GEMMs of different batch shapes round differently: a few ulps of the largest
        # hidden value (|h| ~ 45 here, ulp 4e-6), never more
        scale = float(alone.abs().max())
        torch.testing.assert_close(together[index], alone[0], rtol=0, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="sorted"):
        perturbed_final_hidden(model, clean, layers.flip(0), vectors)


def test_reference_total_is_not_trivially_zero():
    """Guards the reference itself: a hooked forward really changes the logits."""
    model = tiny_model()
    vector = torch.ones(model.hidden_size)
    assert reference_total(model, torch.tensor(PROMPT), 1, vector).abs().max() > 1e-2


def test_target_only_metrics_match_full_vocab():
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    block = neuron_block(model, random_neurons(model, 4, seed=6), True)
    full = compute_effects(model, clean, block, settings(), 7, 11).per_prompt
    cheap = compute_effects(model, clean, neuron_block(model, random_neurons(model, 4, seed=6),
                                                       False), settings(full_vocab=False), 7, 11).per_prompt
    for column in ("direct", "indirect", "total", "direct_frozen_norm", "total_logit_diff"):
        np.testing.assert_allclose(cheap[column], full[column], rtol=1e-4, atol=1e-6)
    # the ratio amplifies float32 rounding (other readout products) by 1 / (|d| + |i|)
    bound = 1e-5 / (full["direct"].abs() + full["indirect"].abs()) + 1e-6
    assert ((cheap["direct_ratio"] - full["direct_ratio"]).abs() <= bound).all()
    assert cheap["prob_change_total"].isna().all()


def test_bfloat16_fast_path_agrees_with_bfloat16_reference():
    model = tiny_model()
    model = LlamaFamily(model.causal_lm.to(torch.bfloat16))
    neurons = random_neurons(model, 2, seed=8)
    fast, differences, _ = fast_and_reference(model, PROMPT, neurons, settings(), 7, 11)
    scale = fast["total"].abs().max()
    assert differences[["total", "direct", "indirect"]].max().max() <= 0.05 * scale


def test_non_finite_activation_names_prompt_and_layer():
    model = tiny_model()
    with torch.no_grad():
        model.layers[2].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"prompt 'bad'.*layer 2"):
        run_clean(model, PROMPT, "bad")


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(InputError, match="unsupported architecture 'gpt2'.*model.model.layers"):
        LlamaFamily(gpt2)


def test_untied_and_tied_embeddings():
    for tied in (True, False):
        model = tiny_model(tie_word_embeddings=tied)
        assert (model.lm_head.weight is model.causal_lm.model.embed_tokens.weight) == tied
        _, differences, clean = fast_and_reference(model, PROMPT, random_neurons(model, 1, 9),
                                                   settings(), 7, None)
        assert_matches_reference(differences, float32_tolerance(clean))
