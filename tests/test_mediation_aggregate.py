"""Mediation outside the model: edge parsing and agreement, the summaries over prompts, and the
shard store's named tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuron_effects import store
from neuron_effects.edges import edge_agreement
from neuron_effects.profile_edges import Edge, parse_edge, read_edges
from neuron_effects.inputs import InputError
from neuron_effects.mediation import (combined_mediator_sums, indirect_part_sums,
                                      mediator_summary, mediator_sums, neuron_mediation)


def write_profiles(path, edges):
    profiles = [{"neuron_id": "L1/N2", "layer": 1, "neuron": 2, "top_downstream_targets": edges},
                {"neuron_id": "L3/N4", "layer": 3, "neuron": 4}]
    path.write_text(json.dumps({"profiles": profiles}))
    return path


def test_edges_parse_all_three_kinds(tmp_path):
    path = write_profiles(tmp_path / "p.json", [
        {"target": "5_17_3", "avg_weight": 0.5, "n": 3}, {"target": "L_42_9", "avg_weight": -1},
        {"target": "E_7_0"}])
    edges = read_edges(path)
    assert list(edges) == ["L1/N2"]  # a profile without the field: no comparison, no error
    first, logit, embedding = edges["L1/N2"]
    assert first == Edge("neuron", 5, 17, 0.5)
    assert logit == Edge("logit", None, 42, -1.0)
    assert embedding.kind == "embedding" and embedding.index == 7
    assert math.isnan(embedding.avg_weight)


@pytest.mark.parametrize("entry, message", [
    ({"target": "5_17"}, "is not '<layer>_<neuron>_<pos>'"),
    ({"target": "X_1_2"}, "is not"),
    ({"weight": 1}, "string 'target'"),
    ({"target": "5_17_3", "avg_weight": "big"}, "avg_weight must be a number"),
])
def test_malformed_edges_name_file_and_neuron(tmp_path, entry, message):
    path = write_profiles(tmp_path / "p.json", [{"target": "1_2_3"}, entry])
    with pytest.raises(InputError, match=message) as error:
        read_edges(path)
    assert str(path) in str(error.value) and "'L1/N2'" in str(error.value)
    assert "top_downstream_targets[1]" in str(error.value)


def test_edges_not_a_list(tmp_path):
    with pytest.raises(InputError, match="must be a list"):
        read_edges(write_profiles(tmp_path / "p.json", {"target": "1_2_3"}))


def test_edge_agreement_counts():
    edges = [parse_edge(entry, "x") for entry in (
        {"target": "2_1_0", "avg_weight": 0.9}, {"target": "2_2_0", "avg_weight": -0.5},
        {"target": "3_9_0", "avg_weight": 0.1}, {"target": "L_5_0", "avg_weight": 1.0},
        {"target": "L_6_0", "avg_weight": 0.5})]
    exact = pd.DataFrame({"layer": [2, 2, 4], "index": [1, 2, 0],
                          "mean_contribution": [0.3, 0.2, -1.0]})
    result = edge_agreement(edges, exact, [[5, 8], [5, 9]], k=2)
    assert result["edge_n_neuron_targets"] == 3 and result["edge_n_logit_targets"] == 2
    # edge top 2: (2,1), (2,2); exact top 2: (4,0), (2,1): one in common
    assert result["edge_neuron_overlap"] == 0.5
    # (2,1): + and +; (2,2): - and +
    assert result["edge_sign_agreement"] == 0.5
    # logit top 2: 5, 6; direct's most frequent: 5, then 8 or 9
    assert result["edge_logit_overlap"] == 0.5
    none = edge_agreement([], exact.iloc[:0], [], k=2)
    assert math.isnan(none["edge_neuron_overlap"]) and math.isnan(none["edge_logit_overlap"])


def test_mediator_summary_over_prompts():
    rows = pd.DataFrame({
        "prompt_id": ["a", "a", "b", "b"], "neuron_id": ["n"] * 4,
        "kind": ["neuron", "head", "neuron", "neuron"], "rank": [1, 1, 1, 2],
        "layer": [3, 2, 3, 4], "index": [7, 1, 7, 5], "contribution": [0.4, -0.1, 0.2, 0.05]})
    # two partial pieces (as from two shards) give the same as one
    summary = mediator_summary([mediator_sums(rows[:2]), mediator_sums(rows[2:])],
                               pd.Series({"n": 2}), keep=5)
    top = summary[summary["kind"] == "neuron"].iloc[0]
    assert (top["mediator"], top["rank"]) == ("L3/N7", 1)
    assert top["mean_contribution"] == pytest.approx(0.3) and top["frac_in_top_k"] == 1.0
    head = summary[summary["kind"] == "head"].iloc[0]
    assert head["mediator"] == "L2/H1" and head["frac_in_top_k"] == 0.5
    per_prompt = pd.DataFrame({"neuron_id": ["n", "n"], "indirect_attn": [0.1, -0.1],
                               "indirect_mlp": [0.5, 0.1], "indirect_norm": [0.0, -0.2]})
    columns = neuron_mediation(indirect_part_sums(per_prompt), summary).iloc[0]
    assert columns["top_mediator"] == "L3/N7"
    assert columns["indirect_share_mlp"] == pytest.approx(0.6 / 1.0)
    assert columns["indirect_share_attn"] == pytest.approx(0.2)
    assert columns["top_mediators"].startswith("L3/N7 +0.3 (100%)")


def test_concat_of_empty_files_keeps_the_columns(tmp_path):
    empty = tmp_path / "e.parquet"
    store.write_parquet(empty, pd.DataFrame({"a": pd.Series([], dtype=float)}))
    assert store.concat_parquet([empty, empty], tmp_path / "out.parquet") == 0
    assert list(pd.read_parquet(tmp_path / "out.parquet").columns) == ["a"]


def test_report_section_shows_heatmaps_mediators_and_edges():
    from neuron_effects.report_routes import indirect_routes_section

    neurons = pd.DataFrame({
        "neuron_id": ["L0/N1", "L1/N2"], "layer": [0, 1],
        "classification": ["routing-dominant", "mixed"], "mean_direct_ratio": [0.1, 0.5],
        "mean_indirect": [0.3, 0.1], "indirect_share_attn": [0.2, 0.5],
        "indirect_share_mlp": [0.7, 0.4], "indirect_share_norm": [0.1, 0.1],
        "top_mediator": ["L1/N7", "L2/H0"], "top_mediators": ["L1/N7 +0.2 (100%)", "x"],
        "edge_n_neuron_targets": [2.0, np.nan], "edge_n_logit_targets": [1.0, np.nan],
        "edge_neuron_overlap": [0.5, np.nan], "edge_sign_agreement": [1.0, np.nan],
        "edge_logit_overlap": [0.0, np.nan]})
    flow = pd.DataFrame({"source_layer": [0, 0, 1, 1], "layer": [1, 1, 2, 2],
                         "component": ["attn", "mlp", "attn", "mlp"], "n": [3] * 4,
                         "mean_contribution": [0.1, -0.2, 0.0, 0.3],
                         "mean_abs_contribution": [0.1, 0.2, 0.05, 0.3]})
    page = indirect_routes_section(neurons, flow, top_n=5)
    assert "Where the indirect effect goes" in page and page.count("data:image/png") == 2
    assert "L1/N7 +0.2 (100%)" in page and "1 profiles list" in page
    assert "is off" in indirect_routes_section(neurons.drop(columns="top_mediator"),
                                               flow.iloc[:0], 5)


def test_mediator_sums_added_up_in_stages_give_the_same_summary():
    """The aggregation adds the pieces' sums up whenever they pile up (to bound its memory):
    any staging gives the summary of all pieces at once."""
    rng = np.random.default_rng(3)
    rows = pd.DataFrame({
        "prompt_id": np.repeat([f"p{i}" for i in range(40)], 30),
        "neuron_id": rng.choice(["a", "b", "c"], 1200),
        "kind": rng.choice(["neuron", "head"], 1200),
        "rank": 1, "layer": rng.integers(0, 4, 1200), "index": rng.integers(0, 5, 1200),
        "contribution": rng.normal(size=1200)})
    pieces = [mediator_sums(rows[i:i + 100]) for i in range(0, 1200, 100)]
    n_prompts = pd.Series({"a": 40, "b": 40, "c": 40})
    staged = [combined_mediator_sums(pieces[:5]),
              combined_mediator_sums([combined_mediator_sums(pieces[5:9]), *pieces[9:]])]
    pd.testing.assert_frame_equal(mediator_summary(staged, n_prompts, keep=4),
                                  mediator_summary(pieces, n_prompts, keep=4))


def test_mediators_summarised_layer_by_layer_equal_the_whole_table_at_once(tmp_path):
    """The aggregation sums the top-k table one source layer at a time, reading only the row
    groups that hold the layer's neurons; row groups that mix layers (a unit spanning two layers)
    must count each row once, under its own layer."""
    from neuron_effects.jobs.layer_streams import layer_mediator_summaries

    rng = np.random.default_rng(5)
    neurons = pd.DataFrame({"neuron_id": [f"L{layer}/N{n}" for layer in (0, 1, 2) for n in range(4)],
                            "layer": np.repeat([0, 1, 2], 4), "n_prompts": 6})
    groups = []
    for _ in range(6):  # one row group per (prompt, neuron block); blocks mix layers
        for block in (neurons["neuron_id"][:6], neurons["neuron_id"][6:]):
            n = 40
            groups.append(pd.DataFrame({
                "neuron_id": pd.Categorical(rng.choice(list(block), n)),
                "kind": rng.choice(["neuron", "head"], n), "rank": np.int16(1),
                "layer": rng.integers(3, 6, n).astype(np.int16),
                "index": rng.integers(0, 3, n).astype(np.int32),
                "contribution": rng.normal(size=n).astype(np.float32)}))
    path = tmp_path / "mediators.parquet"
    with pq.ParquetWriter(path, pa.Table.from_pandas(groups[0], preserve_index=False).schema) as out:
        for group in groups:
            out.write_table(pa.Table.from_pandas(group, preserve_index=False))
    by_layer = dict(layer_mediator_summaries(str(path), neurons, top_k=3))
    assert list(by_layer) == [0, 1, 2]
    whole = mediator_summary([mediator_sums(pd.concat(groups))],
                             neurons.set_index("neuron_id")["n_prompts"], keep=3)
    layered = pd.concat(by_layer.values(), ignore_index=True)
    key = ["neuron_id", "kind", "rank"]
    pd.testing.assert_frame_equal(
        layered.astype({"neuron_id": str}).sort_values(key, ignore_index=True),
        whole.astype({"neuron_id": str}).sort_values(key, ignore_index=True))


def test_a_layers_mediators_are_summarised_before_later_layers_row_groups_are_read(
        tmp_path, monkeypatch):
    """Memory: a layer is summarised (and its sums let go) as soon as the row groups holding it
    are read, whatever their order in the file; the shards' prompt chunks interleave the layers
    (here: layer 0's and layer 1's row groups alternate), and summarising a layer only after the
    file's last row group holding it kept every layer of a block open until the last chunk."""
    from neuron_effects.jobs.layer_streams import layer_mediator_summaries

    neurons = pd.DataFrame({"neuron_id": ["L0/N0", "L1/N0"], "layer": [0, 1], "n_prompts": 3})
    path = tmp_path / "mediators.parquet"
    schema = None
    for chunk in range(3):  # per prompt chunk: layer 0's unit, then layer 1's
        for neuron_id in neurons["neuron_id"]:
            table = pa.Table.from_pandas(pd.DataFrame({
                "neuron_id": pd.Categorical([neuron_id]), "kind": ["neuron"],
                "rank": np.int16([1]), "layer": np.int16([5]), "index": np.int32([chunk]),
                "contribution": np.float32([1.0])}), preserve_index=False)
            if schema is None:
                schema = table.schema
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(table)
    writer.close()
    read = []
    original = pq.ParquetFile.read_row_group

    def spy(self, group, columns=None, **kwargs):
        if columns is None:
            read.append(group)
        return original(self, group, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    summaries = layer_mediator_summaries(str(path), neurons, top_k=3)
    layer, summary = next(summaries)
    assert layer == 0 and read == [0, 2, 4] and len(summary) == 3
    assert [layer for layer, _ in summaries] == [1] and read == [0, 2, 4, 1, 3, 5]


def test_neurons_without_mediators_get_shares_and_no_top_mediator():
    per_prompt = pd.DataFrame({"neuron_id": ["n", "m"], "indirect_attn": [0.1, 0.2],
                               "indirect_mlp": [0.3, 0.0], "indirect_norm": [0.0, 0.2]})
    empty = mediator_summary([], pd.Series({"n": 1, "m": 1}), keep=5)
    columns = neuron_mediation(indirect_part_sums(per_prompt), empty).set_index("neuron_id")
    assert columns["top_mediator"].isna().all() and columns["top_mediators"].isna().all()
    assert columns.loc["m", "indirect_share_norm"] == pytest.approx(0.5)
