"""Summaries over prompts: per neuron, per layer, and the enriched profile labels.

Per neuron, over the prompts where ``direct_ratio`` is defined (``ratio_defined``):

* ``mean/std/median_direct_ratio``; ``classification`` from the mean ratio r:
  ``routing-dominant`` if r < routing_below, ``logit-dominant`` if r > logit_dominant_above,
  else ``mixed``; ``undetermined`` when no prompt defines the ratio;
* ``consistency``: the fraction of those prompts whose own ratio falls in the neuron's class;
* ``aligned_fraction``: the fraction with ``sign_aligned`` (direct and indirect agree in sign);
  ``interpretation`` ``reinforcing`` if it is >= 0.5 else ``opposing``;
* ``mean_cancellation`` and the same classification with the frozen-norm direct effect
  (``classification_frozen_norm``), where the norm-mediated part counts as indirect.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .inputs import profile_neuron_id

CLASSES = ("routing-dominant", "mixed", "logit-dominant")
UNDETERMINED = "undetermined"


@dataclass(frozen=True)
class Thresholds:
    """Class boundaries on the direct ratio: routing < routing_below <= mixed <= above < logit."""

    routing_below: float = 0.3
    logit_dominant_above: float = 0.7

    def classify(self, ratio: np.ndarray | float) -> np.ndarray:
        ratio = np.asarray(ratio, dtype=float)
        labels = np.where(ratio < self.routing_below, CLASSES[0],
                          np.where(ratio > self.logit_dominant_above, CLASSES[2], CLASSES[1]))
        return np.where(np.isnan(ratio), UNDETERMINED, labels)


def _ratio_summary(per_prompt: pd.DataFrame, neurons: pd.Index, thresholds: Thresholds,
                   suffix: str) -> pd.DataFrame:
    """Per neuron (index ``neurons``), over its prompts with a defined ``direct_ratio{suffix}``:
    mean, std (ddof 0), median, the class of the mean and the consistency (the fraction of those
    prompts whose own ratio falls in that class); NaN and ``undetermined`` without any."""
    defined = (per_prompt[f"ratio_defined{suffix}"].to_numpy(dtype=bool)
               if f"ratio_defined{suffix}" in per_prompt
               else per_prompt[f"direct_ratio{suffix}"].notna().to_numpy())
    rows = per_prompt.loc[defined, ["neuron_id", f"direct_ratio{suffix}"]]
    ratios = rows[f"direct_ratio{suffix}"].astype(float)
    grouped = ratios.groupby(rows["neuron_id"].to_numpy(), sort=False)
    mean = grouped.mean().reindex(neurons)
    label = pd.Series(thresholds.classify(mean.to_numpy()), index=neurons)
    agrees = pd.Series(thresholds.classify(ratios.to_numpy())
                       == label.reindex(rows["neuron_id"]).to_numpy(), index=rows.index)
    return pd.DataFrame({
        f"mean_direct_ratio{suffix}": mean,
        f"std_direct_ratio{suffix}": grouped.std(ddof=0).reindex(neurons),
        f"median_direct_ratio{suffix}": grouped.median().reindex(neurons),
        f"classification{suffix}": label,
        f"consistency{suffix}": agrees.groupby(rows["neuron_id"].to_numpy(), sort=False)
        .mean().reindex(neurons),
    })


def summarize_neurons(per_prompt: pd.DataFrame, thresholds: Thresholds) -> pd.DataFrame:
    """One row per neuron (see the module docstring), ordered by layer and neuron index;
    grouped column operations, no loop over neurons."""
    ids = per_prompt["neuron_id"].to_numpy()
    by_neuron = per_prompt.groupby(ids, sort=False)
    neurons = pd.Index(pd.unique(ids))
    defined = per_prompt["ratio_defined"].to_numpy(dtype=bool)
    over_defined = per_prompt.loc[defined].groupby(ids[defined], sort=False)
    aligned = over_defined["sign_aligned"].mean().astype(float).reindex(neurons)
    effects = per_prompt[["activation", "direct", "indirect", "total", "norm_mediated"]].astype(
        float).assign(abs_total=per_prompt["total"].abs().astype(float))
    means = effects.groupby(ids, sort=False).mean().reindex(neurons)
    result = pd.DataFrame({
        "neuron_id": neurons,
        "layer": by_neuron["layer"].first().reindex(neurons).astype(int).to_numpy(),
        "neuron": by_neuron["neuron"].first().reindex(neurons).astype(int).to_numpy(),
        "n_prompts": by_neuron.size().reindex(neurons).to_numpy(),
        "n_ratio_defined": pd.Series(defined).groupby(ids, sort=False).sum()
        .reindex(neurons).astype(int).to_numpy(),
    })
    result = pd.concat([result, _ratio_summary(per_prompt, neurons, thresholds, "")
                        .reset_index(drop=True)], axis=1)
    result["aligned_fraction"] = aligned.to_numpy()
    result["interpretation"] = np.where(aligned.isna(), UNDETERMINED, np.where(
        aligned >= 0.5, "reinforcing", "opposing"))
    result["mean_cancellation"] = over_defined["cancellation"].mean().astype(float).reindex(
        neurons).to_numpy()
    result = pd.concat([result, _ratio_summary(per_prompt, neurons, thresholds, "_frozen_norm")
                        .reset_index(drop=True)], axis=1)
    for name in ("activation", "direct", "indirect", "total", "abs_total", "norm_mediated"):
        result[f"mean_{name}"] = means[name].to_numpy()
    return result.sort_values(["layer", "neuron"], ignore_index=True)


def summarize_layers(neurons: pd.DataFrame, per_prompt: pd.DataFrame) -> pd.DataFrame:
    """Per layer: neurons per class, median direct ratio, aligned fraction and cancellation."""
    rows = []
    for layer, group in neurons.groupby("layer"):
        prompts = per_prompt[(per_prompt["layer"] == layer) & per_prompt["ratio_defined"]]
        row: dict[str, Any] = {"layer": int(layer), "n_neurons": len(group)}
        for label in (*CLASSES, UNDETERMINED):
            row[f"n_{label.replace('-', '_')}"] = int((group["classification"] == label).sum())
            row[f"n_{label.replace('-', '_')}_frozen_norm"] = int(
                (group["classification_frozen_norm"] == label).sum())
        row.update(
            median_direct_ratio=float(group["mean_direct_ratio"].median()),
            median_direct_ratio_frozen_norm=float(group["mean_direct_ratio_frozen_norm"].median()),
            aligned_fraction=float(prompts["sign_aligned"].mean()) if len(prompts) else math.nan,
            mean_cancellation=float(prompts["cancellation"].mean()) if len(prompts) else math.nan,
            median_cancellation=float(prompts["cancellation"].median()) if len(prompts)
            else math.nan,
        )
        rows.append(row)
    return pd.DataFrame(rows)


def clean_float(value: Any) -> Any:
    """JSON-safe scalars: NaN -> None, numpy -> Python."""
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# What one layer block's aggregation job writes (jobs.aggregation.aggregate_block, a file each under
# results/aggregate/<block>/) and the final step (jobs.aggregation.aggregate_effects) reads.
BLOCK_PARTS = ("per_prompt", "neurons", "layers", "breakdowns", "mediation", "mediators",
               "flow_sums", "mediator_lists", "edges", "non_finite")
BREAKDOWN_COLUMNS = ("prompt_id", "target_token", "activation", "direct", "indirect", "total",
                     "direct_frozen_norm", "direct_ratio", "cancellation", "sign_aligned")
# Per-prompt columns that every row must hold as finite numbers (with the estimates, the
# total_<method> and indirect_atp columns); the _logit_diff ones where the row has a distractor.
ALWAYS_FINITE = ("activation", "scale", "direct", "indirect", "total", "direct_frozen_norm",
                 "norm_mediated")
WITH_DISTRACTOR = tuple(f"{name}_logit_diff" for name in ALWAYS_FINITE[2:])
# NaN by design: no distractor; the frozen-norm ratio below its noise floor (its inputs,
# direct_frozen_norm and total, are checked).
MAY_BE_NAN = ("distractor_id", "direct_ratio_frozen_norm")
NON_FINITE_LISTED = 10  # rows named per layer block (all of them are counted)


def non_finite_mask(frame: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Which rows of a per-prompt table hold a value NaN or infinite where it must be finite,
    and per offending column its rows: infinity in any float column; NaN in
    :data:`ALWAYS_FINITE` and the estimates, in ``direct_ratio`` and ``cancellation`` where
    ``ratio_defined``, in :data:`WITH_DISTRACTOR` where the row has a distractor, and in any
    other float column (the full-vocabulary metrics, the mediation split) that holds a finite
    value on another row of the table (a column of an option that is off is NaN throughout; the
    split's _logit_diff columns only on rows with a distractor)."""
    distractor = frame["distractor_id"].notna().to_numpy()
    estimates = {f"total_{method}" for method in estimate_methods(frame.columns)}
    by_column: dict[str, np.ndarray] = {}
    for column in frame.columns:
        if frame[column].dtype.kind != "f":
            continue
        values = frame[column].to_numpy()
        nan = np.isnan(values)
        if not nan.any() and np.isfinite(values).all():
            continue
        if column in ALWAYS_FINITE or column in estimates or column == "indirect_atp":
            required = np.ones(len(frame), dtype=bool)
        elif column in ("direct_ratio", "cancellation"):
            required = frame["ratio_defined"].to_numpy(dtype=bool)
        elif column in WITH_DISTRACTOR:
            required = distractor
        elif column in MAY_BE_NAN:
            required = np.zeros(len(frame), dtype=bool)
        else:  # an option's column: required where it holds a number on another row
            scope = distractor if column.endswith("_logit_diff") else np.ones(len(frame),
                                                                               dtype=bool)
            required = scope & bool(np.isfinite(values[scope]).any())
        bad = np.isinf(values) | (nan & required)
        if bad.any():
            by_column[column] = bad
    rows = np.zeros(len(frame), dtype=bool)
    for bad in by_column.values():
        rows |= bad
    return rows, by_column


