"""The shard plan, computed when the workflow is parsed (no torch, no model).

Prompts are cut into consecutive chunks of ``prompts_per_chunk`` (appending prompts only touches
the last chunk); layers into blocks of ``layers_per_shard``. A shard is (layer block x prompt
chunk) for every block holding at least one listed neuron. Each shard's parameters hold only its
own neurons and prompt ids, so Snakemake's params trigger reruns exactly the shards whose neurons
or prompts changed.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def fingerprint(self) -> str:
        """Changes exactly when a prompt of this chunk (text, id, target, distractor) changes."""
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

    @property
    def neuron_table(self) -> list[list[Any]]:
        """``[neuron_id, layer, neuron]`` rows: what the shard's params hold."""
        return [[n.neuron_id, n.layer, n.neuron] for n in self.neurons]


@dataclass(frozen=True)
class ShardPlan:
    chunks: tuple[PromptChunk, ...]
    shards: tuple[Shard, ...]

    def chunk(self, name: str) -> PromptChunk:
        return next(item for item in self.chunks if item.name == name)

    def shard(self, name: str) -> Shard:
        return next(item for item in self.shards if item.name == name)


def block_name(layer: int, layers_per_shard: int) -> str:
    """The name of the layer block holding ``layer``: ``L<first>-<last>`` (two digits or more)."""
    first = (layer // layers_per_shard) * layers_per_shard
    return f"L{first:02d}-{first + layers_per_shard - 1:02d}"


def make_plan(
    neurons: Sequence[Neuron], prompts: Sequence[PromptRecord], layers_per_shard: int,
    prompts_per_chunk: int,
) -> ShardPlan:
    """All prompt chunks and all non-empty shards, in a stable order."""
    if layers_per_shard < 1:
        raise InputError(f"layers_per_shard must be >= 1, got {layers_per_shard}")
    chunks = tuple(PromptChunk(f"c{index:03d}", tuple(records))
                   for index, records in enumerate(chunk(list(prompts), prompts_per_chunk)))
    blocks: dict[str, list[Neuron]] = {}
    for neuron in sorted(neurons, key=lambda item: (item.layer, item.neuron)):
        blocks.setdefault(block_name(neuron.layer, layers_per_shard), []).append(neuron)
    shards = tuple(Shard(block, prompt_chunk, tuple(members))
                   for block, members in blocks.items() for prompt_chunk in chunks)
    return ShardPlan(chunks, shards)
