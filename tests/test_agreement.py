"""The agreement of the first-order estimates with the exact effects, and the all-neuron table:
each function against a direct computation by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from neuron_effects import agreement


def test_grouped_neuron_agreement_equals_agreement_per_neuron():
    """neuron_agreement (grouped columns) against :func:`agreement.agreement` applied to each
    neuron's rows: 200 neurons of 1-15 prompts, with tied values, constant estimates and exact
    zeros among them."""
    rng = np.random.default_rng(4)
    frames = []
    for index in range(200):
        n = int(rng.integers(1, 16))
        exact = np.round(rng.normal(size=n), 1 if index % 5 == 0 else 6)  # ties in some
        exact[rng.random(n) < 0.1] = 0.0
        estimate = (np.full(n, 0.5) if index % 17 == 0 else exact + rng.normal(0, 0.5, n))
        frames.append(pd.DataFrame({"neuron_id": f"n{index}", "total": exact,
                                    "total_atp": estimate}))
    table = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=1)
    got = agreement.neuron_agreement(table)
    expected = pd.DataFrame([
        {"neuron_id": neuron_id, **agreement.agreement(group["total_atp"], group["total"]),
         "mean_total_atp": float(group["total_atp"].mean())}
        for neuron_id, group in table.groupby("neuron_id", sort=False)])
    assert got["atp_spearman"].isna().sum() >= 12  # below 3 prompts or constant
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=0, atol=1e-12)


def test_spearman_and_agreement():
    assert agreement.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert agreement.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert agreement.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/60
    assert math.isnan(agreement.spearman([1, 2], [1, 2]))
    assert math.isnan(agreement.spearman([1, 1, 1], [1, 2, 3]))
    result = agreement.agreement(np.array([1.1, -2.0, 0.5, 3.0]), np.array([1.0, 2.0, 0.0, 2.0]))
    assert result["atp_sign_agreement"] == pytest.approx(2 / 3)  # the exact 0 is left out
    assert result["atp_median_relative_error"] == pytest.approx(0.5)  # of 0.1, 2.0, 0.5


def test_precision_at_k():
    exact = pd.Series({"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0})
    estimate = pd.Series({"a": 5.0, "b": 1.0, "c": 4.0, "d": 3.0, "e": 0.0})
    assert agreement.precision_at_k(estimate, exact, 1) == 1.0
    assert agreement.precision_at_k(estimate, exact, 2) == 0.5  # {a, c} vs {a, b}
    assert agreement.precision_at_k(estimate, exact, 3) == pytest.approx(2 / 3)
    assert agreement.precision_at_k(estimate, exact, 9) == 1.0  # k capped at the count


def test_neuron_table_and_candidates():
    rng = np.random.default_rng(0)
    estimates = rng.normal(size=(5, 3, 8)).astype(np.float32)
    estimates[:, 2, 6] *= 100  # the largest
    estimates[:, 1, 3] *= 50  # the second, and in the profile
    profile = pd.DataFrame({"layer": [1, 0], "neuron": [3, 0]})
    table = agreement.neuron_table({"atp": estimates}, profile)
    assert len(table) == 24 and table["rank"].tolist() == list(range(1, 25))
    assert table["mean_abs_atp"].is_monotonic_decreasing
    assert tuple(table.loc[0, ["layer", "neuron"]]) == (2, 6)
    assert tuple(table.loc[1, ["layer", "neuron", "in_profile"]]) == (1, 3, True)
    row = table.set_index(["layer", "neuron"]).loc[(0, 4)]
    assert row["mean_abs_atp"] == pytest.approx(np.abs(estimates[:, 0, 4]).mean())
    assert row["max_abs_atp"] == pytest.approx(np.abs(estimates[:, 0, 4]).max())
    assert table["in_profile"].sum() == 2
    top = agreement.candidates(table, 3)
    assert top["neuron_id"].tolist()[0] == "L2/N6" and len(top) == 3
    assert "L1/N3" not in set(top["neuron_id"]) and "in_profile" not in top
    assert len(agreement.candidates(table, 100)) == 22


def test_layer_bands_are_thirds():
    assert agreement.layer_bands(30) == [("early", 0, 9), ("middle", 10, 19), ("late", 20, 29)]
    assert agreement.layer_bands(32) == [("early", 0, 10), ("middle", 11, 21),
                                           ("late", 22, 31)]
    assert agreement.layer_bands(3) == [("early", 0, 0), ("middle", 1, 1), ("late", 2, 2)]
    with pytest.raises(ValueError, match="2 layers"):
        agreement.layer_bands(2)


def test_band_agreement_against_each_band_by_hand():
    """Per (method, band): Spearman and sign agreement over the band's rows only, each against
    a direct computation on the band's rows (a band mixing in other layers would differ)."""
    rng = np.random.default_rng(1)
    layer = np.repeat(np.arange(6), 20)
    exact = rng.normal(size=layer.size)
    # the estimate agrees in the early band, is reversed in the middle, noise in the late one
    estimate = np.where(layer < 2, exact, np.where(layer < 4, -exact, rng.normal(size=layer.size)))
    per_prompt = pd.DataFrame({"layer": layer, "total": exact, "total_atp": estimate,
                               "total_relp": 2 * exact})
    bands = agreement.band_agreement(per_prompt, 6, ["atp", "relp"])
    assert list(bands["band"]) == ["early", "middle", "late"] * 2
    assert list(bands["layers"]) == ["0-1", "2-3", "4-5"] * 2
    assert (bands["rows"] == 40).all()
    atp = bands[bands["method"] == "atp"].set_index("band")
    assert atp.loc["early", "spearman"] == pytest.approx(1.0)
    assert atp.loc["middle", "spearman"] == pytest.approx(-1.0)
    assert atp.loc["middle", "sign_agreement"] == 0.0
    late = layer >= 4
    ranks = np.argsort(np.argsort(estimate[late])), np.argsort(np.argsort(exact[late]))  # no ties
    assert atp.loc["late", "spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1])
    assert atp.loc["late", "sign_agreement"] == pytest.approx(
        np.mean(np.sign(estimate[late]) == np.sign(exact[late])))
    assert (bands[bands["method"] == "relp"][["spearman", "sign_agreement"]] == 1.0).all().all()
    # a band without studied neurons: no rows, no agreement
    empty = agreement.band_agreement(per_prompt[per_prompt["layer"] < 4], 6, ["atp"])
    assert empty["rows"].tolist() == [40, 40, 0] and math.isnan(empty["spearman"].iloc[2])