def non_finite_rows(frame: pd.DataFrame, limit: int = NON_FINITE_LISTED
                    ) -> tuple[pd.Series, pd.DataFrame]:
    """Per neuron (``neuron_id`` in order of first appearance) the number of its rows with a
    non-finite value (:func:`non_finite_mask`), and the first ``limit`` such rows:
    ``prompt_id, neuron_id, layer, columns`` (the offending columns, comma-separated)."""
    rows, by_column = non_finite_mask(frame)
    ids = frame["neuron_id"].to_numpy()
    counts = pd.Series(rows.astype(np.int64)).groupby(ids, sort=False).sum()
    listed = np.flatnonzero(rows)[:limit]
    named = frame.iloc[listed][["prompt_id", "neuron_id", "layer"]].assign(
        columns=[", ".join(column for column, bad in by_column.items() if bad[index])
                 for index in listed])
    return counts.reindex(pd.unique(ids)), named.reset_index(drop=True)


def estimate_methods(columns: Iterable[str], prefix: str = "total_") -> list[str]:
    """The estimate methods (``atp``, ``relp``, ``relp_ln``...) whose ``<prefix><method>``
    columns are among ``columns`` (per-prompt ``total_<method>``; per-neuron
    ``mean_total_<method>``)."""
    return [column[len(prefix):] for column in columns if column.startswith(prefix)
            and column[len(prefix):].split("_")[0] in ("atp", "relp")]


