"""A census: every MLP neuron of chosen layers through the same exact engine.

``census: {layers: all}`` or ``{layers: [5, 20]}`` adds every neuron ``L{layer}/N{n}`` of those
layers to the studied set (:func:`census_neurons`); a neuron also listed in the profile file keeps
its profile id and fields. Nothing else changes: the shard plan, the clean cache and the engine
treat census neurons like any other.

Also here: the agreement of a first-order estimate (attribution patching) with the exact effects
over every neuron of a layer (:func:`ranking_agreement`), and the cost of a census before it runs
(:func:`census_estimate`, from the model's dimensions by the workflow's cost model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .cost import DeviceRates, ModelShape, aggregation_seconds, mediation_table_rows
from .inputs import InputError, Neuron


def census_layers(layers: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """The census's layers: ``all`` -> every layer, a list -> those (checked), None -> none."""
    if layers is None:
        return []
    if layers == "all":
        return list(range(n_layers))
    chosen = sorted(set(int(layer) for layer in layers))
    wrong = [layer for layer in chosen if not 0 <= layer < n_layers]
    if wrong:
        raise InputError(f"census.layers: {wrong} out of range (the model has {n_layers} "
                         f"layers, 0..{n_layers - 1})")
    return chosen


def census_neurons(profile: Sequence[Neuron], layers: Sequence[int],
                   intermediate_size: int) -> list[Neuron]:
    """The profile's neurons, then every other neuron of ``layers`` as ``L{layer}/N{n}``."""
    listed = {(neuron.layer, neuron.neuron) for neuron in profile}
    return [*profile, *(Neuron(f"L{layer}/N{n}", layer, n) for layer in layers
                        for n in range(intermediate_size) if (layer, n) not in listed)]


# ---- summaries of a census (aggregation and report) ----

MAGNITUDES = ("total", "direct", "indirect")


def census_columns(neurons: pd.DataFrame, per_prompt: pd.DataFrame,
                   profile_ids: Sequence[str]) -> pd.DataFrame:
    """``neurons`` (one row per neuron) with ``in_profile``, ``mean_abs_direct``,
    ``mean_abs_indirect`` (means over prompts; ``mean_abs_total`` is already there),
    ``rank_in_layer`` (1 = the largest mean |total| of its layer) and ``percentile_in_layer``
    (the fraction of its layer's neurons with a smaller mean |total|)."""
    sizes = per_prompt[["neuron_id", "direct", "indirect"]].set_index("neuron_id").abs()
    means = sizes.groupby(level=0).mean().add_prefix("mean_abs_")
    result = neurons.merge(means, left_on="neuron_id", right_index=True, how="left")
    result["in_profile"] = result["neuron_id"].isin(set(profile_ids))
    by_layer = result.groupby("layer")["mean_abs_total"]
    result["rank_in_layer"] = by_layer.rank(ascending=False, method="min").astype(int)
    result["percentile_in_layer"] = (by_layer.rank(method="min") - 1) / by_layer.transform(
        "size").clip(lower=2).sub(1)
    return result


def table_neurons(neurons: pd.DataFrame, top: int) -> pd.DataFrame:
    """The neurons of the report's searchable table: every profile neuron and the ``top``
    others with the largest mean |total|, in ``neurons``' order."""
    others = neurons[~neurons["in_profile"]].nlargest(top, "mean_abs_total").index
    return neurons[neurons["in_profile"] | neurons.index.isin(others)]


def top_neurons(frame: pd.DataFrame, by: str, n: int) -> pd.DataFrame:
    """Per value of ``by`` (``layer`` over neurons with ``mean_abs_*`` columns, or
    ``prompt_id`` over per-prompt rows), the ``n`` neuron ids with the largest |total|,
    |direct| and |indirect|, as ``id (value)`` text: one row per ``by`` value."""
    rows = []
    for key, group in frame.groupby(by, sort=True):
        row: dict[str, Any] = {by: key}
        for name in MAGNITUDES:
            column = f"mean_abs_{name}" if f"mean_abs_{name}" in group else name
            size = group[column].abs()
            top = group.loc[size.nlargest(n).index]
            row[f"top_|{name}|"] = ", ".join(f"{i} ({v:+.3g})" for i, v in zip(
                top["neuron_id"], top[column]))
        rows.append(row)
    return pd.DataFrame(rows)


# ---- agreement of an estimate with the exact effects over every neuron of a layer ----

def _top(scores: pd.Series, k: int) -> set:
    return set(scores.sort_values(ascending=False, kind="stable").index[:k])


def ranking_agreement(estimate: pd.Series, exact: pd.Series, k: int) -> dict[str, float]:
    """How well the ranking by ``estimate`` finds the top ``k`` by ``exact`` (two scores of the
    same neurons, larger = more important, e.g. mean |total| over prompts):

    * ``precision_at_k``: |E_k ∩ X_k| / k (E_k, X_k: the top k by estimate, by exact);
    * ``recall_at_k``: |E_2k ∩ X_k| / k, the share of the exact top k that a screen twice as
      wide keeps (with equal sizes recall would equal precision);
    * ``rank_spearman``: Spearman correlation of the two scores over all neurons.
    """
    k = min(k, len(exact))
    if k < 1:
        return {"precision_at_k": math.nan, "recall_at_k": math.nan, "rank_spearman": math.nan}
    truth = _top(exact, k)
    return {
        "precision_at_k": len(_top(estimate, k) & truth) / k,
        "recall_at_k": len(_top(estimate, 2 * k) & truth) / k,
        "rank_spearman": float(estimate.rank().corr(exact.rank())),
    }


