"""Checking a sample of the run's results against the slow reference paths, at a higher precision.

For each sampled (prompt, neuron) row of the run's table (``per_prompt.parquet``), the reference
model recomputes the prompt's clean run (so the clean activation ``a``, hence the scale ``s``,
carries no rounding of the run), builds ``V = s * w_n`` and runs :mod:`neuron_effects.reference`:
a hooked full forward for the total effect, the frozen-downstream forward for the direct effect,
and the same with the final-norm scale frozen. Every numeric metric is compared.

The reference model has the SAME weights as the run, computed at a higher precision
(:func:`reference_dtype`): :func:`neuron_effects.model.load_model` with ``compute_dtype`` loads
it in the reference dtype and rounds every parameter through the run's dtype and back. So the
comparison measures the run's arithmetic precision (and any fast-path defect), not a change of
model.

Every metric, both ratios, both flags and the top-k token lists are checked; the metrics are
computed from the reference's effect vectors by plain code of their own
(:func:`neuron_effects.reference.plain_metrics`), never by the fast path's formulas. A value NaN
or infinite on either side fails, and so does any row of the whole table with a non-finite
value (counted over every row by the aggregation: :func:`non_finite_failure`). The tolerance on
``|run - reference|`` and the floor of the relative errors derive from the logit scale of the
reference's clean logits (:mod:`neuron_effects.error_scale`); the ratio's noise floor is the
run's own (the one its ``ratio_defined`` used). Relative error of a metric over the pairs: the median of
``|run - reference| / |reference|`` over the pairs whose ``|reference|`` is above that floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from .clean import CleanRun
from .model import LlamaFamily
from .reference import (plain_metrics, reference_clean_logits, reference_direct,
                        reference_total)
from .treatments import treatment_scales

RELATIVE_METRICS = ("direct", "indirect", "total")
OFF_BY = 0.1  # rows_off_10pct: relative error of total or indirect above 10 %

# Metrics in logit units (or probabilities, whose error is at most a quarter of the logits'),
# compared as |run - reference|.
COMPARED = ("direct", "indirect", "total", "direct_frozen_norm", "norm_mediated",
            "direct_logit_diff", "indirect_logit_diff", "total_logit_diff",
            "direct_frozen_norm_logit_diff", "norm_mediated_logit_diff",
            "prob_change_direct", "prob_change_indirect", "prob_change_total",
            "top_k_direct_mean", "top_k_direct_max", "top_k_indirect_mean",
            "top_k_indirect_max", "top_k_total_mean", "top_k_total_max")
# Ratios of |d| + |i|, compared in logit units: |delta| * (|d| + |i|) / 3, which is at most the
# tolerance when d, i and t each are (first order: |delta ratio| <= tol / (|d| + |i|),
# |delta cancellation| <= 3 tol / (|d| + |i|)).
RATIOS = ("direct_ratio", "cancellation", "direct_ratio_frozen_norm")
TOKEN_LISTS = ("top_k_direct_tokens", "top_k_indirect_tokens", "top_k_total_tokens")
# Every column a row is checked on: the above, the two flags, the token lists.
CHECKED = (*COMPARED, *RATIOS, "sign_aligned", "ratio_defined", *TOKEN_LISTS)
# The reference path's memory beyond its weights and the largest parameter's float64 copy:
# CUDA workspaces (cuBLAS), the caching allocator's slack and the readout's [vocab] vectors.
REFERENCE_SLACK_BYTES = 2 * 2**30


def sample_pairs(per_prompt: pd.DataFrame, n_pairs: int, seed: int) -> pd.DataFrame:
    """``n_pairs`` seeded random rows spread evenly over the layers present (first, last and
    evenly spaced ones in between; several rows per layer when there are more pairs); every row
    when ``n_pairs`` covers the table."""
    if n_pairs >= len(per_prompt):
        return per_prompt
    rng = np.random.default_rng(seed)
    layers = np.array(sorted(per_prompt["layer"].unique()))
    n_pairs = min(n_pairs, len(per_prompt))
    picks = layers[np.round(np.linspace(0, len(layers) - 1, n_pairs)).astype(int)]
    chosen: list[int] = []
    for layer in layers:
        wanted = int((picks == layer).sum())
        candidates = per_prompt.index[per_prompt["layer"] == layer].to_numpy()
        chosen.extend(rng.choice(candidates, size=min(wanted, len(candidates)), replace=False))
    return per_prompt.loc[chosen]


def reference_bytes(n_parameters: int, largest_parameter: int, working_bytes: int) -> int:
    """GPU memory the float64 reference needs: its weights (8 bytes a parameter), one float64
    temporary of the largest parameter (loading converts, and rounding through the run's dtype
    copies, one tensor at a time), the forward's working set ``working_bytes``
    (:func:`forward_working_bytes`) and :data:`REFERENCE_SLACK_BYTES`."""
    return 8 * n_parameters + 8 * largest_parameter + working_bytes + REFERENCE_SLACK_BYTES


def forward_working_bytes(
    n_tokens: int, n_layers: int, hidden: int, intermediate: int, kv_width: int, n_heads: int,
    vocab: int,
) -> int:
    """float64 bytes of one hooked full forward of ``n_tokens`` tokens: the key/value cache
    (2 x layers x T x kv_width), one layer's activations (T x (4 hidden + 3 intermediate)) and
    attention scores (heads x T x T), and 8 [vocab] readout vectors."""
    per_forward = (2 * n_layers * n_tokens * kv_width + n_tokens * (4 * hidden + 3 * intermediate)
                   + n_heads * n_tokens * n_tokens + 8 * vocab)
    return 8 * per_forward


def reference_dtype(
    run_dtype: torch.dtype, device: torch.device, needed_bytes: int, free_bytes: int | None,
) -> tuple[torch.dtype, str | None]:
    """The dtype of the reference path, and a note when it is not the one wanted.

    float32 for a bfloat16/float16 run. float64 for a float32 run on the CPU, and on a GPU when
    the float64 reference's ``needed_bytes`` (:func:`reference_bytes`) fit in ``free_bytes``;
    otherwise float32, which then checks the fast path's exactness but not the run's precision."""
    if run_dtype != torch.float32:
        return torch.float32, None
    if device.type == "cpu" or (free_bytes is not None and needed_bytes <= free_bytes):
        return torch.float64, None
    free = "unknown" if free_bytes is None else f"{free_bytes / 1e9:.1f} GB"
    return torch.float32, (
        f"float64 reference needs {needed_bytes / 1e9:.1f} GB of GPU memory (float64 weights "
        f"and working memory), {free} free: the reference ran in float32 like the run, so this "
        "validation checks the fast path's exactness, not the run's precision")


@dataclass
class ReferenceRow:
    """The reference path's values for one row (:func:`neuron_effects.reference.plain_metrics`)
    and its effect vectors [vocab] (float64: direct, indirect, total), the magnitude
    ``|d| + |i|`` and the noise floor it was compared with."""

    values: dict[str, object]
    effects: dict[str, np.ndarray]
    noise_floor: float


@torch.inference_mode()
def reference_metrics(
    model: LlamaFamily, clean: CleanRun, row: pd.Series, treatment: str, positions: str,
    full_vocab: bool, top_k: int, noise_floor: float, clean_logits: torch.Tensor | None = None,
) -> ReferenceRow:
    """Every metric of :data:`CHECKED` for one row of the run's table, recomputed by the
    reference paths on ``model`` from ``clean`` (a clean run of ``model``) and the plain metric
    code of :func:`neuron_effects.reference.plain_metrics`.

    The scale comes from ``clean``'s own activation (``mean_ablate``'s mean is the row's
    ``scale + activation``). ``clean_logits``: :func:`reference_clean_logits` of the prompt, when
    already computed."""
    layer, neuron = int(row["layer"]), int(row["neuron"])
    mean = torch.tensor(float(row["scale"]) + float(row["activation"]), dtype=model.readout_dtype)
    direction = model.output_directions(torch.tensor([layer]), torch.tensor([neuron]))[0]
    activation = clean.activations[layer, neuron]
    vector = treatment_scales(activation, treatment, mean.to(activation.device)) * direction
    if positions == "last":
        total_vector = vector
    else:  # every position gets its own scale from its own activation
        per_position = clean.full_activations[layer][:, neuron]
        scales = treatment_scales(per_position, treatment, mean.to(per_position.device))
        total_vector = scales[:, None] * direction[None, :].to(scales.device)
    if clean_logits is None:
        clean_logits = reference_clean_logits(model, clean.input_ids)
    as_float64 = {"total": reference_total(model, clean.input_ids, layer, total_vector,
                                           clean_logits),
                  "direct": reference_direct(model, clean, layer, vector,
                                             clean_logits=clean_logits),
                  "frozen": reference_direct(model, clean, layer, vector, freeze_norm=True,
                                             clean_logits=clean_logits),
                  "clean": clean_logits}
    vectors = {name: tensor.double().cpu().numpy() for name, tensor in as_float64.items()}
    distractor = None if pd.isna(row["distractor_id"]) else int(row["distractor_id"])
    values = plain_metrics(vectors["direct"], vectors["frozen"], vectors["total"],
                           vectors["clean"], int(row["target_id"]), distractor, full_vocab,
                           top_k, noise_floor)
    effects = {"direct": vectors["direct"], "indirect": vectors["total"] - vectors["direct"],
               "total": vectors["total"]}
    return ReferenceRow(values, effects, noise_floor)


def _token_list_gap(run_tokens: object, effect: np.ndarray, top_k: int) -> float:
    """How far the run's top-k token list is from a correct one, in logit units: ``max_j
    | |E[run_j]| - (j-th largest |E|) |`` under the reference's ``E`` (0 for the reference's own
    list; a tie broken the other way costs only the tie's width); inf when the list has the
    wrong length or a token id outside the vocabulary."""
    tokens = np.asarray(run_tokens, dtype=np.int64)
    expected = np.sort(np.abs(effect))[::-1][:top_k]
    if tokens.shape != expected.shape or tokens.min(initial=0) < 0 \
            or tokens.max(initial=0) >= len(effect):
        return np.inf
    return float(np.max(np.abs(np.abs(effect[tokens]) - expected), initial=0.0))


def absolute_differences(row: pd.Series, reference: ReferenceRow,
                         tolerance: float) -> dict[str, float]:
    """``|run - reference|`` per column of :data:`CHECKED`, in logit units (see :data:`RATIOS`
    and :func:`_token_list_gap`); inf for a value NaN or infinite on one side only, or on both
    sides where it should be defined, and for a flag that disagrees away from its boundary
    (``ratio_defined`` farther than 2 x ``tolerance`` from the noise floor, ``sign_aligned``
    with both |d| and |i| above ``tolerance``). Columns undefined on both sides (no distractor,
    no full-vocabulary metrics, a ratio below the floor) are left out."""
    values = reference.values
    magnitude = abs(values["direct"]) + abs(values["indirect"])
    undefined = {name for name in (*COMPARED, *RATIOS)
                 if (name.endswith("_logit_diff") and pd.isna(row["distractor_id"]))
                 or (name.startswith(("prob_change_", "top_k_"))
                     and not len(values["top_k_total_tokens"]))
                 or (name in RATIOS and not values["ratio_defined"])}
    differences: dict[str, float] = {}
    for name in (*COMPARED, *RATIOS):
        expected, got = float(values[name]), float(row[name])
        if np.isnan(expected) and np.isnan(got) and name in undefined:
            continue
        difference = abs(expected - got)
        if name in RATIOS:
            difference *= magnitude / 3
        differences[name] = difference if np.isfinite(difference) else np.inf
    near_floor = abs(magnitude - reference.noise_floor) <= 2 * tolerance
    differences["ratio_defined"] = (
        0.0 if bool(row["ratio_defined"]) == values["ratio_defined"] or near_floor else np.inf)
    near_zero = min(abs(values["direct"]), abs(values["indirect"])) <= tolerance
    differences["sign_aligned"] = (
        0.0 if bool(row["sign_aligned"]) == values["sign_aligned"] or near_zero else np.inf)
    if not bool(row["ratio_defined"]) == values["ratio_defined"]:  # straddles the floor
        for name in RATIOS:
            differences.pop(name, None)
    for name in TOKEN_LISTS:
        expected_tokens = values[name]
        if len(expected_tokens) or len(row[name]):
            effect = reference.effects[name[len("top_k_"):-len("_tokens")]]
            differences[name] = _token_list_gap(row[name], effect, len(expected_tokens))
    return differences


def compare_with_reference(
    model: LlamaFamily, clean: CleanRun, row: pd.Series, treatment: str, positions: str,
    full_vocab: bool, top_k: int, noise_floor: float, tolerance: float,
) -> dict[str, float]:
    """Absolute differences, column by column, between one row and the reference on
    ``model`` (:func:`absolute_differences`)."""
    reference = reference_metrics(model, clean, row, treatment, positions, full_vocab, top_k,
                                  noise_floor)
    return absolute_differences(row, reference, tolerance)


def relative_errors(run: np.ndarray, reference: np.ndarray, floor: float) -> np.ndarray:
    """``|run - reference| / |reference|`` where ``|reference| >= floor``, NaN below it; inf
    where either side is NaN or infinite (so that it cannot pass)."""
    run, reference = np.asarray(run, dtype=float), np.asarray(reference, dtype=float)
    broken = ~np.isfinite(run) | ~np.isfinite(reference)
    above = np.abs(np.where(broken, 0.0, reference)) >= floor
    errors = np.full(len(run), np.nan)
    errors[above] = np.abs(run[above] - reference[above]) / np.abs(reference[above])
    errors[broken] = np.inf
    return errors


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def non_finite_failure(non_finite: Mapping[str, Any]) -> str | None:
    """The failure naming the run's rows with a NaN or infinite value (``non_finite``:
    ``n_rows`` and the first ``rows``,
    :func:`neuron_effects.jobs.aggregation.non_finite_summary`), or None when there is none."""
    if not non_finite["n_rows"]:
        return None
    named = "; ".join(f"prompt {row['prompt_id']!r}, neuron {row['neuron_id']} "
                      f"({row['columns']})" for row in non_finite["rows"])
    more = f" and {non_finite['n_rows'] - len(non_finite['rows'])} more" \
        if non_finite["n_rows"] > len(non_finite["rows"]) else ""
    return (f"{non_finite['n_rows']} (prompt, neuron) rows of the run's table hold a NaN or "
            f"infinite value: {named}{more}. The means and rankings leave them out; the effect "
            "jobs of their layer blocks computed them (see their logs): report it as a defect.")


def summarize(
    pairs: pd.DataFrame, run_dtype: str, reference: str, tolerance: float,
    max_relative_error: float, relative_error_floor: float,
    non_finite: Mapping[str, Any] | None = None,
) -> dict[str, object]:
    """The verdict on a table of pairs (columns ``diff_<column>``, ``max_abs_diff`` and
    ``relative_error_<metric>`` for direct, indirect and total).

    ``relative_error``: per metric, the median over the pairs whose ``|reference|`` is at least
    ``relative_error_floor`` (None if none is); ``rows_off_10pct``: the fraction of the pairs
    with total or indirect above the floor whose relative error on either is above 10 %.
    ``passed``: max |run - reference| <= ``tolerance`` and the relative errors of total and
    indirect <= ``max_relative_error``, none of them NaN or infinite, and no row of the whole
    run's table with a non-finite value (``non_finite``, counted over every row by the
    aggregation: :func:`non_finite_failure`); ``failure`` says why not, naming the dtype and
    the fix, or the rows."""
    relative = {name: (None if pairs[f"relative_error_{name}"].isna().all()
                       else float(pairs[f"relative_error_{name}"].median()))
                for name in RELATIVE_METRICS}
    checked = pairs[["relative_error_total", "relative_error_indirect"]]
    measured = checked.notna().any(axis=1)
    off = (checked > OFF_BY).any(axis=1)[measured]
    # a diff_ column is NaN only where the column is undefined on both sides of that pair (no
    # distractor...): absolute_differences turns every NaN or infinite value into inf
    by_column = {column: float(pairs[column].max()) for column in pairs.columns
                 if column.startswith("diff_") and pairs[column].notna().any()}
    differences = pairs["max_abs_diff"].to_numpy(dtype=float)
    max_abs = float(np.max(np.where(np.isnan(differences), np.inf, differences), initial=0.0))
    too_far = {name: relative[name] for name in ("total", "indirect")
               if relative[name] is not None and not relative[name] <= max_relative_error}
    failure = None
    if too_far or not max_abs <= tolerance:
        found = "; ".join(
            [f"median relative error of {name} {value:.3g} > {max_relative_error:g}"
             for name, value in too_far.items()]
            + ([f"max |run - reference| {max_abs:.3g} > tolerance {tolerance:.3g}"]
               if not max_abs <= tolerance else []))
        if run_dtype in ("bfloat16", "float16"):
            cause = (f"the cause is the run's dtype {run_dtype}, which rounds single-neuron "
                     "effects away. Fix: set dtype: float32 (the default) and rerun")
        else:
            cause = (f"in {run_dtype} this is not expected: check that TF32 is off "
                     "(precision_flags) and report it as a defect of the fast path")
        failure = (f"{found} (run {run_dtype} against a {reference} reference, "
                   f"{len(pairs)} pairs): {cause}.")
    non_finite = non_finite or {"n_rows": 0, "rows": [], "columns": []}
    failures = [text for text in (failure, non_finite_failure(non_finite)) if text]
    failure = " ".join(failures) or None
    return {
        "relative_error": relative,
        "relative_error_floor": relative_error_floor,
        "pairs_above_floor": {name: int(pairs[f"relative_error_{name}"].notna().sum())
                              for name in RELATIVE_METRICS},
        "rows_off_10pct": float(off.mean()) if len(off) else None,
        "max_relative_error": max_relative_error,
        # JSON has no inf: a value NaN or infinite on one side is None here, its column listed
        "max_abs_diff": _finite_or_none(max_abs),
        "max_abs_diff_by_metric": {column[len("diff_"):]: _finite_or_none(by_column[column])
                                   for column in by_column},
        "non_finite_columns": sorted(column[len("diff_"):] for column, value in by_column.items()
                                     if not np.isfinite(value)),
        "non_finite": dict(non_finite),
        "passed": failure is None,
        "failure": failure,
    }
