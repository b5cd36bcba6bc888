"""Summaries over prompts (neuron_effects.aggregate): classes and their boundaries, consistency,
sign alignment, the layer table, the JSON documents and the enriched profile labels."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest

from neuron_effects.aggregate import (Thresholds, enrich_profiles, neuron_documents,
                                      summarize_layers, summarize_neurons)

THRESHOLDS = Thresholds(routing_below=0.3, logit_dominant_above=0.7)


def rows(neuron_id: str, layer: int, neuron: int, ratios, aligned=None, defined=None,
         frozen=None) -> list[dict]:
    """Per-prompt rows for one neuron whose direct ratio on prompt k is ``ratios[k]`` (direct
    = r, indirect = +-(1 - r), the sign set by ``aligned``)."""
    n = len(ratios)
    aligned = [True] * n if aligned is None else aligned
    defined = [True] * n if defined is None else defined
    frozen = ratios if frozen is None else frozen
    out = []
    for k, (ratio, same_sign, is_defined, frozen_ratio) in enumerate(
            zip(ratios, aligned, defined, frozen)):
        direct, indirect = ratio, (1 - ratio) * (1 if same_sign else -1)
        total = direct + indirect
        out.append({
            "prompt_id": f"p{k}", "neuron_id": neuron_id, "layer": layer, "neuron": neuron,
            "target_token": " x", "activation": 0.5 + k, "direct": direct,
            "indirect": indirect, "total": total, "direct_frozen_norm": direct * 0.9,
            "norm_mediated": direct * 0.1,
            "direct_ratio": ratio if is_defined else math.nan,
            "direct_ratio_frozen_norm": frozen_ratio if is_defined else math.nan,
            "cancellation": 1 - abs(total) / (abs(direct) + abs(indirect)),
            "sign_aligned": bool(same_sign and is_defined), "ratio_defined": is_defined,
        })
    return out


def table(*groups: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for group in groups for row in group])


def summary(*groups: list[dict], thresholds: Thresholds = THRESHOLDS) -> pd.DataFrame:
    return summarize_neurons(table(*groups), thresholds).set_index("neuron_id")


# --- classes --------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, label", [
    (0.0, "routing-dominant"), (0.2999999, "routing-dominant"), (0.3, "mixed"), (0.5, "mixed"),
    (0.7, "mixed"), (0.7000001, "logit-dominant"), (1.0, "logit-dominant"),
    (math.nan, "undetermined"),
])
def test_classify_boundaries(ratio, label):
    """routing-dominant < 0.3 <= mixed <= 0.7 < logit-dominant, as the issue states."""
    assert str(THRESHOLDS.classify(ratio)) == label


def test_classify_vectorised_and_custom_thresholds():
    ratios = np.array([0.1, 0.25, 0.5, 0.8, np.nan])
    assert THRESHOLDS.classify(ratios).tolist() == [
        "routing-dominant", "routing-dominant", "mixed", "logit-dominant", "undetermined"]
    assert Thresholds(0.2, 0.4).classify(ratios).tolist() == [
        "routing-dominant", "mixed", "logit-dominant", "logit-dominant", "undetermined"]


@pytest.mark.parametrize("ratios, label", [
    ([0.3, 0.3], "mixed"),                 # mean exactly at the lower boundary
    ([0.7, 0.7], "mixed"),                 # mean exactly at the upper boundary
    ([0.1, 0.45], "routing-dominant"),     # mean 0.275
    ([0.95, 0.5], "logit-dominant"),       # mean 0.725
])
def test_neuron_class_uses_the_mean_ratio(ratios, label):
    assert summary(rows("n", 0, 1, ratios)).loc["n", "classification"] == label


def test_mean_std_median_and_consistency():
    result = summary(rows("a", 2, 5, [0.1, 0.2, 0.9]), rows("b", 1, 3, [0.5, 0.6, 0.1]),
                     rows("c", 1, 4, [0.8, 0.9, 0.75, 0.95]))
    a, b, c = result.loc["a"], result.loc["b"], result.loc["c"]
    assert a["mean_direct_ratio"] == pytest.approx(0.4)
    assert a["median_direct_ratio"] == pytest.approx(0.2)
    assert a["std_direct_ratio"] == pytest.approx(np.std([0.1, 0.2, 0.9]))  # ddof 0
    assert a["classification"] == "mixed"
    assert a["consistency"] == pytest.approx(0.0)  # no prompt of its own is mixed
    assert b["classification"] == "mixed" and b["consistency"] == pytest.approx(2 / 3)
    assert c["classification"] == "logit-dominant" and c["consistency"] == pytest.approx(1.0)
    # ordered by layer, then neuron index
    assert result.index.tolist() == ["b", "c", "a"]
    assert result["n_prompts"].tolist() == [3, 4, 3]


def test_undefined_ratios_are_left_out_and_all_undefined_is_undetermined():
    partly = rows("partly", 0, 1, [0.9, 0.1, 0.2], defined=[True, False, False])
    never = rows("never", 0, 2, [0.5, 0.5], defined=[False, False])
    result = summary(partly, never)
    assert result.loc["partly", "mean_direct_ratio"] == pytest.approx(0.9)
    assert result.loc["partly", "classification"] == "logit-dominant"
    assert result.loc["partly", "n_ratio_defined"] == 1
    undetermined = result.loc["never"]
    assert undetermined["classification"] == "undetermined"
    assert undetermined["classification_frozen_norm"] == "undetermined"
    for column in ("mean_direct_ratio", "std_direct_ratio", "median_direct_ratio",
                   "consistency", "aligned_fraction", "mean_cancellation"):
        assert math.isnan(undetermined[column]), column
    assert undetermined["interpretation"] == "undetermined"
    assert undetermined["n_ratio_defined"] == 0


@pytest.mark.parametrize("aligned, fraction, interpretation", [
    ([True, True, False, False], 0.5, "reinforcing"),   # the boundary counts as reinforcing
    ([True, False, False, False], 0.25, "opposing"),
    ([True, True, True, False], 0.75, "reinforcing"),
    ([False, False, False, False], 0.0, "opposing"),
])
def test_aligned_fraction_and_interpretation(aligned, fraction, interpretation):
    result = summary(rows("n", 3, 3, [0.5, 0.5, 0.5, 0.5], aligned=aligned)).loc["n"]
    assert result["aligned_fraction"] == pytest.approx(fraction)
    assert result["interpretation"] == interpretation


def test_aligned_fraction_counts_only_prompts_with_a_ratio():
    group = rows("n", 0, 0, [0.5, 0.5, 0.5, 0.5], aligned=[True, False, True, True],
                 defined=[True, True, False, False])
    assert summary(group).loc["n", "aligned_fraction"] == pytest.approx(0.5)


def test_frozen_norm_classification_is_separate():
    group = rows("entropy", 5, 9, [0.9, 0.8], frozen=[0.1, 0.2])
    result = summary(group).loc["entropy"]
    assert result["classification"] == "logit-dominant"
    assert result["classification_frozen_norm"] == "routing-dominant"
    assert result["mean_direct_ratio_frozen_norm"] == pytest.approx(0.15)


def test_means_of_the_effects():
    group = rows("n", 0, 0, [0.2, 0.6], aligned=[True, False])
    result = summary(group).loc["n"]
    frame = table(group)
    assert result["mean_total"] == pytest.approx(frame["total"].mean())
    assert result["mean_abs_total"] == pytest.approx(frame["total"].abs().mean())
    assert result["mean_cancellation"] == pytest.approx(frame["cancellation"].mean())
    assert result["mean_activation"] == pytest.approx(1.0)


# --- layers ---------------------------------------------------------------------------------

def test_layer_table_counts():
    per_prompt = table(rows("a", 0, 1, [0.1, 0.1]), rows("b", 0, 2, [0.9, 0.8]),
                       rows("c", 0, 3, [0.5, 0.4], aligned=[False, False]),
                       rows("d", 2, 1, [0.5, 0.5], defined=[False, False]),
                       rows("e", 2, 2, [0.2, 0.95], frozen=[0.8, 0.9]))
    neurons = summarize_neurons(per_prompt, THRESHOLDS)
    layers = summarize_layers(neurons, per_prompt).set_index("layer")
    assert layers.index.tolist() == [0, 2]
    assert layers.loc[0, ["n_neurons", "n_routing_dominant", "n_mixed", "n_logit_dominant",
                          "n_undetermined"]].tolist() == [3, 1, 1, 1, 0]
    assert layers.loc[2, ["n_neurons", "n_routing_dominant", "n_mixed", "n_logit_dominant",
                          "n_undetermined"]].tolist() == [2, 0, 1, 0, 1]
    assert layers.loc[2, "n_logit_dominant_frozen_norm"] == 1
    assert layers.loc[2, "n_mixed_frozen_norm"] == 0
    # per-prompt aligned fraction of the layer over prompts with a ratio: 4 of 6 at layer 0
    assert layers.loc[0, "aligned_fraction"] == pytest.approx(4 / 6)
    assert layers.loc[2, "aligned_fraction"] == pytest.approx(1.0)
    assert layers.loc[0, "median_direct_ratio"] == pytest.approx(0.45)


# --- JSON documents and labels --------------------------------------------------------------

def test_neuron_documents_plan_shape_and_json_safety():
    per_prompt = table(rows("L0/N1", 0, 1, [0.1, 0.3]),
                       rows("L1/N2", 1, 2, [0.5, 0.5], defined=[False, False]))
    neurons = summarize_neurons(per_prompt, THRESHOLDS)
    documents = neuron_documents(neurons, per_prompt)
    text = json.dumps(documents, allow_nan=False)  # NaN became null
    first, second = json.loads(text)
    assert first["neuron_id"] == "L0/N1" and first["n_prompts"] == 2
    assert first["effect_summary"]["classification"] == "routing-dominant"
    assert first["effect_summary"]["mean_direct_ratio"] == pytest.approx(0.2)
    assert first["effect_summary"]["median_direct_ratio"] == pytest.approx(0.2)
    assert first["effect_summary"]["std_direct_ratio"] == pytest.approx(0.1)
    assert set(first["sign_alignment"]) == {"aligned_fraction", "interpretation"}
    assert [b["prompt_id"] for b in first["per_prompt_breakdown"]] == ["p0", "p1"]
    assert first["per_prompt_breakdown"][1]["direct_ratio"] == pytest.approx(0.3)
    assert second["effect_summary"]["mean_direct_ratio"] is None
    assert second["effect_summary"]["classification"] == "undetermined"
    assert second["sign_alignment"] == {"aligned_fraction": None,
                                        "interpretation": "undetermined"}
    assert second["per_prompt_breakdown"][0]["direct_ratio"] is None


def _neurons_for_labels() -> pd.DataFrame:
    per_prompt = table(rows("L0/N1", 0, 1, [0.1, 0.2]), rows("free id", 3, 7, [0.9, 0.8]),
                       rows("L2/N4", 2, 4, [0.5, 0.5], defined=[False, False]))
    return summarize_neurons(per_prompt, THRESHOLDS)


PROFILES = [
    {"neuron_id": "L0/N1", "layer": 0, "neuron": 1, "label": "fever",
     "logit_lens_top_tokens": [" hot", " warm"], "stats": {"mean": 0.3, "n": 12}},
    {"neuron_id": "free id", "layer": 3, "neuron": 7, "direct_ratio": "old value"},
    {"layer": 2, "neuron": 4, "selection": "random"},  # no neuron_id: keyed L2/N4
]


@pytest.mark.parametrize("wrap", [True, False])
def test_enrich_profiles_keeps_every_field_and_the_shape(wrap):
    document = ({"metadata": {"model": "x", "note": [1, 2]}, "profiles": PROFILES,
                 "trailer": None} if wrap else PROFILES)
    original = copy.deepcopy(document)
    enriched = enrich_profiles(document, _neurons_for_labels())
    assert document == original  # the input is not modified
    if wrap:
        assert list(enriched) == ["metadata", "profiles", "trailer"]
        assert enriched["metadata"] == original["metadata"] and enriched["trailer"] is None
        profiles = enriched["profiles"]
    else:
        assert isinstance(enriched, list)
        profiles = enriched
    assert len(profiles) == 3
    added = {"effect_type", "direct_ratio", "effect_type_frozen_norm",
             "direct_ratio_frozen_norm"}
    for before, after in zip(PROFILES, profiles):
        assert set(after) == set(before) | added
        assert {k: v for k, v in after.items() if k not in added} == {
            k: v for k, v in before.items() if k not in added}
    assert profiles[0]["effect_type"] == "routing-dominant"
    assert profiles[0]["direct_ratio"] == pytest.approx(0.15)
    assert profiles[0]["stats"] == {"mean": 0.3, "n": 12}
    assert profiles[1]["effect_type"] == "logit-dominant"
    assert profiles[1]["direct_ratio"] == pytest.approx(0.85)  # the new value replaces it
    assert profiles[2]["effect_type"] == "undetermined"
    assert profiles[2]["direct_ratio"] is None and "neuron_id" not in profiles[2]
    json.dumps(enriched, allow_nan=False)


def _reference_neuron(group: pd.DataFrame, thresholds: Thresholds) -> dict:
    """One neuron's summary, written out plainly (the module docstring's definitions), for the
    grouped implementation to be checked against."""
    row = {"neuron_id": group["neuron_id"].iloc[0], "layer": int(group["layer"].iloc[0]),
           "neuron": int(group["neuron"].iloc[0]), "n_prompts": len(group),
           "n_ratio_defined": int(group["ratio_defined"].sum())}
    for suffix in ("", "_frozen_norm"):
        defined = group[f"ratio_defined{suffix}"] if f"ratio_defined{suffix}" in group else \
            group[f"direct_ratio{suffix}"].notna()
        ratios = group.loc[defined, f"direct_ratio{suffix}"].to_numpy(dtype=float)
        mean = float(ratios.mean()) if len(ratios) else math.nan
        label = str(thresholds.classify(mean))
        row.update({f"mean_direct_ratio{suffix}": mean,
                    f"std_direct_ratio{suffix}": float(ratios.std()) if len(ratios) else math.nan,
                    f"median_direct_ratio{suffix}": float(np.median(ratios)) if len(ratios)
                    else math.nan, f"classification{suffix}": label,
                    f"consistency{suffix}": float((thresholds.classify(ratios) == label).mean())
                    if len(ratios) else math.nan})
        if suffix == "":
            aligned = group.loc[defined, "sign_aligned"].to_numpy(dtype=bool)
            fraction = float(aligned.mean()) if len(aligned) else math.nan
            row.update(aligned_fraction=fraction, interpretation=(
                "undetermined" if math.isnan(fraction) else
                "reinforcing" if fraction >= 0.5 else "opposing"),
                mean_cancellation=float(group.loc[defined, "cancellation"].mean())
                if defined.any() else math.nan)
    for name in ("activation", "direct", "indirect", "total", "norm_mediated"):
        row[f"mean_{name}"] = float(group[name].mean())
    row["mean_abs_total"] = float(group["total"].abs().mean())
    return row


def test_grouped_summary_equals_the_plain_per_neuron_one():
    """summarize_neurons (grouped columns) against the plain per-neuron computation, on 300
    random neurons with 1-12 prompts each, some ratios undefined and some neurons with none."""
    rng = np.random.default_rng(5)
    frames = []
    for index in range(300):
        n = int(rng.integers(1, 13))
        defined = rng.random(n) < (0.0 if index % 37 == 0 else 0.8)
        ratios = rng.random(n)
        frames.append(pd.DataFrame({
            "prompt_id": [f"p{i}" for i in range(n)], "neuron_id": f"L{index % 7}/N{index}",
            "layer": index % 7, "neuron": index, "ratio_defined": defined,
            "direct_ratio": np.where(defined, ratios, np.nan),
            "direct_ratio_frozen_norm": np.where(rng.random(n) < 0.9, rng.random(n), np.nan),
            "sign_aligned": rng.random(n) < 0.5, "cancellation": rng.random(n),
            **{name: rng.normal(size=n) for name in ("activation", "direct", "indirect",
                                                     "total", "norm_mediated")}}))
    per_prompt = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=2)
    got = summarize_neurons(per_prompt, THRESHOLDS)
    expected = pd.DataFrame([_reference_neuron(group, THRESHOLDS) for _, group in
                             per_prompt.groupby("neuron_id")]).sort_values(
        ["layer", "neuron"], ignore_index=True)[got.columns]
    assert (got["classification"] == "undetermined").sum() >= 8
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=0, atol=1e-12)