def layer_ranking_agreement(per_prompt: pd.DataFrame, method: str = "atp",
                            ks: Sequence[int] = (10, 100)) -> pd.DataFrame:
    """Per layer, over all its studied neurons (every neuron in a census layer): the ranking of
    neurons by mean |``total_<method>``| over prompts (an estimate: ``atp``, ``relp``...)
    against the ranking by mean |total| (:func:`ranking_agreement`) at each k of ``ks`` below
    the layer's size and at a tenth of it: ``<method>_precision_at_{k}``,
    ``<method>_recall_at_{k}``, ``<method>_rank_spearman``, ``<method>_tenth`` (that k)."""
    rows = []
    for layer, group in per_prompt.groupby("layer"):
        scores = group.assign(_exact=group["total"].abs(),
                              _estimate=group[f"total_{method}"].abs()
                              ).groupby("neuron_id")[["_exact", "_estimate"]].mean()
        tenth = max(1, math.ceil(len(scores) / 10))
        row: dict[str, float] = {"layer": int(layer), f"{method}_tenth": tenth}
        for name, k in [(str(k), k) for k in ks if k < len(scores)] + [("tenth", tenth)]:
            result = ranking_agreement(scores["_estimate"], scores["_exact"], k)
            row[f"{method}_precision_at_{name}"] = result["precision_at_k"]
            row[f"{method}_recall_at_{name}"] = result["recall_at_k"]
            row[f"{method}_rank_spearman"] = result["rank_spearman"]
        rows.append(row)
    return pd.DataFrame(rows)


# ---- the cost of a census, before it runs ----

# Bytes on disk per (prompt, neuron), measured on the demo (BENCHMARKS.md section 6): the
# per-prompt row (~270 B with the top-k token lists), the top-k mediators (~140 B), and
# ~6 B per row of the mediation table, which has 2 rows per downstream layer plus one.
PER_PROMPT_BYTES = 270
MEDIATORS_BYTES = 140
MEDIATION_BYTES_PER_ROW = 6


@dataclass(frozen=True)
class CensusEstimate:
    """What a census costs: ``neurons``, ``rows`` (= neurons x prompts), ``pflop``,
    ``compute_hours`` at the device's rate, ``jobs`` (model jobs of at least
    ``min_compute_ratio`` x the fixed cost each), ``gpu_hours`` (compute + every job's fixed
    cost), ``disk_bytes`` of the per-prompt and mediation tables and ``aggregate_hours`` of the
    one CPU job that summarises them."""

    neurons: int
    rows: int
    pflop: float
    compute_hours: float
    jobs: int
    gpu_hours: float
    disk_bytes: int
    aggregate_hours: float


def census_estimate(shape: ModelShape, rates: DeviceRates, layers: Sequence[int],
                    n_prompts: int, *, n_tokens: int = 128, full_vocab: bool = True,
                    mediators: bool = True, min_compute_ratio: float = 3.0,
                    mediator_top_k: int = 10) -> CensusEstimate:
    """The cost of a census of ``layers`` over ``n_prompts`` prompts of ``n_tokens`` tokens from
    the model's dimensions alone, by the workflow's cost model (:mod:`neuron_effects.cost`: FLOPs
    per row by start layer, so that a census of late layers runs faster per row; the fixed cost
    of a job). Jobs: as few as keep each job's compute at least ``min_compute_ratio`` times its
    fixed cost (at least one). Disk: :data:`PER_PROMPT_BYTES` per row, with mediators also
    :data:`MEDIATORS_BYTES` and :data:`MEDIATION_BYTES_PER_ROW` x (2 x downstream layers + 1).
    """
    layers = list(layers)
    if not layers or n_prompts < 1:
        return CensusEstimate(0, 0, 0.0, 0.0, 0, 0.0, 0, 0.0)
    width = shape.intermediate
    rows = len(layers) * width * n_prompts
    flops = width * n_prompts * sum(shape.row_flops(layer, n_tokens, full_vocab, mediators)
                                    for layer in layers)
    compute_seconds = flops / rates.flops_per_s
    fixed = rates.fixed_s(shape.weight_bytes)
    jobs = max(1, int(compute_seconds // (min_compute_ratio * fixed)))
    downstream = float(np.mean([shape.n_layers - 1 - layer for layer in layers]))
    per_row = PER_PROMPT_BYTES + (MEDIATORS_BYTES + MEDIATION_BYTES_PER_ROW
                                  * (2 * downstream + 1) if mediators else 0)
    table_rows = (width * n_prompts * sum(mediation_table_rows(shape.n_layers, layer,
                                                                mediator_top_k)
                                           for layer in layers) if mediators else 0)
    return CensusEstimate(
        neurons=len(layers) * width, rows=rows, pflop=flops / 1e15,
        compute_hours=compute_seconds / 3600, jobs=jobs,
        gpu_hours=(compute_seconds + jobs * fixed) / 3600, disk_bytes=int(rows * per_row),
        aggregate_hours=aggregation_seconds(rows, table_rows) / 3600)
