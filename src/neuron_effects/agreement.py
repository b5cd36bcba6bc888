"""The first-order estimates (attribution patching and RelP, :mod:`neuron_effects.attribution`)
judged against the exact effects, and the all-neuron table they rank (no torch here: the
workflow's parse reads this module, through :mod:`neuron_effects.verified`).

Agreement with the exact engine, on the studied neurons' (prompt, neuron) rows (``total`` and
``total_atp`` on the target logit): the Spearman rank correlation over prompts, the fraction of
prompts where the signs agree, the median relative error ``|total_atp - total| / |total|``, and
precision@k of the ranking by mean ``|total_atp|`` against the ranking by mean ``|total|``.

The all-neuron table (:func:`neuron_table`) ranks every neuron of the model by each method's mean
|estimate| over prompts; :func:`candidates` takes the top ones outside the profile.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN below 3 points or for a constant
    input."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return math.nan
    rank_x, rank_y = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rank_x.std() == 0 or rank_y.std() == 0:
        return math.nan
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def agreement(estimate: np.ndarray, exact: np.ndarray, method: str = "atp") -> dict[str, float]:
    """``<method>_spearman``, ``<method>_sign_agreement`` (over rows where the exact value is
    non-zero) and ``<method>_median_relative_error`` (``|estimate - exact| / |exact|``, same
    rows) of paired values."""
    estimate, exact = np.asarray(estimate, dtype=float), np.asarray(exact, dtype=float)
    nonzero = exact != 0
    relative = np.abs(estimate[nonzero] - exact[nonzero]) / np.abs(exact[nonzero])
    return {
        f"{method}_spearman": spearman(estimate, exact),
        f"{method}_sign_agreement": float(
            (np.sign(estimate[nonzero]) == np.sign(exact[nonzero])).mean())
        if nonzero.any() else math.nan,
        f"{method}_median_relative_error": float(np.median(relative))
        if nonzero.any() else math.nan,
    }


def neuron_agreement(per_prompt: pd.DataFrame, method: str = "atp") -> pd.DataFrame:
    """Per neuron over its prompts (columns ``total``, ``total_<method>``): :func:`agreement`
    and ``mean_total_<method>``; one row per ``neuron_id`` in order of first appearance.
    Computed with grouped columns (no loop over neurons): Spearman as the Pearson correlation
    of the within-neuron average ranks, NaN below 3 prompts or for constant ranks."""
    column = f"total_{method}"
    ids = per_prompt["neuron_id"].to_numpy()
    neurons = pd.Index(pd.unique(ids))
    estimate = per_prompt[column].astype(float).to_numpy()
    exact = per_prompt["total"].astype(float).to_numpy()
    frame = pd.DataFrame({"estimate": estimate, "exact": exact})
    ranks = frame.groupby(ids, sort=False).rank()
    centred = ranks - ranks.groupby(ids, sort=False).transform("mean")
    sums = pd.DataFrame({"xy": centred["estimate"] * centred["exact"],
                         "xx": centred["estimate"] ** 2, "yy": centred["exact"] ** 2}
                        ).groupby(ids, sort=False).sum().reindex(neurons)
    counts = frame.groupby(ids, sort=False).size().reindex(neurons)
    spearman_values = sums["xy"] / np.sqrt(sums["xx"] * sums["yy"])
    spearman_values[(counts < 3) | (sums["xx"] == 0) | (sums["yy"] == 0)] = np.nan
    nonzero = exact != 0
    over_nonzero = pd.DataFrame({
        "signs": np.sign(estimate[nonzero]) == np.sign(exact[nonzero]),
        "relative": np.abs(estimate[nonzero] - exact[nonzero]) / np.abs(exact[nonzero]),
    }).groupby(ids[nonzero], sort=False)
    return pd.DataFrame({
        "neuron_id": neurons,
        f"{method}_spearman": spearman_values.clip(-1.0, 1.0).to_numpy(),
        f"{method}_sign_agreement": over_nonzero["signs"].mean().astype(float)
        .reindex(neurons).to_numpy(),
        f"{method}_median_relative_error": over_nonzero["relative"].median()
        .reindex(neurons).to_numpy(),
        f"mean_{column}": frame["estimate"].groupby(ids, sort=False).mean().reindex(neurons)
        .to_numpy(),
    })


def precision_at_k(estimate: pd.Series, exact: pd.Series, k: int) -> float:
    """The fraction of the top ``k`` by ``estimate`` that are also in the top ``k`` by ``exact``
    (two scores of the same items, same index; larger = more important)."""
    k = min(k, len(exact))
    if k < 1:
        return math.nan
    top_estimate = set(estimate.sort_values(ascending=False, kind="stable").index[:k])
    top_exact = set(exact.sort_values(ascending=False, kind="stable").index[:k])
    return len(top_estimate & top_exact) / k


def ranking_scores(per_prompt: pd.DataFrame, method: str = "atp") -> pd.DataFrame:
    """Per neuron: mean |total| (the exact ranking, ``abs_total``) and mean |total_<method>|
    (the estimate's, ``abs_estimate``)."""
    return per_prompt.assign(abs_total=per_prompt["total"].abs(),
                             abs_estimate=per_prompt[f"total_{method}"].abs()).groupby(
        "neuron_id")[["abs_total", "abs_estimate"]].mean()


def layer_agreement(per_prompt: pd.DataFrame, method: str = "atp") -> pd.DataFrame:
    """Per layer, over its (prompt, neuron) rows: :func:`agreement`; and
    ``<method>_precision_at_k`` of the layer's studied neurons with ``<method>_k`` = a tenth of
    them (at least 1)."""
    rows = []
    for layer, group in per_prompt.groupby("layer"):
        scores = ranking_scores(group, method)
        k = max(1, math.ceil(len(scores) / 10))
        rows.append({"layer": int(layer),
                     **agreement(group[f"total_{method}"], group["total"], method),
                     f"{method}_k": k,
                     f"{method}_precision_at_k": precision_at_k(scores["abs_estimate"],
                                                                scores["abs_total"], k)})
    return pd.DataFrame(rows)


def overall_agreement(per_prompt: pd.DataFrame, ks: tuple[int, ...] = (10, 50, 100, 500),
                      method: str = "atp") -> dict[str, float]:
    """Over every (prompt, neuron) row: :func:`agreement`, and precision@k of the studied
    neurons' ranking for each k below their number (and k = a tenth of them)."""
    scores = ranking_scores(per_prompt, method)
    tenth = max(1, math.ceil(len(scores) / 10))
    result = agreement(per_prompt[f"total_{method}"], per_prompt["total"], method)
    for k in sorted({k for k in ks if k < len(scores)} | {tenth}):
        result[f"precision_at_{k}"] = precision_at_k(scores["abs_estimate"],
                                                     scores["abs_total"], k)
    return result


LAYER_BANDS = ("early", "middle", "late")


def layer_bands(n_layers: int) -> list[tuple[str, int, int]]:
    """The model's layers in thirds, as (band, first layer, last layer): ``n_layers`` split into
    three consecutive groups whose sizes differ by at most one (the first ones larger)."""
    if n_layers < len(LAYER_BANDS):
        raise ValueError(f"{n_layers} layers cannot be split in {len(LAYER_BANDS)} bands")
    groups = np.array_split(np.arange(n_layers), len(LAYER_BANDS))
    return [(band, int(group[0]), int(group[-1])) for band, group in zip(LAYER_BANDS, groups)]


def band_agreement(per_prompt: pd.DataFrame, n_layers: int,
                   methods: Sequence[str]) -> pd.DataFrame:
    """Per (method, band of :func:`layer_bands`), over the band's (prompt, neuron) rows: the
    Spearman and sign agreement of ``total_<method>`` with the exact ``total``
    (:func:`agreement`), and the number of rows."""
    rows = []
    for method in methods:
        for band, first, last in layer_bands(n_layers):
            group = per_prompt[per_prompt["layer"].between(first, last)]
            values = agreement(group[f"total_{method}"], group["total"], method)
            rows.append({"method": method, "band": band, "layers": f"{first}-{last}",
                         "rows": len(group), "spearman": values[f"{method}_spearman"],
                         "sign_agreement": values[f"{method}_sign_agreement"]})
    return pd.DataFrame(rows)


def neuron_table(estimates: dict[str, np.ndarray], profile: pd.DataFrame) -> pd.DataFrame:
    """Every neuron of the model from each method's ``estimates`` [prompts, layers,
    intermediate]: layer, neuron, per method ``mean_abs_<method>`` (mean over prompts of |est|),
    ``max_abs_<method>``, ``mean_<method>`` and its rank (1 = the largest mean_abs; ``rank`` for
    atp, ``rank_<method>`` for the others), and ``in_profile`` (listed in ``profile``'s
    layer/neuron columns); ordered by the first method's rank."""
    n_layers, width = next(iter(estimates.values())).shape[1:]
    table = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), width),
                          "neuron": np.tile(np.arange(width), n_layers)})
    for method, values in estimates.items():
        magnitude = np.abs(values.astype(np.float64))
        table[f"mean_abs_{method}"] = magnitude.mean(0).ravel()
        table[f"max_abs_{method}"] = magnitude.max(0).ravel()
        table[f"mean_{method}"] = values.astype(np.float64).mean(0).ravel()
    table["in_profile"] = False
    table.loc[profile["layer"].to_numpy() * width + profile["neuron"].to_numpy(),
              "in_profile"] = True
    for method in reversed(list(estimates)):  # the first method's order last
        table = table.sort_values([f"mean_abs_{method}", "layer", "neuron"],
                                  ascending=[False, True, True], kind="stable",
                                  ignore_index=True)
        table[rank_column(method)] = np.arange(1, len(table) + 1)
    per_method = [column for method in estimates for column in (
        f"mean_abs_{method}", f"max_abs_{method}", f"mean_{method}", rank_column(method))]
    return table[["layer", "neuron", *per_method, "in_profile"]]


