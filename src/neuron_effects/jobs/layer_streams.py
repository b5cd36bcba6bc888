"""The aggregation's streams: the shards' per-prompt rows one layer at a time (only the row
groups whose statistics allow that layer are read), and the top-k mediator table summarised one
source layer at a time.

Reads: the shards' per-prompt tables and a concatenated top-k mediator table. Writes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from .. import mediation
from .setup import PROGRESS

# Rows of partial mediator sums held before they are added up (the aggregation's memory for the
# top-k table stays about three times the size of its per-neuron sums).
MEDIATOR_ROWS_HELD = 1_000_000


def row_groups(path: str) -> Any:
    source = pq.ParquetFile(path)
    for group in range(source.num_row_groups):
        yield source.read_row_group(group).to_pandas()


def shard_layers(shard_paths: Sequence[str]) -> list[int]:
    """The layers that may have rows in the shards: every layer between the smallest and the
    largest of each row group, from its statistics of the ``layer`` column (the column is read
    only for a file written without statistics)."""
    layers: set[int] = set()
    for path in shard_paths:
        metadata = pq.ParquetFile(path).metadata
        column = metadata.schema.to_arrow_schema().get_field_index("layer")
        groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
        groups = [group.column(column).statistics for group in groups if group.num_rows]
        if all(statistics is not None and statistics.has_min_max for statistics in groups):
            layers.update(layer for statistics in groups
                          for layer in range(int(statistics.min), int(statistics.max) + 1))
        else:
            layers.update(pc.unique(pq.read_table(path, columns=["layer"])["layer"]).to_pylist())
    return sorted(layers)


def layer_rows(shard_paths: Sequence[str], layer: int, prompt_order: Mapping[str, int]
               ) -> pd.DataFrame:
    """Every per-prompt row of ``layer`` in the shards (only the row groups whose statistics
    allow that layer are read), ordered by neuron index then prompt (``prompt_order``)."""
    parts = [pq.read_table(path, filters=[("layer", "==", layer)]).to_pandas()
             for path in shard_paths]
    frame = pd.concat([part for part in parts if len(part)] or parts[:1], ignore_index=True)
    order = frame["prompt_id"].map(prompt_order)
    return frame.assign(_order=order).sort_values(["neuron", "_order"], ignore_index=True
                                                  ).drop(columns="_order")


def _source_layers_by_row_group(source: pq.ParquetFile, source_layers: Mapping[str, int]
                                ) -> list[set[int]]:
    """The source layers of the neurons in each row group of a top-k mediator table
    (``source_layers``: each neuron id's layer), read from the ``neuron_id`` column only."""
    layers = []
    for group in range(source.num_row_groups):
        ids = pc.unique(source.read_row_group(group, columns=["neuron_id"])["neuron_id"])
        if isinstance(ids, pa.DictionaryArray):
            ids = ids.dictionary.take(pc.unique(ids.indices))
        layers.append({source_layers[neuron_id] for neuron_id in ids.to_pylist()})
    return layers


def layer_mediator_summaries(mediators_path: str, neurons: pd.DataFrame, top_k: int) -> Any:
    """:func:`mediation.mediator_summary` of each source layer, as ``(layer, summary)`` pairs in
    ascending layer order: a layer is summarised from the row groups of the top-k table that
    hold its neurons, then let go, so the running sums (added up whenever a layer's pieces
    outgrow twice its running total) hold one layer's (neuron, mediator) pairs, plus the next
    layer's from row groups that span both (a unit of neurons across a layer boundary). Each
    row group is read once, when its smallest layer is summarised, whatever the order of the
    row groups in the file (the shards' prompt chunks put a layer's last row group near the end
    of the file: summarising a layer after its last row group held every layer of a layer block
    at once, BENCHMARKS.md section 14). ``neurons``: ``neuron_id``, ``layer``, ``n_prompts``."""
    by_id = neurons.set_index("neuron_id")
    source_layers = by_id["layer"].to_dict()
    source = pq.ParquetFile(mediators_path)
    groups = _source_layers_by_row_group(source, source_layers)
    read_with: dict[int, list[int]] = {}  # layer -> the row groups whose smallest layer it is
    for group, layers in enumerate(groups):
        if layers:
            read_with.setdefault(min(layers), []).append(group)
    sums: dict[int, list[pd.DataFrame]] = {}

    def add(layer: int, part: pd.DataFrame) -> None:
        pieces = sums.setdefault(layer, [])
        pieces.append(part)
        if sum(map(len, pieces)) > max(2 * len(pieces[0]), MEDIATOR_ROWS_HELD):
            sums[layer] = [mediation.combined_mediator_sums(pieces)]

    bar = tqdm(total=sum(map(bool, groups)), desc="mediator row groups", unit="group", **PROGRESS)
    for layer in sorted(set().union(*groups)):
        for group in read_with.get(layer, []):
            layers = groups[group]
            part = mediation.mediator_sums(source.read_row_group(group).to_pandas())
            if len(layers) == 1:
                add(layer, part)
            else:
                part_layers = part["neuron_id"].map(source_layers).to_numpy()
                for each in sorted(layers):
                    add(each, part[part_layers == each])
            bar.update(1)
        yield layer, mediation.mediator_summary(sums.pop(layer), by_id["n_prompts"], keep=top_k)
    bar.close()
