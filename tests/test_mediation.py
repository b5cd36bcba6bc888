"""The exact split of the indirect effect (mediation) against hooked full forwards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_model
from engine_checks import random_neurons
from neuron_effects.clean import run_clean
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.inputs import Neuron
from neuron_effects.model import LlamaFamily, cast_parameters
from neuron_effects.reference import reference_mediation

PROMPT = [5, 17, 2, 99, 43, 8, 61, 30, 12, 77, 3]
CLOSURE = 1e-5
TOLERANCE = 1e-4


def assert_split_closes(per_prompt: pd.DataFrame) -> None:
    """indirect = indirect_attn + indirect_mlp + indirect_norm (target and logit difference)."""
    for suffix in ("", "_logit_diff"):
        parts = (per_prompt[f"indirect_attn{suffix}"] + per_prompt[f"indirect_mlp{suffix}"]
                 + per_prompt[f"indirect_norm{suffix}"])
        assert (parts - per_prompt[f"indirect{suffix}"]).abs().max() <= CLOSURE, suffix


def check_against_reference(model: LlamaFamily, input_ids: list[int], neurons: list[Neuron],
                            settings: EffectSettings, target: int, distractor: int,
                            means: torch.Tensor | None = None) -> dict[str, float]:
    """Every layer's, head's and neuron's contribution vs the reference; returns the largest
    |fast - reference| per kind and the largest |contribution| (so a test sees it is not 0)."""
    layers = sorted({n.layer for n in neurons}) if settings.positions == "all" else ()
    clean = run_clean(model, input_ids, "p", layers)
    tables = compute_effects(model, clean, neuron_block(model, neurons, True), settings, target,
                             distractor, means)
    per_prompt = tables.per_prompt
    assert_split_closes(per_prompt)
    norm_weight, unembedding, _ = model.readout()
    u = norm_weight * unembedding[target]
    worst = {"attn": 0.0, "mlp": 0.0, "norm": 0.0, "neuron": 0.0, "head": 0.0, "size": 0.0}
    mediation = tables.mediation.set_index(["neuron_id", "layer", "component"])["contribution"]
    for row in per_prompt.itertuples():
        direction = model.output_directions(torch.tensor([row.layer]), torch.tensor([row.neuron]))
        if settings.positions == "last":
            vector = row.scale * direction[0]
        else:  # the per-position scales, recomputed as the fast path does
            from neuron_effects.treatments import treatment_scales

            per_position = clean.full_activations[row.layer][:, row.neuron]
            mean = None if means is None else means[row.layer, row.neuron]
            vector = treatment_scales(per_position, settings.treatment, mean)[:, None] \
                * direction[0]
        expected = reference_mediation(model, clean, row.layer, vector, u)
        # the reference itself: the split closes on its own total
        closes = (expected["attn"].sum() + expected["mlp"].sum() + expected["norm_term"]
                  + row.direct_frozen_norm - expected["total"])
        assert abs(float(closes)) <= CLOSURE
        downstream = range(row.layer + 1, model.n_layers)
        for component in ("attn", "mlp"):
            fast = np.array([mediation[(row.neuron_id, layer, component)]
                             for layer in downstream])
            reference = expected[component][row.layer + 1:].numpy()
            worst[component] = max(worst[component], float(np.abs(fast - reference).max(
                initial=0.0)))
            worst["size"] = max(worst["size"], float(np.abs(reference).max(initial=0.0)))
            # layers at or above the neuron's own carry nothing, in the reference too
            assert float(expected[component][:row.layer + 1].abs().max()) == 0.0
        assert row.layer == model.n_layers - 1 or (row.neuron_id, -1, "norm") in mediation
        worst["norm"] = max(worst["norm"], abs(float(mediation[(row.neuron_id, -1, "norm")])
                                               - float(expected["norm_term"])))
        top = tables.mediators[tables.mediators["neuron_id"] == row.neuron_id]
        for kind, values in (("neuron", expected["neurons"]), ("head", expected["heads"])):
            mine = top[top["kind"] == kind]
            assert (mine["layer"] > row.layer).all()
            for item in mine.itertuples():
                worst[kind] = max(worst[kind], abs(item.contribution
                                                   - float(values[item.layer, item.index])))
            # the kept ones are the largest: the k-th kept is >= every other downstream one
            downstream_values = values[row.layer + 1:].abs().flatten()
            if len(mine):
                kth = downstream_values.topk(len(mine)).values[-1]
                assert abs(mine["contribution"].abs().min() - float(kth)) <= TOLERANCE
            else:
                assert row.layer == model.n_layers - 1
    return worst


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("treatment", ["add", "zero_ablate", "mean_ablate"])
def test_split_matches_reference(architecture, positions, treatment):
    model = tiny_model(architecture)
    clean = run_clean(model, PROMPT, "p")
    means = clean.activations * 0.5 + 0.1
    settings = EffectSettings(positions=positions, treatment=treatment, batch_rows=5,
                              vocab_rows=3, mediator_top_k=4)
    worst = check_against_reference(model, PROMPT, random_neurons(model, 2, seed=3), settings,
                                     7, 11, means)
    size = worst.pop("size")
    assert max(worst.values()) <= TOLERANCE, worst
    assert size > 1e-2  # the contributions dwarf the tolerance


def test_split_of_a_float64_model_is_computed_in_float64():
    """A float64 model (cast as `load_model` casts: parameters only), as bench_precision uses
    for its truth, reads out in float64: the split runs in that dtype (it crashed on mixing
    float64 directions with float32 weights) and agrees with the reference far below float32's
    rounding."""
    model = LlamaFamily(cast_parameters(tiny_model().causal_lm, torch.float64))
    settings = EffectSettings(batch_rows=5, mediator_top_k=4)
    worst = check_against_reference(model, PROMPT, random_neurons(model, 2, seed=3), settings,
                                     7, 11)
    size = worst.pop("size")
    assert max(worst.values()) <= 1e-6, worst
    assert size > 1e-2


def test_last_layer_neuron_has_only_the_norm_row():
    model = tiny_model()
    last = model.n_layers - 1
    clean = run_clean(model, PROMPT, "p")
    tables = compute_effects(model, clean, neuron_block(model, [Neuron("a", last, 3),
                                                                Neuron("b", 1, 5)], True),
                             EffectSettings(), 7, 11)
    rows = tables.mediation[tables.mediation["neuron_id"] == "a"]
    assert rows[["layer", "component"]].values.tolist() == [[-1, "norm"]]
    assert (tables.mediators["neuron_id"] == "a").sum() == 0
    other = tables.mediation[tables.mediation["neuron_id"] == "b"]
    assert len(other) == 2 * (model.n_layers - 2) + 1
    assert_split_closes(tables.per_prompt)


def test_disabled_mediators_leave_effects_unchanged():
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    block = neuron_block(model, random_neurons(model, 3, seed=4), True)
    on = compute_effects(model, clean, block, EffectSettings(batch_rows=4), 7, None)
    off = compute_effects(model, clean, block, EffectSettings(batch_rows=4, mediators=False), 7)
    split = [c for c in on.per_prompt if c.startswith(("indirect_attn", "indirect_mlp",
                                                       "indirect_norm"))]
    pd.testing.assert_frame_equal(on.per_prompt.drop(columns=split),
                                  off.per_prompt.drop(columns=split))
    assert off.per_prompt[split].isna().all().all() and off.mediation.empty
    assert on.per_prompt["indirect_attn_logit_diff"].isna().all()  # no distractor
    assert on.per_prompt["indirect_attn"].notna().all()


def test_split_is_invariant_to_batch_size():
    model = tiny_model("qwen3")
    clean = run_clean(model, PROMPT, "p")
    neurons = random_neurons(model, 4, seed=5)
    tables = [compute_effects(model, clean, neuron_block(model, neurons, True),
                              EffectSettings(batch_rows=rows), 7, 11) for rows in (1, 7, 64)]
    for other in tables[1:]:
        np.testing.assert_allclose(other.mediation["contribution"],
                                   tables[0].mediation["contribution"], atol=1e-5)
        # ranks may swap between near-equal mediators (rounding): compare the ranked sizes
        assert other.mediators[["neuron_id", "kind", "rank"]].equals(
            tables[0].mediators[["neuron_id", "kind", "rank"]])
        np.testing.assert_allclose(other.mediators["contribution"].abs(),
                                   tables[0].mediators["contribution"].abs(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["last", "all"])
def test_split_matches_reference_on_smollm2(smollm2, positions):
    from neuron_effects.inputs import PromptRecord
    from neuron_effects.prompts import prepare_prompt

    model, tokenizer = smollm2
    prepared = prepare_prompt(tokenizer, PromptRecord(
        "p", "Penicillin was discovered in 1928 by the Scottish scientist Alexander",
        " Fleming", " Pasteur", 1))
    neurons = [n for n in random_neurons(model, 1, seed=12) if n.layer % 6 == 0 or n.layer == 29]
    settings = EffectSettings(positions=positions, batch_rows=8, vocab_rows=8)
    worst = check_against_reference(model, prepared.input_ids, neurons, settings,
                                    prepared.target_id, prepared.distractor_id)
    size = worst.pop("size")
    assert max(worst.values()) <= TOLERANCE, worst
    assert size > 1e-3
