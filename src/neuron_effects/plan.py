"""The shard plan, computed when the workflow is parsed (no torch, no model), and its cost.

Prompts are cut into consecutive chunks of ``prompts_per_chunk`` or, under ``sharding: auto``, at
the chunk starts of the saved layout; layers into blocks, of ``layers_per_shard`` layers or sized
from the cost model (:mod:`neuron_effects.layout`, which also keeps an automatic layout across
runs). A shard is (layer block x prompt chunk) for every block holding at least one listed
neuron. Each shard's parameters hold only its own neurons and prompt ids, so Snakemake's params
trigger reruns exactly the shards whose neurons or prompts changed. The plan's cost, each model
rule's jobs and estimated seconds: :mod:`neuron_effects.plan_cost`.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

from .inputs import InputError, Neuron, PromptRecord, chunk, digest, prompt_fields


@dataclass(frozen=True)
class PromptChunk:
    """Consecutive prompts; ``name`` is the Snakemake wildcard value (``c000``, ``c001``...)."""

    name: str
    records: tuple[PromptRecord, ...]

    @property
    def prompt_ids(self) -> list[str]:
        return [record.prompt_id for record in self.records]

    @cached_property
    def fingerprint(self) -> str:
        """Changes exactly when a prompt of this chunk (text, id, target, distractor) changes
        (computed once: every shard of the chunk asks)."""
        return digest(prompt_fields(self.records))


@dataclass(frozen=True)
class Shard:
    """A layer block x a prompt chunk; ``name`` is ``<block>_<chunk>``, e.g. ``L00-09_c000``."""

    block: str
    chunk: PromptChunk
    neurons: tuple[Neuron, ...]

    @property
    def name(self) -> str:
        return f"{self.block}_{self.chunk.name}"

    @cached_property
    def neuron_table(self) -> list[list[Any]]:
        """``[neuron_id, layer, neuron]`` rows: what the shard's params hold (built once: a
        census shard holds up to every neuron of its layers, and each job asks several times)."""
        return [[n.neuron_id, n.layer, n.neuron] for n in self.neurons]


@dataclass(frozen=True)
class ShardPlan:
    """The prompt chunks and the non-empty shards, each found by name in constant time (every
    job's input functions look its chunk or shard up: a scan would make the parse quadratic)."""

    chunks: tuple[PromptChunk, ...]
    shards: tuple[Shard, ...]
    _chunks: dict[str, PromptChunk] = field(init=False, repr=False, compare=False)
    _shards: dict[str, Shard] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_chunks", {item.name: item for item in self.chunks})
        object.__setattr__(self, "_shards", {item.name: item for item in self.shards})

    def chunk(self, name: str) -> PromptChunk:
        """The chunk named ``name`` (``c000``...)."""
        return self._chunks[name]

    def shard(self, name: str) -> Shard:
        """The shard named ``name`` (``<block>_<chunk>``)."""
        return self._shards[name]


def block_name(layer: int, layers_per_shard: int) -> str:
    """The name of the layer block holding ``layer``: ``L<first>-<last>`` (two digits or more)."""
    first = (layer // layers_per_shard) * layers_per_shard
    return f"L{first:02d}-{first + layers_per_shard - 1:02d}"


def make_plan(
    neurons: Sequence[Neuron], prompts: Sequence[PromptRecord],
    layer_blocks: int | Sequence[tuple[int, int]], prompt_chunks: int | Sequence[int],
) -> ShardPlan:
    """All prompt chunks and all non-empty shards, in a stable order. ``layer_blocks``: blocks of
    that many layers, or the ``(first, last)`` layer ranges of the blocks (consecutive, covering
    every neuron's layer; :func:`.layout.auto_layout` chooses them). ``prompt_chunks``: chunks of
    that many prompts, or the index of each chunk's first prompt (ascending from 0; the last chunk
    runs to the last prompt; :func:`.layout.resolve_layout` chooses them)."""
    records = list(prompts)
    if isinstance(prompt_chunks, int):
        slices = chunk(records, prompt_chunks)
    else:
        starts = [start for start in prompt_chunks if start < len(records)] or [0]
        slices = [records[a:b] for a, b in zip(starts, [*starts[1:], len(records)])]
    chunks = tuple(PromptChunk(f"c{index:03d}", tuple(members))
                   for index, members in enumerate(slices) if members)
    if isinstance(layer_blocks, int):
        if layer_blocks < 1:
            raise InputError(f"layers_per_shard must be >= 1, got {layer_blocks}")
        size = layer_blocks
        name_of = lambda layer: block_name(layer, size)  # noqa: E731
    else:
        firsts = [first for first, _ in layer_blocks]
        names = [f"L{first:02d}-{last:02d}" for first, last in layer_blocks]
        name_of = lambda layer: names[bisect_right(firsts, layer) - 1]  # noqa: E731
    block_of = {layer: name_of(layer) for layer in {neuron.layer for neuron in neurons}}
    blocks: dict[str, list[Neuron]] = {}
    for neuron in sorted(neurons, key=lambda item: (item.layer, item.neuron)):
        blocks.setdefault(block_of[neuron.layer], []).append(neuron)
    shards = tuple(Shard(block, prompt_chunk, tuple(members))
                   for block, members in blocks.items() for prompt_chunk in chunks)
    return ShardPlan(chunks, shards)
