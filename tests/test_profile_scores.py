"""The profile's own scores (``profile_scores``): read at parse time, judged against the exact
mean totals."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from neuron_effects.agreement import spearman
from neuron_effects.inputs import InputError, read_profile_scores
from neuron_effects.profile_scores import COLUMNS, judge_field, judge_profile_scores


def _profile(tmp_path, profiles) -> str:
    path = tmp_path / "neurons.json"
    path.write_text(json.dumps({"profiles": profiles}))
    return str(path)


def test_scores_are_read_by_key_or_dotted_path_and_missing_ones_left_out(tmp_path):
    path = _profile(tmp_path, [
        {"neuron_id": "L0/N1", "layer": 0, "neuron": 1, "attribution": 0.5,
         "stats": {"score": -2}},
        {"layer": 1, "neuron": 3, "attribution": None},  # null: not given
        {"neuron_id": "L2/N4", "layer": 2, "neuron": 4, "stats.score": 7.0},  # a literal key
    ])
    scores = read_profile_scores(path, ["attribution", "stats.score"])
    assert scores == {"attribution": {"L0/N1": 0.5}, "stats.score": {"L0/N1": -2.0,
                                                                     "L2/N4": 7.0}}
    assert read_profile_scores(path, []) == {}


@pytest.mark.parametrize("value", ["0.5", True, [1.0], {"x": 1}, float("nan"),
                                   float("inf")])
def test_a_non_numeric_score_stops_the_parse_naming_neuron_field_and_file(tmp_path, value):
    path = _profile(tmp_path, [
        {"neuron_id": "L0/N1", "layer": 0, "neuron": 1, "attribution": 0.5},
        {"layer": 3, "neuron": 9, "attribution": value}])
    with pytest.raises(InputError) as error:
        read_profile_scores(path, ["attribution"])
    message = str(error.value)
    assert "'L3/N9'" in message and "'attribution'" in message and path in message
    assert "profile #1" in message


def _neurons(mean_total: np.ndarray) -> pd.DataFrame:
    ids = [f"L0/N{i}" for i in range(len(mean_total))]
    return pd.DataFrame({"neuron_id": ids, "mean_total": mean_total,
                         "mean_abs_total": np.abs(mean_total) + 0.01})


def test_the_exact_mean_ranks_at_one_and_its_negation_at_minus_one():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=300)
    neurons = _neurons(exact)
    ids = list(neurons["neuron_id"])
    same = dict(zip(ids, exact))
    table = judge_profile_scores({"same": same, "negated": {k: -v for k, v in same.items()}},
                                 neurons)
    assert list(table.columns) == list(COLUMNS) and list(table["field"]) == ["same", "negated"]
    same_row, negated = table.iloc[0], table.iloc[1]
    assert same_row["spearman"] == pytest.approx(1.0) and negated["spearman"] == pytest.approx(-1)
    assert same_row["sign_agreement"] == 1.0 and negated["sign_agreement"] == 0.0
    # |field| ranks as the mean |total| does, whatever the sign
    for row in (same_row, negated):
        assert row["spearman_abs"] == pytest.approx(1.0)
        assert row["precision_at_10"] == row["precision_at_100"] == 1.0
        assert row["precision_at_tenth"] == 1.0
        assert row["n_neurons"] == 300 and row["n_missing"] == 0


def test_missing_neurons_are_left_out_and_counted_and_precision_needs_more_than_k():
    exact = np.array([3.0, -2.0, 1.0, 0.0, -0.5, 4.0])
    neurons = _neurons(exact)
    scores = {"L0/N0": 1.0, "L0/N1": 1.0, "L0/N2": -1.0, "L0/N3": 5.0, "L0/N5": 2.0,
              "L9/N9": 8.0}  # L0/N4 missing; L9/N9 not a studied neuron
    row = judge_field("f", scores, neurons)
    kept = [0, 1, 2, 3, 5]
    values = np.array([1.0, 1.0, -1.0, 5.0, 2.0])
    assert row["n_neurons"] == 5 and row["n_missing"] == 1
    assert row["spearman"] == pytest.approx(spearman(values, exact[kept]))
    assert row["spearman_abs"] == pytest.approx(spearman(np.abs(values),
                                                         np.abs(exact[kept]) + 0.01))
    # signs over the neurons with a non-zero mean total: 0 (+,+), 1 (+,-), 2 (-,+), 5 (+,+)
    assert row["sign_agreement"] == pytest.approx(2 / 4)
    assert math.isnan(row["precision_at_10"]) and math.isnan(row["precision_at_100"])
    # a tenth of 5 neurons: k = 1; top |field| is L0/N3 (mean |total| 0.01), top exact L0/N5
    assert row["precision_at_tenth"] == 0.0
    nothing = judge_field("g", {}, neurons)
    assert nothing["n_neurons"] == 0 and nothing["n_missing"] == 6
    assert math.isnan(nothing["spearman"]) and math.isnan(nothing["sign_agreement"])
