"""Rules aggregate_block, aggregate_candidates, aggregate_effects and judge_profile_scores: each
layer block's shards streamed into its parts, the parts joined into the run's tables, and the
profile's own scores judged against the exact effects.

Reads: the shards (``results/effects/shards/``, ``results/effects/candidates/``), the chunks'
estimates (``results/atp/chunks/``), the profile file, the prepared prompts, the clean runs and
the blocks' parts. Writes: the parts (``results/aggregate/<block>/``,
:data:`neuron_effects.aggregate.BLOCK_PARTS`), then ``results/effects/`` (per_prompt,
mediation, mediators .parquet), ``results/summary/`` (neurons, layers, prompts,
mediation_layers, edges, profile_scores .parquet; neurons.json), the enriched labels
(``results/labels/``) and ``results/validation/non_finite.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from .. import aggregate, agreement, mediation, store
from ..census import census_columns, layer_ranking_agreement
from ..inputs import load_profile_document, read_neurons, read_profile_scores
from ..profile_edges import read_edges
from ..profile_scores import judge_profile_scores as judged_scores
from ..targets import describe as describe_target
from ..targets import is_low_rank
from .estimates import stacked_estimates
from .layer_streams import layer_rows, shard_layers
from .mediation_tables import aggregate_edges, aggregate_mediation, with_mediation
from .setup import PROGRESS, log


def _with_estimates(per_prompt: pd.DataFrame, estimates: dict[str, torch.Tensor],
                    prompt_ids: list[str]) -> pd.DataFrame:
    """``total_<method>`` for each method of an estimates file
    (:func:`.estimates.load_estimates`: the estimate of the row's prompt and neuron) inserted
    after ``total``, with ``indirect_atp``
    (= total_atp - direct) after ``total_atp``."""
    index = {prompt_id: position for position, prompt_id in enumerate(prompt_ids)}
    rows = (per_prompt["prompt_id"].map(index).to_numpy(), per_prompt["layer"].to_numpy(),
            per_prompt["neuron"].to_numpy())
    where = per_prompt.columns.get_loc("total") + 1
    per_prompt = per_prompt.copy()
    for method in (name for name in estimates if name != "gradient"):
        per_prompt.insert(where, f"total_{method}",
                          estimates[method].numpy()[rows].astype(np.float64))
        where += 1
        if method == "atp":
            per_prompt.insert(where, "indirect_atp", per_prompt["total_atp"] - per_prompt["direct"])
            where += 1
    return per_prompt


def _ordered_columns(frame: pd.DataFrame) -> pd.DataFrame:
    first = ["prompt_id", "neuron_id", "layer", "neuron", "activation", "scale", "target_id",
             "target_token", "target_source", "distractor_id", "distractor_token", "direct",
             "indirect", "total", "direct_frozen_norm", "norm_mediated", "direct_ratio",
             "cancellation", "sign_aligned", "ratio_defined", "direct_ratio_frozen_norm"]
    return frame[first + [c for c in frame.columns if c not in first]]


def _written_with(rows_out: Any, table: pa.Table, temporary: Path) -> Any:
    """``rows_out`` (a ParquetWriter or None) after writing ``table``: the first table fixes
    the schema (and the pandas metadata), later ones are cast to it."""
    if rows_out is None:
        rows_out = pq.ParquetWriter(temporary, table.schema)
    rows_out.write_table(table.cast(rows_out.schema))
    return rows_out


def aggregate_block(
    shard_paths: Sequence[str], prompt_order: Sequence[str], profile_path: str,
    thresholds: aggregate.Thresholds, parts: Mapping[str, str],
    mediation_shards: Sequence[str] = (), mediator_shards: Sequence[str] = (),
    edge_shards: Sequence[str] = (), mediator_top_k: int = 10,
    estimate_chunks: Sequence[str] = (), edge_min_relative_delta: float = 0.01,
    census: bool = False, outside_profile: bool = False,
) -> None:
    """One layer block's part of the aggregation (the block's shards, every prompt chunk), written
    to ``parts`` (:data:`aggregate.BLOCK_PARTS`; without ``mediation`` the mediation parts are left
    out): the long table's rows (ordered by layer, then neuron, then ``prompt_order``), the block's
    neuron and layer summaries, the per-prompt breakdown of the neurons that get a JSON document
    (the profile's, in a census); with the mediation tables, their rows, the partial sums of the
    layer flow, the per-neuron mediation and edge-agreement columns (in the neuron summary) and the
    documented neurons' top mediators (:func:`aggregate_mediation`); with ``estimate_chunks``
    (attribution patching: the prompt chunks' estimates files; not the stacked file, which a profile
    edit rewrites), the estimates (``total_atp``, ``indirect_atp``, ``total_relp``...) and their
    agreement with the exact effects; with the edge tables, the exact measurement of the profiles'
    neuron edges (:func:`aggregate_edges`). With ``census``, the neurons gain :func:`census_columns`
    and the layers the ranking agreement of each estimate over all their neurons
    (:func:`layer_ranking_agreement`). The rows and the neurons get ``in_profile`` (listed in the
    profile file); ``outside_profile``: the shards hold the verified candidates
    (:mod:`neuron_effects.verified`), none in the profile.

    Streamed one layer at a time (:func:`layer_rows`): every summary is per neuron or per layer, so
    only one layer's rows are in memory, and the long table is written one layer (row group) at a
    time; what is kept across layers is per neuron, plus the per-prompt breakdown of the documented
    neurons."""
    mediated = "mediation" in parts
    order = {prompt_id: index for index, prompt_id in enumerate(prompt_order)}
    estimates = stacked_estimates(estimate_chunks) if estimate_chunks else None
    profile_ids = set() if outside_profile else {neuron.neuron_id
                                                 for neuron in read_neurons(profile_path)}
    with_edges = set(read_edges(profile_path)) if mediated and not outside_profile else set()
    neuron_parts, layer_parts, breakdowns, part_sums, direct_tokens = [], [], [], [], {}
    non_finite: list[pd.DataFrame] = []
    with store.atomic_path(parts["per_prompt"]) as temporary:
        rows_out = None
        try:
            for layer in tqdm(shard_layers(shard_paths), desc="layers", unit="layer",
                              **PROGRESS):
                frame = _ordered_columns(layer_rows(shard_paths, layer, order))
                if not len(frame):
                    continue
                frame.insert(frame.columns.get_loc("neuron") + 1, "in_profile",
                             frame["neuron_id"].isin(profile_ids).to_numpy())
                duplicated = frame.duplicated(["prompt_id", "neuron_id"])
                if duplicated.any():
                    raise RuntimeError(f"{int(duplicated.sum())} duplicated (prompt, neuron) "
                                       f"rows in the shards of layer {layer}")
                neurons = aggregate.summarize_neurons(frame, thresholds)
                layers = aggregate.summarize_layers(neurons, frame)
                if estimates is not None:
                    frame = _with_estimates(frame, *estimates)
                    for method in aggregate.estimate_methods(frame.columns):
                        neurons = neurons.merge(agreement.neuron_agreement(frame, method),
                                                on="neuron_id")
                        layers = layers.merge(agreement.layer_agreement(frame, method),
                                              on="layer")
                        if census:
                            layers = layers.merge(layer_ranking_agreement(frame, method),
                                                  on="layer")
                if census:
                    neurons = census_columns(neurons, frame, profile_ids)
                else:
                    neurons["in_profile"] = neurons["neuron_id"].isin(profile_ids)
                counts, named = aggregate.non_finite_rows(frame)
                neurons.insert(neurons.columns.get_loc("n_prompts") + 1, "n_non_finite",
                               counts.reindex(neurons["neuron_id"]).to_numpy())
                if len(named):
                    log.warning("layer %d: %d rows with a NaN or infinite value, first: %s",
                                layer, int(counts.sum()), named.to_dict("records"))
                    non_finite.append(named)
                if mediated:
                    part_sums.append(mediation.indirect_part_sums(frame))
                    listed = frame[frame["neuron_id"].isin(with_edges)]
                    direct_tokens.update(listed.groupby("neuron_id")["top_k_direct_tokens"]
                                         .apply(list).to_dict())
                documented = frame["neuron_id"].isin(profile_ids) if census else \
                    np.ones(len(frame), dtype=bool)
                breakdowns.append(frame.loc[documented, ["neuron_id", *aggregate.BREAKDOWN_COLUMNS,
                                                         *(f"total_{method}" for method in
                                                           aggregate.estimate_methods(
                                                               frame.columns))]])
                neuron_parts.append(neurons)
                layer_parts.append(layers)
                rows_out = _written_with(rows_out, pa.Table.from_pandas(
                    frame, preserve_index=False), temporary)
            if rows_out is None:
                raise RuntimeError(f"the shards hold no rows: {list(shard_paths)}")
        finally:
            if rows_out is not None:
                rows_out.close()
    neurons = pd.concat(neuron_parts, ignore_index=True)
    if mediated:
        columns, lists = aggregate_mediation(
            mediation_shards, mediator_shards, neurons[["neuron_id", "layer", "n_prompts"]],
            pd.concat(part_sums), direct_tokens, profile_path, mediator_top_k,
            parts["mediation"], parts["mediators"], parts["flow_sums"],
            documented=profile_ids if census else None)
        if "edges" in parts:
            gradients = None
            if estimates is not None and "gradient" in estimates[0]:
                gradients = dict(zip(estimates[1], estimates[0]["gradient"].numpy()))
            measured = aggregate_edges(edge_shards, profile_path, list(neurons["neuron_id"]),
                                       gradients, edge_min_relative_delta, parts["edges"])
            columns = columns.merge(measured, on="neuron_id", how="left")
        else:
            columns[["edge_n_measured", "edge_real_fraction"]] = np.nan
        # the mediation columns follow the summary's, before the estimates' and the census's
        summary_columns = list(neurons.columns[:neurons.columns.get_loc("mean_norm_mediated")
                                               + 1])
        neurons = neurons.merge(columns, on="neuron_id", how="left")
        neurons = neurons[summary_columns + list(columns.columns[1:])
                          + [c for c in neurons.columns if c not in summary_columns
                             and c not in columns.columns]]
        store.write_parquet(parts["mediator_lists"], lists)
    store.write_parquet(parts["neurons"], neurons)
    store.write_parquet(parts["layers"], pd.concat(layer_parts, ignore_index=True))
    store.write_parquet(parts["breakdowns"], pd.concat(breakdowns, ignore_index=True))
    store.write_parquet(parts["non_finite"], pd.concat(
        non_finite, ignore_index=True).head(aggregate.NON_FINITE_LISTED) if non_finite else
        pd.DataFrame(columns=["prompt_id", "neuron_id", "layer", "columns"]))


def non_finite_summary(neurons: pd.DataFrame, listed: pd.DataFrame) -> dict[str, Any]:
    """``n_rows``: the rows with a non-finite value (the sum of the neurons' ``n_non_finite``,
    counted over every row by :func:`aggregate_block`), ``rows``: the first
    :data:`aggregate.NON_FINITE_LISTED` of those the blocks named (``prompt_id, neuron_id,
    layer, columns``), ``columns``: the offending columns among them."""
    n_rows = int(neurons["n_non_finite"].sum())
    rows = [{"prompt_id": str(row.prompt_id), "neuron_id": str(row.neuron_id),
             "layer": int(row.layer), "columns": str(row.columns)}
            for row in listed.head(aggregate.NON_FINITE_LISTED).itertuples(index=False)]
    if n_rows:
        log.warning("%d (prompt, neuron) rows hold a NaN or infinite value; first: %s", n_rows,
                    rows)
    return {"n_rows": n_rows, "rows": rows,
            "columns": sorted({name for row in rows for name in row["columns"].split(", ")})}


def aggregate_effects(
    blocks: Sequence[Mapping[str, str]], prompts_table: str, clean_paths: Sequence[str],
    profile_path: str, per_prompt_out: str, neurons_out: str, neurons_json_out: str,
    layers_out: str, prompts_out: str, labels_out: str, mediation_out: str | None = None,
    mediators_out: str | None = None, mediation_layers_out: str | None = None,
    edges_out: str | None = None, mediator_top_k: int = 10, max_rank: int = 100,
    non_finite_out: str | None = None, candidates: Mapping[str, str] | None = None,
) -> None:
    """The final, light step of the aggregation: the layer blocks' parts (``blocks``, in layer
    order, each :data:`aggregate.BLOCK_PARTS` -> path, written by :func:`aggregate_block`) into the
    long table, the neuron and layer summaries, the mediation tables and layer flow, the edge table
    (each streamed or concatenated), and the prompt table (the prompts' ``target_low_rank``: a given
    target ranked below the top ``max_rank`` by the clean model), the neuron documents
    (``neurons.json``: the profile's neurons only; every neuron stays in ``neurons.parquet``) and
    the enriched labels. ``candidates``: the verified candidates' parts
    (:mod:`neuron_effects.verified`), whose rows and neurons (``in_profile`` false) follow the
    blocks' in the long table and the neuron summary, and nowhere else. ``non_finite_out``: the rows
    with a value NaN or infinite where it must be finite, counted over every row by the blocks and
    the candidates (:func:`non_finite_summary`), for the validation's verdict."""
    prompts = pd.read_parquet(prompts_table).drop(columns=["target_id", "distractor_id"])
    clean = pd.DataFrame([record for path in clean_paths
                          for record in store.load_clean_records(path)])
    clean["target_low_rank"] = [is_low_rank(record, max_rank)
                                for record in clean.to_dict("records")]
    for record in clean[clean["target_low_rank"]].to_dict("records"):
        log.warning("low-ranked target (above targets.max_rank %d): %s", max_rank,
                    describe_target(record))
    store.write_parquet(prompts_out, prompts.merge(clean.drop(columns="n_tokens"),  # in both
                                                   on="prompt_id", how="inner"))

    def read(part: str) -> pd.DataFrame:
        return pd.concat([pd.read_parquet(block[part]) for block in blocks], ignore_index=True)

    outside = [candidates] if candidates else []
    rows = store.concat_parquet([parts["per_prompt"] for parts in [*blocks, *outside]],
                                per_prompt_out)
    neurons = pd.concat([read("neurons"), *(pd.read_parquet(parts["neurons"])
                                            for parts in outside)], ignore_index=True)
    log.info("%d blocks: %d rows, %d neurons", len(blocks), rows, len(neurons))
    store.write_parquet(neurons_out, neurons)
    if non_finite_out is not None:
        listed = pd.concat([read("non_finite"), *(pd.read_parquet(parts["non_finite"])
                                                  for parts in outside)], ignore_index=True)
        store.write_json(non_finite_out, non_finite_summary(neurons, listed))
    store.write_parquet(layers_out, read("layers"))
    documents = aggregate.neuron_documents(neurons[neurons["in_profile"]], read("breakdowns"))
    document = aggregate.enrich_profiles(load_profile_document(profile_path), neurons)
    if mediation_out is not None:
        store.concat_parquet([block["mediation"] for block in blocks], mediation_out)
        store.concat_parquet([block["mediators"] for block in blocks], mediators_out)
        store.write_parquet(mediation_layers_out, mediation.layer_flow(
            [pd.read_parquet(block["flow_sums"]) for block in blocks]))
        lists = read("mediator_lists")
        with_mediation(documents, neurons, lists, listed=mediator_top_k)
        with_mediation(document["profiles"] if isinstance(document, dict) else document,
                        neurons, lists, listed=mediator_top_k)
    if edges_out is not None:
        store.write_parquet(edges_out, read("edges"))
    store.write_json(neurons_json_out, documents)
    store.write_json(labels_out, document)


def judge_profile_scores(neurons_path: str, profile_path: str, fields: Sequence[str],
                         output: str) -> None:
    """``results/summary/profile_scores.parquet``: each profile score field of ``fields`` judged
    against the profile neurons' exact mean total (:mod:`neuron_effects.profile_scores`)."""
    neurons = pd.read_parquet(neurons_path)
    if "in_profile" in neurons:  # a census: the profile's neurons only
        neurons = neurons[neurons["in_profile"]]
    table = judged_scores(read_profile_scores(profile_path, fields), neurons)
    for row in table.itertuples(index=False):
        log.info("profile score %r: %d neurons (%d without it), Spearman with the exact mean "
                 "total %.3g, sign agreement %.3g", row.field, row.n_neurons, row.n_missing,
                 row.spearman, row.sign_agreement)
    store.write_parquet(output, table)
