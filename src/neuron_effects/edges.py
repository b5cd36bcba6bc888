"""The profiles' own downstream edges (``top_downstream_targets``) and their agreement with the
exact mediators.

A profile may list, in the format of the user's attribution-graph edge statistics, objects whose
``target`` is ``"<layer>_<neuron>_<position>"`` (a neuron), ``"L_<token id>_<position>"`` (a
logit) or ``"E_<token id>_<position>"`` (an embedding), with ``avg_weight`` and other fields.
Positions are ignored. Per neuron (:func:`edge_agreement`):

* ``edge_neuron_overlap``: of the profile's top-k neuron targets (by |avg_weight|), the fraction
  among the exact top-k mediator neurons (by |mean contribution| over prompts), over
  ``min(k, either list's length)``;
* ``edge_sign_agreement``: over the neuron targets that are exact mediators, the fraction whose
  ``avg_weight`` has the sign of the mean contribution;
* ``edge_logit_overlap``: of the top-k logit targets, the fraction among the k tokens most often
  in the direct effect's top-k over prompts, over ``min(k, either list's length)``.

A profile without the field gets no comparison (NaN), which is not an error.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .inputs import InputError, load_profile_document, profile_list

EDGE_FIELD = "top_downstream_targets"
EDGE_COLUMNS = ("edge_n_neuron_targets", "edge_n_logit_targets", "edge_neuron_overlap",
                "edge_sign_agreement", "edge_logit_overlap")
_TARGET = re.compile(r"^(?:(\d+)|([LE]))_(\d+)_(-?\d+)$")


@dataclass(frozen=True)
class Edge:
    """One downstream target: ``kind`` ``neuron`` (``layer``, ``index`` = neuron), ``logit`` or
    ``embedding`` (``index`` = token id, ``layer`` None), with its ``avg_weight`` (or NaN)."""

    kind: str
    layer: int | None
    index: int
    avg_weight: float


def parse_edge(entry: Any, where: str) -> Edge:
    """One entry of ``top_downstream_targets``; a clear :class:`InputError` if malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("target"), str):
        raise InputError(f"{where}: must be an object with a string 'target', got {entry!r}")
    match = _TARGET.match(entry["target"].strip())
    if match is None:
        raise InputError(f"{where}: target {entry['target']!r} is not '<layer>_<neuron>_<pos>', "
                         "'L_<token id>_<pos>' or 'E_<token id>_<pos>'")
    weight = entry.get("avg_weight", math.nan)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise InputError(f"{where}: avg_weight must be a number, got {weight!r}")
    layer, letter, index = match.group(1), match.group(2), int(match.group(3))
    if layer is not None:
        return Edge("neuron", int(layer), index, float(weight))
    return Edge("logit" if letter == "L" else "embedding", None, index, float(weight))


def read_edges(path: str | Path) -> dict[str, list[Edge]]:
    """The parsed edges of every profile that has them, by neuron id."""
    edges: dict[str, list[Edge]] = {}
    for number, record in enumerate(profile_list(load_profile_document(path), path)):
        if not isinstance(record, dict) or EDGE_FIELD not in record:
            continue
        neuron_id = record.get("neuron_id", f"L{record.get('layer')}/N{record.get('neuron')}")
        where = f"{path}: profile #{number} (neuron_id {neuron_id!r}): {EDGE_FIELD}"
        entries = record[EDGE_FIELD]
        if not isinstance(entries, list):
            raise InputError(f"{where}: must be a list, got {type(entries).__name__}")
        edges[neuron_id] = [parse_edge(entry, f"{where}[{i}]") for i, entry in enumerate(entries)]
    return edges


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