# Agreement of each first-order estimate (atp, relp, ...) with the exact total: neurons.parquet
# columns "<method>_<measure>", present when the workflow ran attribution patching.
AGREEMENT_MEASURES = ("spearman", "sign_agreement", "median_relative_error")


def _estimate_agreement(row: Any, methods: Sequence[str]) -> dict[str, Any]:
    """``{"<method>_agreement": {...}}`` per method from a neurons row (namedtuple or Series):
    the :data:`AGREEMENT_MEASURES` and ``mean_total_<method>``."""
    return {f"{method}_agreement": {
        **{measure: clean_float(getattr(row, f"{method}_{measure}"))
           for measure in AGREEMENT_MEASURES},
        f"mean_total_{method}": clean_float(getattr(row, f"mean_total_{method}"))}
        for method in methods}


def neuron_documents(neurons: pd.DataFrame, per_prompt: pd.DataFrame) -> list[dict[str, Any]]:
    """The plan's per-neuron JSON shape (effect_summary, sign_alignment, per_prompt_breakdown)."""
    breakdowns = {neuron_id: group for neuron_id, group in per_prompt.groupby("neuron_id")}
    methods = estimate_methods(neurons.columns, "mean_total_")
    documents = []
    for row in neurons.itertuples(index=False):
        group = breakdowns[row.neuron_id]
        documents.append({
            "neuron_id": row.neuron_id, "layer": row.layer, "neuron": row.neuron,
            "n_prompts": row.n_prompts,
            "effect_summary": {key: clean_float(getattr(row, key)) for key in (
                "mean_direct_ratio", "std_direct_ratio", "median_direct_ratio", "classification",
                "consistency", "mean_cancellation", "n_ratio_defined")},
            "effect_summary_frozen_norm": {key: clean_float(getattr(row, key)) for key in (
                "mean_direct_ratio_frozen_norm", "std_direct_ratio_frozen_norm",
                "median_direct_ratio_frozen_norm", "classification_frozen_norm",
                "consistency_frozen_norm")},
            "sign_alignment": {"aligned_fraction": clean_float(row.aligned_fraction),
                               "interpretation": row.interpretation},
            **_estimate_agreement(row, methods),
            "per_prompt_breakdown": [
                {key: clean_float(value) for key, value in record.items()}
                for record in group[[*BREAKDOWN_COLUMNS, *(f"total_{method}"
                                                           for method in methods)]
                                    ].to_dict("records")
            ],
        })
    return documents


def enrich_profiles(document: Any, neurons: pd.DataFrame) -> Any:
    """A deep copy of the user's profile document, each profile gaining ``effect_type``,
    ``direct_ratio`` and their frozen-norm variants (and ``<method>_agreement``, e.g.
    ``atp_agreement`` and ``relp_agreement``, when the neurons carry them); every other field untouched."""
    enriched = copy.deepcopy(document)
    profiles = enriched["profiles"] if isinstance(enriched, dict) else enriched
    by_id = neurons.set_index("neuron_id")
    methods = estimate_methods(neurons.columns, "mean_total_")
    for profile in profiles:
        neuron_id = profile_neuron_id(profile)
        row = by_id.loc[neuron_id]
        profile["effect_type"] = row["classification"]
        profile["direct_ratio"] = clean_float(row["mean_direct_ratio"])
        profile["effect_type_frozen_norm"] = row["classification_frozen_norm"]
        profile["direct_ratio_frozen_norm"] = clean_float(row["mean_direct_ratio_frozen_norm"])
        profile.update(_estimate_agreement(row, methods))
    return enriched
