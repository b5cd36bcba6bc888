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

Relative error of a metric over the pairs: the median of ``|run - reference| / |reference|`` over
the pairs whose ``|reference| >= RELATIVE_ERROR_FLOOR``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .clean import CleanRun
from .metrics import effect_metrics
from .model import LlamaFamily
from .reference import reference_clean_logits, reference_direct, reference_total
from .treatments import treatment_scales

# Logit changes below 1e-3 are too small to interpret, and at that size float32's own error on
# SmolLM2 (max 3e-5 on total, BENCHMARKS.md "Precision") would already be 3 % of the value: a
# relative error is measured only on pairs whose reference value is at least this.
RELATIVE_ERROR_FLOOR = 1e-3
RELATIVE_METRICS = ("direct", "indirect", "total")
OFF_BY = 0.1  # rows_off_10pct: relative error of total or indirect above 10 %

COMPARED = ("direct", "indirect", "total", "direct_frozen_norm", "norm_mediated",
            "direct_logit_diff", "indirect_logit_diff", "total_logit_diff",
            "direct_frozen_norm_logit_diff", "norm_mediated_logit_diff",
            "prob_change_direct", "prob_change_indirect", "prob_change_total",
            "top_k_direct_mean", "top_k_direct_max", "top_k_indirect_mean",
            "top_k_indirect_max", "top_k_total_mean", "top_k_total_max")


def sample_pairs(per_prompt: pd.DataFrame, n_pairs: int, seed: int) -> pd.DataFrame:
    """``n_pairs`` seeded random rows spread evenly over the layers present (first, last and
    evenly spaced ones in between; several rows per layer when there are more pairs)."""
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


def reference_dtype(
    run_dtype: torch.dtype, device: torch.device, n_parameters: int, free_bytes: int | None,
) -> tuple[torch.dtype, str | None]:
    """The dtype of the reference path, and a note when it is not the one wanted.

    float32 for a bfloat16/float16 run. float64 for a float32 run on the CPU, and on a GPU when
    twice the float64 weights (``2 * 8 * n_parameters`` bytes: the weights and room for the
    activations and readout) fit in ``free_bytes``; otherwise float32, which then checks the
    fast path's exactness but not the run's precision."""
    if run_dtype != torch.float32:
        return torch.float32, None
    needed = 2 * 8 * n_parameters
    if device.type == "cpu" or (free_bytes is not None and needed <= free_bytes):
        return torch.float64, None
    free = "unknown" if free_bytes is None else f"{free_bytes / 1e9:.1f} GB"
    return torch.float32, (
        f"float64 reference needs {needed / 1e9:.1f} GB of GPU memory (2 x the float64 "
        f"weights), {free} free: the reference ran in float32 like the run, so this validation "
        "checks the fast path's exactness, not the run's precision")


