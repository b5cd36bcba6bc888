"""The profiles' own downstream edges (``top_downstream_targets``, read by
:mod:`neuron_effects.profile_edges`) measured exactly, and their agreement with the exact
mediators. Per neuron (:func:`edge_agreement`):

* ``edge_neuron_overlap``: of the profile's top-k neuron targets (by |avg_weight|), the fraction
  among the exact top-k mediator neurons (by |mean contribution| over prompts), over
  ``min(k, either list's length)``;
* ``edge_sign_agreement``: over the neuron targets that are exact mediators, the fraction whose
  ``avg_weight`` has the sign of the mean contribution;
* ``edge_logit_overlap``: of the top-k logit targets, the fraction among the k tokens most often
  in the direct effect's top-k over prompts, over ``min(k, either list's length)``.

A profile without the field gets no comparison (NaN), which is not an error.

**Every neuron edge measured exactly.** For a studied neuron ``s`` (layer ``L``) and each of its
neuron targets ``t`` (layer ``l > L``, index ``m``; positions ignored), the replay that computes
``s``'s total effect also yields ``t``'s activation (the input of ``layers[l].mlp.down_proj``,
entry ``m``) at the last position: :class:`EdgeCollector` keeps
``Δa_t = a_t(treated row) - a_t(the V = 0 baseline row of the same batch)`` per prompt. With the
plain gradient ``∂logit_target/∂a_t = (W_down_l^T g_l)[m]`` of the attribution pass, the exact
first-order edge weight is ``Δa_t * ∂logit_target/∂a_t``. :func:`edge_table`: one row per edge
with the means over prompts; an edge is *real* when ``relative_delta`` (mean ``|Δa_t| / |a_t|``,
``a_t`` the clean activation) is at least a threshold and its ``exact_weight`` has the sign of
the profile's ``avg_weight``. Limits: the graph's edges count direct paths only (``s``'s write read
by ``t``) with the graph's own metric; ``Δa_t`` counts every path from ``s`` to ``t``. An edge
whose target layer is not after the source's, or not in the model, is left out with a warning
(:func:`measurable_targets`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from .profile_edges import Edge

EDGE_COLUMNS = ("edge_n_neuron_targets", "edge_n_logit_targets", "edge_neuron_overlap",
                "edge_sign_agreement", "edge_logit_overlap", "edge_n_measured",
                "edge_real_fraction")
# One row per (prompt, studied neuron, neuron target) in the shards' edge tables.
EDGE_DELTA_COLUMNS = ("neuron_id", "target_layer", "target_neuron", "delta_activation",
                      "target_activation")
EDGE_TABLE_COLUMNS = ("neuron_id", "target_layer", "target_neuron", "avg_weight",
                      "delta_activation", "relative_delta", "exact_weight", "sign_agrees",
                      "n_prompts")


def _top(items: Iterable[tuple[Any, float]], k: int) -> list[Any]:
    """The keys of the k items of largest |value| (first occurrence of each key)."""
    ranked = sorted(items, key=lambda item: -abs(item[1]) if not math.isnan(item[1]) else 0.0)
    keys: list[Any] = []
    for key, _ in ranked:
        if key not in keys:
            keys.append(key)
    return keys[:k]


def _overlap(first: list[Any], second: list[Any]) -> float:
    size = min(len(first), len(second))
    return len(set(first) & set(second)) / size if size else math.nan


def edge_agreement(edges: list[Edge], mediator_neurons: pd.DataFrame,
                   direct_top_tokens: Iterable[Iterable[int]], k: int) -> dict[str, float]:
    """The module docstring's agreement columns for one neuron.

    ``mediator_neurons``: its exact mediator neurons over prompts (``layer``, ``index``,
    ``mean_contribution``); ``direct_top_tokens``: per prompt, the direct effect's top-k tokens."""
    neuron_edges = [edge for edge in edges if edge.kind == "neuron"]
    logit_edges = [edge for edge in edges if edge.kind == "logit"]
    exact = {(int(row.layer), int(row.index)): float(row.mean_contribution)
             for row in mediator_neurons.itertuples()}
    exact_top = _top(exact.items(), k)
    edge_top = _top((((edge.layer, edge.index), edge.avg_weight) for edge in neuron_edges), k)
    signs = [math.copysign(1, edge.avg_weight) == math.copysign(1, exact[(edge.layer, edge.index)])
             for edge in neuron_edges if (edge.layer, edge.index) in exact
             and not math.isnan(edge.avg_weight) and edge.avg_weight != 0
             and exact[(edge.layer, edge.index)] != 0]
    counts = Counter(int(token) for tokens in direct_top_tokens for token in tokens)
    direct_top = [token for token, _ in counts.most_common(k)]
    logit_top = _top(((edge.index, edge.avg_weight) for edge in logit_edges), k)
    return {
        "edge_n_neuron_targets": float(len(neuron_edges)),
        "edge_n_logit_targets": float(len(logit_edges)),
        "edge_neuron_overlap": _overlap(edge_top, exact_top),
        "edge_sign_agreement": sum(signs) / len(signs) if signs else math.nan,
        "edge_logit_overlap": _overlap(logit_top, direct_top),
    }