def rank_column(method: str) -> str:
    """The all-neuron table's rank column of ``method``: ``rank`` for atp (as before RelP),
    ``rank_<method>`` for the others."""
    return "rank" if method == "atp" else f"rank_{method}"


def candidates(table: pd.DataFrame, n: int, methods: Sequence[str] = ("atp",)) -> pd.DataFrame:
    """The neurons of :func:`neuron_table` not in the profile that are among the ``n`` with the
    largest mean |estimate| of any of ``methods``, with a ``neuron_id`` ``L{layer}/N{neuron}``
    and ``listed_by`` (the methods that list it, comma-separated); ordered by their best rank
    over the methods."""
    outside = table[~table["in_profile"]]
    listed = {method: set(outside.nsmallest(n, rank_column(method)).index) for method in methods}
    top = outside.loc[sorted(set().union(*listed.values()))].copy()
    top["listed_by"] = [", ".join(method for method in methods if index in listed[method])
                        for index in top.index]
    top["_best"] = top[[rank_column(method) for method in methods]].min(axis=1)
    top = top.sort_values(["_best", "layer", "neuron"], kind="stable", ignore_index=True)
    top.insert(0, "neuron_id", [f"L{layer}/N{neuron}"
                                for layer, neuron in zip(top["layer"], top["neuron"])])
    return top.drop(columns=["_best", "in_profile"])
