"""A census of a tiny random model through the whole workflow (with split-bf16 products)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neuron_effects.aggregate import Thresholds, summarize_layers, summarize_neurons
from neuron_effects.census import layer_ranking_agreement
from workflow_helpers import snakemake, write_workdir


@pytest.mark.slow
def test_census_of_two_layers_with_a_profile(tiny_model_dir, tmp_path):
    """census.layers [4, 5] of the tiny model (2 x 96 neurons) beside a 6-neuron profile, 3
    prompts, compute.products split_bf16: every neuron of those layers is summarised, the
    profile's ids and fields carry through, the estimates are ranked against the exact census
    per layer, the report has the census section and a table of the profile plus the top
    census neurons. The validation recomputes rows of every layer, the census's among them,
    with the float64 reference path (all 588 would take minutes), and the summaries, streamed
    one layer at a time, equal those of the whole table at once."""
    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), n_prompts=3,
                            neurons_per_layer=1, device="cpu",
                            census={"layers": [4, 5], "table_top": 20},
                            compute={"products": "split_bf16", "split_parts": 3},
                            validation={"pairs": 24})
    profile_path = workdir / "neurons.json"
    document = json.loads(profile_path.read_text())
    document["profiles"][5]["neuron_id"] = "favourite"  # L5/N5, listed under its own id
    profile_path.write_text(json.dumps(document))
    snakemake(workdir, "--cores", "2")

    neurons = pd.read_parquet(workdir / "results/summary/neurons.parquet")
    assert len(neurons) == 6 + 2 * 96 - 2 and neurons["neuron_id"].is_unique
    assert set(neurons.loc[neurons["in_profile"], "neuron_id"]) == {
        "L0/N0", "L1/N1", "L2/N2", "L3/N3", "L4/N4", "favourite"}
    assert "L5/N5" not in set(neurons["neuron_id"])
    census = neurons[neurons["layer"] >= 4]
    assert len(census) == 192 and census.groupby("layer")["rank_in_layer"].min().eq(1).all()
    assert {"mean_abs_direct", "mean_abs_indirect", "percentile_in_layer"} <= set(neurons)
    per_prompt = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    assert len(per_prompt) == 3 * len(neurons)

    layers = pd.read_parquet(workdir / "results/summary/layers.parquet").set_index("layer")
    assert layers.loc[[4, 5], ["atp_precision_at_10", "atp_recall_at_10",
                               "atp_rank_spearman"]].notna().all().all()

    documents = json.loads((workdir / "results/summary/neurons.json").read_text())
    assert len(documents) == 6  # the profile's; every neuron is in neurons.parquet
    labels = json.loads((workdir / "results/labels/neurons.with_effects.json").read_text())
    favourite = next(p for p in labels["profiles"] if p["neuron_id"] == "favourite")
    assert favourite["label"] == "test neuron 0" and "effect_type" in favourite

    report = (workdir / "results/report/report.html").read_text()
    assert "Census: every neuron of the chosen layers" in report
    table = json.loads(report.split('id="neuron-table-data">')[1].split("</script>")[0])
    assert len(table["rows"]) == 6 + 20

    validation = json.loads((workdir / "results/validation/summary.json").read_text())
    assert validation["passed"], validation
    checked = pd.read_parquet(workdir / "results/validation/pairs.parquet")
    assert set(checked["layer"]) == set(range(6)) and (checked["layer"] >= 4).sum() >= 6

    # the streamed aggregation against the whole table at once
    whole = summarize_neurons(per_prompt, Thresholds())
    pd.testing.assert_frame_equal(neurons[whole.columns], whole, check_exact=True)
    pd.testing.assert_frame_equal(
        layers.reset_index()[["layer", "n_mixed", "median_direct_ratio", "aligned_fraction"]],
        summarize_layers(whole, per_prompt)[["layer", "n_mixed", "median_direct_ratio",
                                             "aligned_fraction"]], check_exact=True)
    ranking = layer_ranking_agreement(per_prompt, "atp").set_index("layer")
    pd.testing.assert_frame_equal(layers.loc[ranking.index, ranking.columns], ranking,
                                  check_exact=True)
