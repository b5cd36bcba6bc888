"""The aggregation's mediation and edge tables: the shards' mediation and top-k mediator tables
joined and summarised per neuron, the layer flow's partial sums, the exact measurement of the
profiles' neuron edges, and the mediators and edge agreement added to the neuron documents.

Reads: the shards' mediation, mediator and edge tables, and the profile file. Writes: a layer
block's ``mediation``, ``mediators``, ``flow_sums`` and ``edges`` parts
(``results/aggregate/<block>/``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .. import aggregate, mediation, store
from ..edges import EDGE_COLUMNS, edge_agreement, edge_table, real_edges
from ..profile_edges import neuron_target_weights, read_edges
from .layer_streams import layer_mediator_summaries, row_groups
from .setup import log


def aggregate_mediation(
    mediation_shards: Sequence[str], mediator_shards: Sequence[str], neurons: pd.DataFrame,
    part_sums: pd.DataFrame, direct_tokens: Mapping[str, list], profile_path: str, top_k: int,
    mediation_out: str, mediators_out: str, flow_sums_out: str,
    documented: set[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stream the shards' mediation and top-k tables into one file each, write the partial sums
    of the layer flow (source layer x mediator layer: :func:`mediation.layer_flow_sums`), and
    return per neuron the mediation and edge-agreement
    columns, and the top mediators over prompts (:func:`mediation.mediator_summary`) of the
    ``documented`` neurons (None: all). The mediators are summarised one source layer at a
    time (:func:`layer_mediator_summaries`).
    ``neurons``: ``neuron_id``, ``layer``, ``n_prompts`` of every studied neuron;
    ``part_sums``: :func:`mediation.indirect_part_sums` of every row; ``direct_tokens``: per
    neuron with profile edges, its per-prompt ``top_k_direct_tokens``."""
    store.concat_parquet(mediation_shards, mediation_out)
    store.concat_parquet(mediator_shards, mediators_out)
    by_id = neurons.set_index("neuron_id")
    flow = [mediation.layer_flow_sums(part, by_id["layer"])
            for part in row_groups(mediation_out)]
    store.write_parquet(flow_sums_out, pd.concat(flow, ignore_index=True) if flow else
                        pd.DataFrame(columns=["source_layer", "layer", "component", "n", "sum",
                                              "sum_abs"]))
    layer_ids = {layer: list(ids) for layer, ids in neurons.groupby("layer")["neuron_id"]}
    empty = mediation.mediator_summary([], by_id["n_prompts"], keep=top_k)
    column_parts, kept = [], []

    def reduce(layer: int, summary: pd.DataFrame) -> None:
        """A layer's columns (every neuron), and its mediator lists (documented neurons)."""
        column_parts.append(mediation.neuron_mediation(part_sums.loc[layer_ids.pop(layer)],
                                                       summary))
        kept.append(summary if documented is None
                    else summary[summary["neuron_id"].isin(documented)])

    for layer, summary in layer_mediator_summaries(mediators_out, neurons, top_k):
        reduce(layer, summary)
    for layer in list(layer_ids):  # no mediators (the last layer)
        reduce(layer, empty)
    columns = pd.concat(column_parts, ignore_index=True)
    summary = pd.concat(kept, ignore_index=True)
    edges = read_edges(profile_path)
    mediator_neurons = summary[summary["kind"] == "neuron"]
    by_neuron = {neuron_id: group for neuron_id, group in mediator_neurons.groupby("neuron_id")}
    agreement = pd.DataFrame([
        {"neuron_id": neuron_id,
         **edge_agreement(edges[neuron_id], by_neuron.get(neuron_id, mediator_neurons.iloc[:0]),
                          direct_tokens[neuron_id], top_k)}
        for neuron_id in columns["neuron_id"] if neuron_id in edges
    ], columns=["neuron_id", *EDGE_COLUMNS[:EDGE_COLUMNS.index("edge_n_measured")]])
    return columns.merge(agreement, on="neuron_id", how="left"), summary


def aggregate_edges(edge_shards: Sequence[str], profile_path: str, studied: Sequence[str],
                    gradients: dict[str, np.ndarray] | None, min_relative_delta: float,
                    edges_out: str) -> pd.DataFrame:
    """Write the exact measurement of every neuron edge of the studied neurons' profiles
    (:func:`neuron_effects.edges.edge_table`, from the shards' per-prompt ``Δa_t`` and the
    plain gradients of the attribution pass) and return per studied neuron with edges
    ``edge_n_measured`` and ``edge_real_fraction`` (:func:`neuron_effects.edges.real_edges`);
    listed edges that were not measured are named in a warning."""
    weights = {neuron_id: neuron_target_weights(listed)
               for neuron_id, listed in read_edges(profile_path).items() if neuron_id in studied}
    deltas = pd.concat([pd.read_parquet(path) for path in edge_shards], ignore_index=True)
    table = edge_table(deltas, gradients, weights)
    store.write_parquet(edges_out, table)
    measured = set(zip(table["neuron_id"], table["target_layer"], table["target_neuron"]))
    for neuron_id, targets in weights.items():
        for layer, neuron in targets:
            if (neuron_id, layer, neuron) not in measured:
                log.warning("edge %s -> %d_%d left out: its target is not a neuron of a later "
                            "layer of the model", neuron_id, layer, neuron)
    per_neuron = real_edges(table, min_relative_delta).set_index("neuron_id")
    per_neuron = per_neuron.reindex(list(weights))
    per_neuron["edge_n_measured"] = per_neuron["edge_n_measured"].fillna(0.0)
    log.info("%d edges of %d neurons measured; %.0f %% real (|Δa_t| >= %g |a_t|, sign agrees)",
             len(table), len(weights), 100 * per_neuron["edge_real_fraction"].mean(),
             min_relative_delta)
    return per_neuron.rename_axis("neuron_id").reset_index()


def with_mediation(records: list[dict[str, Any]], columns: pd.DataFrame,
                    summary: pd.DataFrame, listed: int) -> None:
    """Add ``effect_mediators`` and ``edge_agreement`` (None without edges) to each record
    (a neuron document or a profile) in place."""
    by_id = columns.set_index("neuron_id")
    groups = {neuron_id: group for neuron_id, group in summary.groupby("neuron_id")}
    for record in records:
        neuron_id = record.get("neuron_id", f"L{record['layer']}/N{record['neuron']}")
        row = by_id.loc[neuron_id]
        shares = {part: aggregate.clean_float(row[f"indirect_share_{part}"])
                  for part in ("attn", "mlp", "norm")}
        record["effect_mediators"] = mediation.mediators_document(
            groups.get(neuron_id, summary.iloc[:0]), shares, listed)
        edges = {name: aggregate.clean_float(row[name]) for name in EDGE_COLUMNS}
        record["edge_agreement"] = (None if pd.isna(row["edge_n_neuron_targets"])
                                    else edges)
