"""The census: its neuron set, the ranking agreement of an estimate, and its cost estimate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import LLAMA_8B_CONFIG
from neuron_effects.census import (census_columns, census_estimate, census_layers,
                                   census_neurons, layer_ranking_agreement, ranking_agreement,
                                   table_neurons, top_neurons)
from neuron_effects.cost import ModelShape, device_rates
from neuron_effects.inputs import InputError, Neuron


def test_census_layers_all_some_none_and_out_of_range():
    assert census_layers("all", 4) == [0, 1, 2, 3]
    assert census_layers([3, 1, 3], 4) == [1, 3]
    assert census_layers(None, 4) == []
    with pytest.raises(InputError, match=r"census.layers: \[4\] out of range"):
        census_layers([1, 4], 4)


def test_census_neurons_keep_profile_ids_and_add_every_other_neuron():
    profile = [Neuron("my-favourite", 1, 2), Neuron("L0/N5", 0, 5)]
    neurons = census_neurons(profile, [1, 2], 4)
    assert neurons[:2] == profile
    keys = [(n.layer, n.neuron) for n in neurons]
    assert len(keys) == len(set(keys)) == 2 + 7
    assert {(layer, n) for layer in (1, 2) for n in range(4)} <= set(keys)
    assert Neuron("L2/N3", 2, 3) in neurons


def test_ranking_agreement_by_hand():
    exact = pd.Series([10.0, 9, 8, 7, 6, 5], index=list("abcdef"))
    assert ranking_agreement(exact * 2, exact, 2) == {
        "precision_at_k": 1.0, "recall_at_k": 1.0, "rank_spearman": pytest.approx(1.0)}
    # the estimate ranks b, c, a, ...: top 2 {b, c} holds one of {a, b}; top 4 holds both
    estimate = pd.Series([8.0, 10, 9, 1, 2, 3], index=list("abcdef"))
    result = ranking_agreement(estimate, exact, 2)
    assert result["precision_at_k"] == 0.5 and result["recall_at_k"] == 1.0
    assert math.isnan(ranking_agreement(estimate.iloc[:0], exact.iloc[:0], 2)["precision_at_k"])


def test_layer_ranking_agreement_over_every_neuron_of_a_layer():
    rng = np.random.default_rng(0)
    rows = []
    for layer in (0, 1):
        for n in range(40):
            for prompt in range(3):
                total = rng.normal() * (n + 1)
                rows.append({"prompt_id": f"p{prompt}", "neuron_id": f"L{layer}/N{n}",
                             "layer": layer, "total": total,
                             "total_atp": total if layer == 0 else -rng.normal() * (n + 1)})
    table = layer_ranking_agreement(pd.DataFrame(rows), ks=(10, 100)).set_index("layer")
    assert table.loc[0, "atp_precision_at_10"] == 1.0 and table.loc[0, "atp_recall_at_10"] == 1.0
    assert table.loc[0, "atp_tenth"] == 4 and table.loc[0, "atp_precision_at_tenth"] == 1.0
    assert table.loc[0, "atp_rank_spearman"] == pytest.approx(1.0)
    assert "atp_precision_at_100" not in table  # 100 >= the layer's 40 neurons
    assert table.loc[1, "atp_rank_spearman"] < 1.0


def test_census_estimate_of_llama_8b():
    """All 458,752 neurons x 100 prompts = 45.9 M rows at the H200's measured rate (4,904
    mixed-layer rows/s at 128 tokens, the cost model's h200 rate): about 2.6 h of compute (the
    issue's figure)."""
    shape, h200 = ModelShape.from_config(LLAMA_8B_CONFIG), device_rates("h200")
    whole = census_estimate(shape, h200, range(32), 100)
    assert whole.neurons == 458_752 and whole.rows == 45_875_200
    assert whole.compute_hours == pytest.approx(45_875_200 / 4904 / 3600, rel=0.05)
    assert whole.gpu_hours > whole.compute_hours
    fixed = h200.fixed_s(shape.weight_bytes)
    assert whole.compute_hours * 3600 / whole.jobs >= 3 * fixed  # compute >= 3x fixed per job
    assert 15e9 < whole.disk_bytes < 40e9
    # the aggregation's one CPU core: 45.9 M rows and 2.39 G rows of mediation tables
    assert whole.aggregate_hours == pytest.approx(
        (6 + 45_875_200 * 22e-6 + 14_336 * 100 * sum(63 - 2 * l + 20 for l in range(32))
         * 1.2e-6) / 3600)
    assert census_estimate(shape, h200, range(32), 100, mediators=False).aggregate_hours == \
        pytest.approx((6 + 45_875_200 * 22e-6) / 3600)
    assert census_estimate(shape, device_rates("h100"), range(32), 100).gpu_hours > \
        whole.gpu_hours
    late = census_estimate(shape, h200, [30, 31], 100)
    early = census_estimate(shape, h200, [0, 1], 100)
    assert late.rows == early.rows and late.compute_hours < early.compute_hours / 5
    assert census_estimate(shape, h200, [], 100).jobs == 0


def _census_rows() -> pd.DataFrame:
    """3 prompts x (layer 0: 4 neurons, layer 1: 2 neurons), |total| growing with the index."""
    rows = []
    for layer, width in ((0, 4), (1, 2)):
        for n in range(width):
            for prompt in range(3):
                direct = (n + 1) * (1 if prompt else -1)
                rows.append({"prompt_id": f"p{prompt}", "neuron_id": f"L{layer}/N{n}",
                             "layer": layer, "direct": float(direct),
                             "indirect": 0.5 * direct, "total": 1.5 * direct})
    return pd.DataFrame(rows)


def test_census_columns_rank_every_neuron_in_its_layer():
    per_prompt = _census_rows()
    neurons = per_prompt.groupby("neuron_id", sort=False).agg(
        layer=("layer", "first"), mean_abs_total=("total", lambda s: s.abs().mean())
    ).reset_index()
    result = census_columns(neurons, per_prompt, ["L0/N1"]).set_index("neuron_id")
    assert result["in_profile"].sum() == 1 and result.loc["L0/N1", "in_profile"]
    assert result.loc["L0/N3", "mean_abs_direct"] == pytest.approx(4.0)
    assert result.loc["L0/N3", "mean_abs_indirect"] == pytest.approx(2.0)
    assert result.loc["L0/N3", "rank_in_layer"] == 1 and result.loc["L0/N0", "rank_in_layer"] == 4
    assert result.loc["L0/N3", "percentile_in_layer"] == 1.0
    assert result.loc["L0/N0", "percentile_in_layer"] == 0.0
    assert result.loc["L1/N1", "rank_in_layer"] == 1
    table = table_neurons(result.reset_index(), 2)
    assert list(table["neuron_id"]) == ["L0/N1", "L0/N2", "L0/N3"]  # profile + top 2 others
    by_layer = top_neurons(result.reset_index(), "layer", 1).set_index("layer")
    assert by_layer.loc[0, "top_|total|"].startswith("L0/N3 (+6)")
    by_prompt = top_neurons(per_prompt, "prompt_id", 2).set_index("prompt_id")
    assert by_prompt.loc["p0", "top_|direct|"] == "L0/N3 (-4), L0/N2 (-3)"