@torch.inference_mode()
def reference_metrics(
    model: LlamaFamily, clean: CleanRun, row: pd.Series, treatment: str, positions: str,
    full_vocab: bool, top_k: int, noise_floor: float, clean_logits: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every metric of :data:`COMPARED` for one row of the run's table, recomputed by the
    reference paths on ``model`` from ``clean`` (a clean run of ``model``).

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
    total = reference_total(model, clean.input_ids, layer, total_vector, clean_logits)[None]
    direct = reference_direct(model, clean, layer, vector, clean_logits=clean_logits)[None]
    frozen = reference_direct(model, clean, layer, vector, freeze_norm=True,
                              clean_logits=clean_logits)[None]
    target = int(row["target_id"])
    distractor = None if pd.isna(row["distractor_id"]) else int(row["distractor_id"])
    keep = [target] + ([distractor] if distractor is not None else [])
    frozen = frozen[:, keep]
    if full_vocab:
        columns = (target, distractor)
    else:
        total, direct = total[:, keep], direct[:, keep]
        columns = (0, 1 if distractor is not None else None)
    clean_logits = clean_logits if full_vocab else clean_logits[keep]
    reference = effect_metrics(direct, frozen, total, clean_logits, columns[0], columns[1],
                               full_vocab, top_k, noise_floor)
    return {name: float(reference[name][0]) for name in COMPARED}


def absolute_differences(row: pd.Series, reference: dict[str, float]) -> dict[str, float]:
    """``|run - reference|`` per metric of :data:`COMPARED` (metrics NaN in both skipped)."""
    differences = {}
    for name in COMPARED:
        expected, got = reference[name], float(row[name])
        if np.isnan(expected) and np.isnan(got):
            continue
        differences[name] = abs(expected - got)
    return differences


def compare_with_reference(
    model: LlamaFamily, clean: CleanRun, row: pd.Series, treatment: str, positions: str,
    full_vocab: bool, top_k: int, noise_floor: float,
) -> dict[str, float]:
    """Absolute differences, metric by metric, between one row and the reference on ``model``."""
    return absolute_differences(row, reference_metrics(model, clean, row, treatment, positions,
                                                       full_vocab, top_k, noise_floor))


def relative_errors(run: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``|run - reference| / |reference|``, NaN where ``|reference| < RELATIVE_ERROR_FLOOR``."""
    above = np.abs(reference) >= RELATIVE_ERROR_FLOOR
    return np.where(above, np.abs(run - reference) / np.where(above, np.abs(reference), 1.0),
                    np.nan)


def summarize(
    pairs: pd.DataFrame, run_dtype: str, reference: str, tolerance: float,
    max_relative_error: float,
) -> dict[str, object]:
    """The verdict on a table of pairs (columns ``diff_<metric>``, ``max_abs_diff`` and
    ``relative_error_<metric>`` for direct, indirect and total).

    ``relative_error``: per metric, the median over the pairs above the floor (None if none is);
    ``rows_off_10pct``: the fraction of the pairs with total or indirect above the floor whose
    relative error on either is above 10 %. ``passed``: max |run - reference| <= ``tolerance``
    and the relative errors of total and indirect <= ``max_relative_error``; ``failure`` says
    why not, naming the dtype and the fix."""
    relative = {name: (None if pairs[f"relative_error_{name}"].isna().all()
                       else float(pairs[f"relative_error_{name}"].median()))
                for name in RELATIVE_METRICS}
    checked = pairs[["relative_error_total", "relative_error_indirect"]]
    measured = checked.notna().any(axis=1)
    off = (checked > OFF_BY).any(axis=1)[measured]
    max_abs = float(pairs["max_abs_diff"].max())
    too_far = {name: relative[name] for name in ("total", "indirect")
               if relative[name] is not None and relative[name] > max_relative_error}
    failure = None
    if too_far or max_abs > tolerance:
        found = "; ".join(
            [f"median relative error of {name} {value:.3g} > {max_relative_error:g}"
             for name, value in too_far.items()]
            + ([f"max |run - reference| {max_abs:.3g} > tolerance {tolerance:.3g}"]
               if max_abs > tolerance else []))
        if run_dtype in ("bfloat16", "float16"):
            cause = (f"the cause is the run's dtype {run_dtype}, which rounds single-neuron "
                     "effects away. Fix: set dtype: float32 (the default) and rerun")
        else:
            cause = (f"in {run_dtype} this is not expected: check that TF32 is off "
                     "(precision_flags) and report it as a defect of the fast path")
        failure = (f"{found} (run {run_dtype} against a {reference} reference, "
                   f"{len(pairs)} pairs): {cause}.")
    return {
        "relative_error": relative,
        "relative_error_floor": RELATIVE_ERROR_FLOOR,
        "pairs_above_floor": {name: int(pairs[f"relative_error_{name}"].notna().sum())
                              for name in RELATIVE_METRICS},
        "rows_off_10pct": float(off.mean()) if len(off) else None,
        "max_relative_error": max_relative_error,
        "max_abs_diff": max_abs,
        "max_abs_diff_by_metric": {column[len("diff_"):]: float(pairs[column].max())
                                   for column in pairs.columns if column.startswith("diff_")},
        "passed": failure is None,
        "failure": failure,
    }