def measurable_targets(neuron_id: str, layer: int, targets: Iterable[tuple[int, int]],
                       n_layers: int, intermediate: int) -> tuple[list[tuple[int, int]],
                                                                  list[str]]:
    """The targets ``(layer, neuron)`` of neuron ``neuron_id`` (in ``layer``) that the replay can
    measure: a later layer of the model and an index below ``intermediate``; and a warning
    naming the neuron and the edge for each one left out."""
    kept, warnings = [], []
    for target_layer, target_neuron in targets:
        edge = f"{neuron_id} -> {target_layer}_{target_neuron}"
        if target_layer <= layer:
            warnings.append(f"edge {edge} left out: target layer {target_layer} is not after "
                            f"the source's ({layer})")
        elif target_layer >= n_layers or target_neuron >= intermediate:
            warnings.append(f"edge {edge} left out: no neuron {target_neuron} in layer "
                            f"{target_layer} of the model ({n_layers} layers x {intermediate})")
        else:
            kept.append((int(target_layer), int(target_neuron)))
    return kept, warnings


class EdgeCollector:
    """A :class:`neuron_effects.total.LayerCollector` for one replay batch: ``Δa_t`` at the last
    position for each requested (replay row, target layer, target neuron).

    ``rows``, ``layers``, ``neurons`` [E]: the requests (each target layer after its row's start
    layer); ``baselines[p]``: the replay row holding row p's V = 0 baseline. ``deltas`` [E]
    (float64) is filled as the replay passes the target layers."""

    def __init__(self, rows: torch.Tensor, layers: torch.Tensor, neurons: torch.Tensor,
                 baselines: torch.Tensor):
        self.rows, self.neurons, self.baselines = rows, neurons, baselines
        self.by_layer = {int(layer): (layers == layer).nonzero().squeeze(1)
                         for layer in torch.unique(layers).tolist()}
        self.deltas = torch.full((len(rows),), float("nan"), dtype=torch.float64,
                                 device=rows.device)

    def __call__(self, layer: int, active: int, attention_output: torch.Tensor,
                 attention_input: torch.Tensor, activations: torch.Tensor,
                 mlp_output: torch.Tensor) -> None:
        requests = self.by_layer.get(layer)
        if requests is None:
            return
        rows, neurons = self.rows[requests], self.neurons[requests]
        self.deltas[requests] = (activations[rows, neurons].double()
                                 - activations[self.baselines[rows], neurons].double())


def edge_table(deltas: pd.DataFrame, gradients: dict[str, np.ndarray] | None,
               weights: dict[str, dict[tuple[int, int], float]]) -> pd.DataFrame:
    """One row per measured edge (:data:`EDGE_TABLE_COLUMNS`) from the shards' per-prompt
    ``deltas`` (``prompt_id`` and :data:`EDGE_DELTA_COLUMNS`): the profile's ``avg_weight``
    (``weights``: neuron id ->
    :func:`neuron_effects.profile_edges.neuron_target_weights`), the means over prompts of
    ``Δa_t`` (``delta_activation``), of ``|Δa_t| / |a_t|`` (``relative_delta``, prompts with
    ``a_t = 0`` left out) and of ``Δa_t * ∂logit_target/∂a_t`` (``exact_weight``; ``gradients``:
    prompt id -> [layers, intermediate] plain gradients, None without attribution patching:
    NaN), and ``sign_agrees`` (sign of exact_weight vs avg_weight; NA when either is 0 or NaN)."""
    frame = deltas.astype({"target_layer": int, "target_neuron": int,
                           "delta_activation": float, "target_activation": float})
    target = frame["target_activation"].abs().replace(0.0, np.nan)
    frame["relative_delta"] = frame["delta_activation"].abs() / target
    if gradients is None:
        frame["exact_weight"] = np.nan
    else:
        slope = [gradients[prompt][layer, neuron] for prompt, layer, neuron in zip(
            frame["prompt_id"], frame["target_layer"], frame["target_neuron"])]
        frame["exact_weight"] = frame["delta_activation"] * np.asarray(slope, dtype=np.float64)
    keys = ["neuron_id", "target_layer", "target_neuron"]
    table = frame.groupby(keys, sort=False).agg(
        delta_activation=("delta_activation", "mean"), relative_delta=("relative_delta", "mean"),
        exact_weight=("exact_weight", "mean"), n_prompts=("prompt_id", "size")).reset_index()
    table["avg_weight"] = [weights.get(neuron_id, {}).get((layer, neuron), math.nan)
                           for neuron_id, layer, neuron in zip(
                               table["neuron_id"], table["target_layer"], table["target_neuron"])]
    signs = np.sign(table["exact_weight"]) * np.sign(table["avg_weight"])
    table["sign_agrees"] = pd.array([None if sign == 0 or math.isnan(sign) else bool(sign > 0)
                                     for sign in signs], dtype="boolean")
    return table[list(EDGE_TABLE_COLUMNS)]


def real_edges(table: pd.DataFrame, min_relative_delta: float) -> pd.DataFrame:
    """Per neuron of an :func:`edge_table`: ``edge_n_measured`` and ``edge_real_fraction``, the
    fraction of its measured edges with ``relative_delta >= min_relative_delta`` and a sign that
    agrees."""
    real = (table["relative_delta"] >= min_relative_delta) & table["sign_agrees"].fillna(False)
    return (table.assign(real=real.astype(float)).groupby("neuron_id", sort=False)
            .agg(edge_n_measured=("real", "size"), edge_real_fraction=("real", "mean"))
            .reset_index())
