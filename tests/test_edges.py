"""Every profile edge measured exactly: Δa_t from the replay against hooked full forwards
(:func:`neuron_effects.reference.reference_activation_changes`), the edge table's weights and
signs, and the edges that are left out."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_model
from neuron_effects import edges
from neuron_effects.clean import run_clean
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.inputs import Neuron
from neuron_effects.profile_edges import Edge, neuron_target_weights
from neuron_effects.reference import reference_activation_changes
from neuron_effects.treatments import treatment_scales

PROMPT = [5, 17, 2, 99, 43, 8, 61, 30, 12, 77, 3]
TARGETS = {"L0/N5": [(1, 3), (2, 40), (3, 63)], "L1/N40": [(2, 7), (3, 0)],
           "L2/N17": [(3, 11), (3, 12)]}


@pytest.mark.parametrize("treatment, positions", [("add", "last"), ("zero_ablate", "last"),
                                                  ("add", "all")])
def test_delta_activation_matches_a_hooked_full_forward(treatment, positions):
    model = tiny_model()
    neurons = [Neuron(neuron_id, int(neuron_id[1]), int(neuron_id.split("N")[1]))
               for neuron_id in TARGETS]
    clean = run_clean(model, PROMPT, "p", range(model.n_layers) if positions == "all" else ())
    settings = EffectSettings(treatment=treatment, positions=positions, full_vocab=False,
                              batch_rows=2)  # two batches: requests split across them
    tables = compute_effects(model, clean, neuron_block(model, neurons, False), settings, 7,
                             edge_targets=TARGETS)
    assert list(tables.edges.columns) == list(edges.EDGE_DELTA_COLUMNS)
    assert len(tables.edges) == sum(len(targets) for targets in TARGETS.values())
    largest = 0.0
    for neuron in neurons:
        rows = tables.edges[tables.edges["neuron_id"] == neuron.neuron_id]
        direction = model.layers[neuron.layer].mlp.down_proj.weight[:, neuron.neuron]
        if positions == "last":
            vector = treatment_scales(clean.activations[neuron.layer, neuron.neuron],
                                      treatment) * direction
        else:
            per_position = clean.full_activations[neuron.layer][:, neuron.neuron]
            vector = treatment_scales(per_position, treatment)[:, None] * direction[None]
        expected = reference_activation_changes(model, torch.tensor(PROMPT), neuron.layer,
                                                vector, TARGETS[neuron.neuron_id])
        assert list(zip(rows["target_layer"], rows["target_neuron"])) == TARGETS[neuron.neuron_id]
        np.testing.assert_allclose(rows["delta_activation"], expected, rtol=0, atol=2e-5)
        np.testing.assert_allclose(rows["target_activation"], [
            float(clean.activations[layer, index]) for layer, index in TARGETS[neuron.neuron_id]])
        largest = max(largest, float(np.abs(expected).max()))
    assert largest > 0.01  # changes well above the tolerance


def test_edge_table_reports_a_wrong_sign_as_disagreeing():
    deltas = pd.DataFrame({
        "prompt_id": ["p0", "p1", "p0", "p1", "p0", "p1"],
        "neuron_id": ["L0/N1"] * 4 + ["L1/N2"] * 2,
        "target_layer": [2, 2, 3, 3, 2, 2], "target_neuron": [5, 5, 6, 6, 9, 9],
        "delta_activation": [0.2, 0.4, 1e-4, -1e-4 * 3, 0.5, 0.5],
        "target_activation": [1.0, -2.0, 1.0, 1.0, 0.0, 1.0],
    })
    gradients = {"p0": np.full((4, 10), 2.0), "p1": np.full((4, 10), 2.0)}
    gradients["p1"][3, 6] = -1.0
    listed = [Edge("neuron", 2, 5, -0.7),  # listed with the wrong sign
              Edge("neuron", 3, 6, 0.1), Edge("neuron", 3, 6, -0.3), Edge("logit", None, 42, 0.2)]
    weights = {"L0/N1": neuron_target_weights(listed)}
    assert weights["L0/N1"] == {(2, 5): -0.7, (3, 6): -0.3}  # positions merged: the largest
    table = edges.edge_table(deltas, gradients, weights)
    assert list(table.columns) == list(edges.EDGE_TABLE_COLUMNS)
    first = table.iloc[0]
    assert (first["neuron_id"], first["target_layer"], first["target_neuron"]) == ("L0/N1", 2, 5)
    assert first["delta_activation"] == pytest.approx(0.3)
    assert first["relative_delta"] == pytest.approx((0.2 + 0.2) / 2)
    assert first["exact_weight"] == pytest.approx((0.4 + 0.8) / 2)
    assert first["sign_agrees"] is False or not first["sign_agrees"]
    second = table.iloc[1]  # exact weight (2e-4 + 3e-4) / 2 > 0 against avg_weight -0.3
    assert second["exact_weight"] == pytest.approx(2.5e-4)
    assert not second["sign_agrees"] and second["relative_delta"] == pytest.approx(2e-4)
    third = table.iloc[2]  # no profile weight: sign undefined; a_t = 0 on p0 is left out
    assert math.isnan(third["avg_weight"]) and pd.isna(third["sign_agrees"])
    assert third["relative_delta"] == pytest.approx(0.5)
    real = edges.real_edges(table, 0.01).set_index("neuron_id")
    assert real.loc["L0/N1", "edge_n_measured"] == 2
    assert real.loc["L0/N1", "edge_real_fraction"] == 0.0
    flipped = edges.edge_table(deltas, gradients, {"L0/N1": {(2, 5): 0.7, (3, 6): 0.3}})
    real = edges.real_edges(flipped, 0.01).set_index("neuron_id")
    assert real.loc["L0/N1", "edge_real_fraction"] == 0.5  # (3, 6) moves a_t by only 0.02 %
    assert math.isnan(edges.edge_table(deltas, None, weights)["exact_weight"].iloc[0])


def test_edges_not_in_a_later_layer_of_the_model_are_left_out_with_a_warning():
    kept, warnings = edges.measurable_targets("L5/N3", 5, [(6, 1), (5, 2), (3, 0), (99, 3),
                                                           (7, 4000), (29, 8)], 30, 1536)
    assert kept == [(6, 1), (29, 8)]
    assert len(warnings) == 4
    assert "L5/N3 -> 5_2" in warnings[0] and "not after" in warnings[0]
    assert "L5/N3 -> 99_3" in warnings[2] and "30 layers" in warnings[2]
    assert "L5/N3 -> 7_4000" in warnings[3]
