"""The profiles' own downstream edges (``top_downstream_targets``): their format, read and checked
when the workflow is parsed (no torch, no pandas here; measured and compared in
:mod:`neuron_effects.edges`).

A profile may list, in the format of the user's attribution-graph edge statistics, objects whose
``target`` is ``"<layer>_<neuron>_<position>"`` (a neuron), ``"L_<token id>_<position>"`` (a
logit) or ``"E_<token id>_<position>"`` (an embedding), with ``avg_weight`` and other fields.
Positions are ignored. A malformed entry stops the parse, naming the profile and the entry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .inputs import InputError, load_profile_document, profile_list, profile_neuron_id

EDGE_FIELD = "top_downstream_targets"
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
        neuron_id = profile_neuron_id(record)
        where = f"{path}: profile #{number} (neuron_id {neuron_id!r}): {EDGE_FIELD}"
        entries = record[EDGE_FIELD]
        if not isinstance(entries, list):
            raise InputError(f"{where}: must be a list, got {type(entries).__name__}")
        edges[neuron_id] = [parse_edge(entry, f"{where}[{i}]") for i, entry in enumerate(entries)]
    return edges


def neuron_target_weights(edges: list[Edge]) -> dict[tuple[int, int], float]:
    """The neuron targets ``(layer, neuron)`` of a profile's edges with their ``avg_weight``
    (positions ignored: of a target listed at several positions, the largest |avg_weight|)."""
    weights: dict[tuple[int, int], float] = {}
    for edge in edges:
        key = (edge.layer, edge.index)
        if edge.kind == "neuron" and (key not in weights or abs(edge.avg_weight)
                                      > abs(weights[key])):
            weights[key] = edge.avg_weight
    return weights
