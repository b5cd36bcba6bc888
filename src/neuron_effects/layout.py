"""The shard layout under ``sharding: auto``: the layer blocks balanced by the cost model and the
prompts per chunk (:func:`auto_layout`), saved, and kept across runs. Appending prompts only
touches the last chunk (and adds chunks after it): :func:`resolve_layout` keeps the previous
automatic layout, extended (:func:`extend_chunks`), as long as the cost model still accepts it
for the grown inputs, and only then chooses afresh; an added neuron likewise keeps the layer
blocks.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from .cost import DeviceRates, ModelShape
from .inputs import InputError, Neuron, PromptRecord, digest
from .plan_cost import Workload, estimate_from_shards, row_seconds
from .store import write_json


def balanced_blocks(costs: Sequence[float], n_blocks: int) -> list[int]:
    """Split the sequence ``costs`` into ``n_blocks`` consecutive non-empty groups with the
    smallest largest group sum; returns the index where each group starts (exact, by dynamic
    programming over the split points)."""
    n = len(costs)
    n_blocks = max(1, min(n_blocks, n))
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[k][i]: the smallest largest sum splitting costs[:i] into k groups; cut: its last start
    best = [[float("inf")] * (n + 1) for _ in range(n_blocks + 1)]
    cut = [[0] * (n + 1) for _ in range(n_blocks + 1)]
    best[0][0] = 0.0
    for k in range(1, n_blocks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(n_blocks, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def _layer_blocks(layers: Sequence[int], costs: Sequence[float], n_blocks: int,
                  n_layers: int) -> list[tuple[int, int]]:
    """``n_blocks`` blocks of consecutive layers balanced by ``costs`` (per layer of
    ``layers``), widened to cover every layer from 0 to ``n_layers - 1``."""
    starts = balanced_blocks(costs, n_blocks)
    firsts = [0, *(layers[start] for start in starts[1:])]
    return list(zip(firsts, [first - 1 for first in firsts[1:]] + [n_layers - 1]))


class LayoutCosts:
    """The estimated compute of any shard of a job: per layer with neurons, their count and the
    running sum over prompts of one row's seconds, so that a shard (a range of layers x a range of
    prompts) costs a few additions whatever the number of neurons (:func:`auto_layout` tries about a
    hundred layouts, of up to every neuron of a model in a census). Equal to
    :func:`.plan_cost.shard_seconds` of the shard's neurons and prompts (up to float rounding)."""

    def __init__(self, neurons: Sequence[Neuron], prompts: Sequence[PromptRecord],
                 tokens: Mapping[str, int], shape: ModelShape, rates: DeviceRates,
                 work: Workload) -> None:
        self.shape, self.rates, self.work = shape, rates, work
        self.counts = Counter(neuron.layer for neuron in neurons)
        self.layers = sorted(self.counts)
        self.n_prompts = len(prompts)
        self.n_neurons = len(neurons)
        all_tokens = [tokens[record.prompt_id] for record in prompts]
        row: dict[tuple[int, int], float] = {}
        self.prefix: dict[int, list[float]] = {}
        for layer in self.layers:
            running = [0.0]
            for n_tokens in all_tokens:
                if (layer, n_tokens) not in row:
                    row[layer, n_tokens] = row_seconds(shape, rates, work, layer, n_tokens)
                running.append(running[-1] + row[layer, n_tokens])
            self.prefix[layer] = running

    def seconds(self, first_layer: int, last_layer: int, start: int, stop: int) -> float:
        """The compute of the neurons of layers ``first_layer..last_layer`` on the prompts
        ``start..stop - 1`` (:func:`.plan_cost.shard_seconds`); 0 without neurons or prompts."""
        layers = [layer for layer in self.layers if first_layer <= layer <= last_layer]
        n_neurons = sum(self.counts[layer] for layer in layers)
        if not n_neurons or stop <= start:
            return 0.0
        rows = sum(self.counts[layer] * (self.prefix[layer][stop] - self.prefix[layer][start])
                   for layer in layers)
        units = -(-n_neurons // self.work.neurons_per_block) * (stop - start)
        directions = (n_neurons * self.shape.unembed_flops() / self.rates.flops_per_s
                      if self.work.full_vocab else 0.0)
        return rows + units * self.rates.unit_host_s + directions

    def shards(self, blocks: Sequence[tuple[int, int]], starts: Sequence[int]) -> list[float]:
        """The compute of each non-empty shard of ``blocks`` x the chunks starting at
        ``starts`` (as :func:`.plan.make_plan` cuts them)."""
        starts = [start for start in starts if start < self.n_prompts] or [0]
        ranges = list(zip(starts, [*starts[1:], self.n_prompts]))
        return [self.seconds(first, last, a, b) for first, last in blocks
                if any(first <= layer <= last for layer in self.layers) for a, b in ranges
                if b > a]

    def fits(self, blocks: Sequence[tuple[int, int]], starts: Sequence[int],
             tokens: Mapping[str, int], min_compute_ratio: float, max_parallel_jobs: int,
             max_fixed_share: float) -> bool:
        """Whether the layout meets :func:`auto_layout`'s bounds: at most ``max_parallel_jobs``
        shards, each worth ``min_compute_ratio`` fixed costs, a fixed share of all model jobs
        of at most ``max_fixed_share``."""
        shards = self.shards(blocks, starts)
        fixed = self.rates.fixed_s(self.shape.weight_bytes)
        if not shards or len(shards) > max_parallel_jobs or \
                min(shards) < min_compute_ratio * fixed:
            return False
        n_chunks = len([start for start in starts if start < self.n_prompts] or [0])
        cost = estimate_from_shards(shards, n_chunks, self.n_neurons * self.n_prompts, tokens,
                                    self.shape, self.rates, self.work)
        return cost.fixed_share <= max_fixed_share

    def longest_job(self, blocks: Sequence[tuple[int, int]], starts: Sequence[int]) -> float:
        """The estimated seconds of the layout's longest shard job, fixed cost included."""
        return max(self.shards(blocks, starts), default=0.0) + \
            self.rates.fixed_s(self.shape.weight_bytes)


def auto_layout(
    neurons: Sequence[Neuron], prompts: Sequence[PromptRecord], tokens: Mapping[str, int],
    shape: ModelShape, rates: DeviceRates, work: Workload, min_compute_ratio: float,
    max_parallel_jobs: int, max_fixed_share: float, costs: LayoutCosts | None = None,
) -> tuple[list[tuple[int, int]], int]:
    """``sharding: auto``: the layer blocks and the prompts per chunk.

    The most shards (layer blocks x prompt chunks), up to ``max_parallel_jobs``, such that every
    shard's estimated compute is at least ``min_compute_ratio`` times the fixed cost of a job and
    the fixed cost of all model jobs (clean runs, shards, attribution, validation) is at most
    ``max_fixed_share`` of their estimated time; one shard if none qualifies. Layer blocks are
    balanced by cost (early layers replay more layers per row); at equal shard counts fewer
    prompt chunks win (each chunk is one more clean-run and attribution job). ``costs``: the
    job's :class:`LayoutCosts`, if already built."""
    costs = costs or LayoutCosts(neurons, prompts, tokens, shape, rates, work)
    fixed = rates.fixed_s(shape.weight_bytes)
    layers = costs.layers
    if not layers:
        return [(0, shape.n_layers - 1)], max(1, len(prompts))
    per_layer = [costs.seconds(layer, layer, 0, len(prompts)) for layer in layers]
    ceiling = max(1, min(max_parallel_jobs, int(sum(per_layer) // (min_compute_ratio * fixed))))
    candidates = sorted(((b, c) for b in range(1, min(len(layers), ceiling) + 1)
                         for c in range(1, min(len(prompts), ceiling // b) + 1)),
                        key=lambda bc: (-bc[0] * bc[1], bc[1]))
    balanced: dict[int, list[tuple[int, int]]] = {}
    for n_blocks, n_chunks in candidates:
        if n_blocks not in balanced:
            balanced[n_blocks] = _layer_blocks(layers, per_layer, n_blocks, shape.n_layers)
        per_chunk = -(-len(prompts) // n_chunks)
        if costs.fits(balanced[n_blocks], range(0, len(prompts), per_chunk), tokens,
                      min_compute_ratio, max_parallel_jobs, max_fixed_share):
            return balanced[n_blocks], per_chunk
    return _layer_blocks(layers, per_layer, 1, shape.n_layers), len(prompts)


# The environment variable that tells a cluster job's parse which saved layout its run chose.
LAYOUT_ENV = "NEURON_EFFECTS_LAYOUT"
# An automatic layout is kept while its longest shard job is at most this many times the
# longest of the layout the cost model would choose afresh (and it meets auto_layout's bounds):
# keeping it reruns only the shards whose neurons or prompts changed, choosing afresh moves
# boundaries and reruns most shards, while a layout grown lopsided (or a job limit raised) makes
# every later run wait on its longest shard.
KEEP_TOLERANCE = 1.5


class Layout(NamedTuple):
    """The arguments of :func:`.plan.make_plan`, and the name of the saved automatic layout they
    come from (``None`` for explicit sizes)."""

    layer_blocks: int | tuple[tuple[int, int], ...]
    prompt_chunks: int | tuple[int, ...]
    layout_id: str | None = None


def extend_chunks(starts: Sequence[int], per_chunk: int, n_prompts: int) -> list[int]:
    """The chunk starts of a kept layout for ``n_prompts`` prompts: the saved starts (those
    still below ``n_prompts``), and a new chunk of ``per_chunk`` prompts after the last only
    once as many prompts follow it: appended prompts fill the last chunk (up to
    ``2 * per_chunk - 1`` prompts) and go to new chunks, earlier chunks never change."""
    kept = [start for start in starts if start < n_prompts] or [0]
    while n_prompts - (kept[-1] + per_chunk) >= per_chunk:
        kept.append(kept[-1] + per_chunk)
    return kept


def _fixed_blocks(layers_per_shard: int, n_layers: int) -> list[tuple[int, int]]:
    """The blocks of ``layers_per_shard`` layers as ``(first, last)`` ranges."""
    return [(first, min(first + layers_per_shard, n_layers) - 1)
            for first in range(0, n_layers, layers_per_shard)]


def _valid_blocks(blocks: Any, n_layers: int) -> bool:
    """Whether ``blocks`` are consecutive ``(first, last)`` ranges covering every layer."""
    try:
        firsts, lasts = [int(b[0]) for b in blocks], [int(b[1]) for b in blocks]
    except (TypeError, ValueError, IndexError):
        return False
    return bool(blocks) and firsts[0] == 0 and lasts[-1] == n_layers - 1 and all(
        first <= last for first, last in zip(firsts, lasts)) and all(
        last + 1 == first for last, first in zip(lasts, firsts[1:]))


def resolve_layout(
    sharding: Mapping[str, Any], neurons: Sequence[Neuron], prompts: Sequence[PromptRecord],
    tokens: Mapping[str, int], shape: ModelShape, rates: DeviceRates, work: Workload,
    parallel_jobs: int, saved: str | Path, reuse_only: bool = False,
    layout_id: str | None = None, inputs: Sequence[str] = (),
) -> Layout:
    """The :class:`Layout` of :func:`.plan.make_plan` from the config's ``sharding``: its explicit
    sizes, or :func:`auto_layout` for those set to ``auto`` (``max_parallel_jobs: auto`` =
    ``parallel_jobs``, the run's job limit).

    An automatic layout is saved under ``saved`` in a file named by the digest of its content
    (``layout_id``), which is never rewritten with other content: ``reuse_only`` (the parse inside a
    cluster job, which does not know the job limit) reads the one named ``layout_id``, the layout of
    the run that submitted the job, whatever other runs chose since. A top-level parse keeps the
    previous automatic layout of the same ``inputs`` (file names), model and sharding settings as
    long as it meets :func:`auto_layout`'s bounds for the current inputs and job limit and its
    longest shard is within :data:`KEEP_TOLERANCE` of the fresh choice's: added neurons then join
    their layer's block, appended prompts fill the last chunk and go to new ones
    (:func:`extend_chunks`); otherwise it chooses afresh."""
    layers, per_chunk = sharding["layers_per_shard"], sharding["prompts_per_chunk"]
    if layers != "auto" and per_chunk != "auto":
        return Layout(layers, per_chunk)
    folder = Path(saved)
    if reuse_only:
        path = folder / f"{layout_id}.json"
        if layout_id is None or not path.exists():
            raise InputError(
                f"the shard layout chosen by the run that submitted this job is missing "
                f"({path if layout_id else f'${LAYOUT_ENV} is not set'}): run jobs from the "
                f"submitting working directory, started by that run")
        content = json.loads(path.read_text())
        return _layout_of(content, layout_id)
    jobs = (parallel_jobs if sharding["max_parallel_jobs"] == "auto"
            else sharding["max_parallel_jobs"])
    bounds = (sharding["min_compute_ratio"], jobs, sharding["max_fixed_share"])
    costs = LayoutCosts(neurons, prompts, tokens, shape, rates, work)
    blocks, chosen = auto_layout(neurons, prompts, tokens, shape, rates, work, bounds[0],
                                 bounds[1], bounds[2], costs=costs)
    n_prompts = len(prompts)
    fresh = {"layer_blocks": [list(block) for block in blocks] if layers == "auto" else layers,
             "prompt_chunks": (list(range(0, n_prompts, chosen)) or [0]) if per_chunk == "auto"
             else per_chunk,
             "prompts_per_chunk": chosen if per_chunk == "auto" else None}
    content = fresh
    settings = digest([list(inputs), asdict(shape), sharding_key(sharding)])
    previous = folder / f"previous-{settings}.json"
    try:
        last = json.loads(previous.read_text())
    except (OSError, ValueError):  # none yet (or unreadable): choose afresh
        last = None
    kept = _kept(last, fresh, shape.n_layers, n_prompts) if isinstance(last, dict) else None
    if kept is not None and _worth_keeping(kept, fresh, costs, tokens, shape.n_layers, bounds):
        content = kept
    key = digest(content)
    if not (folder / f"{key}.json").exists():
        write_json(folder / f"{key}.json", content)
    write_json(previous, content)
    return _layout_of(content, key)


def sharding_key(sharding: Mapping[str, Any]) -> dict[str, Any]:
    """The sharding settings an automatic layout is chosen under, but the job limit."""
    return {key: value for key, value in sharding.items() if key != "max_parallel_jobs"}


def _layout_of(content: Mapping[str, Any], layout_id: str) -> Layout:
    blocks, chunks = content["layer_blocks"], content["prompt_chunks"]
    return Layout(blocks if isinstance(blocks, int) else tuple(tuple(b) for b in blocks),
                  chunks if isinstance(chunks, int) else tuple(chunks), layout_id)


def _kept(previous: Mapping[str, Any], fresh: Mapping[str, Any], n_layers: int,
          n_prompts: int) -> dict[str, Any] | None:
    """The previous layout for the current inputs (its automatic parts; the explicit ones as
    configured now), or ``None`` if it does not apply (another model's layers, sizes once
    explicit now automatic)."""
    kept = dict(fresh)
    if not isinstance(fresh["layer_blocks"], int):
        if not _valid_blocks(previous.get("layer_blocks"), n_layers):
            return None
        kept["layer_blocks"] = [list(block) for block in previous["layer_blocks"]]
    if fresh["prompts_per_chunk"] is not None:
        starts, size = previous.get("prompt_chunks"), previous.get("prompts_per_chunk")
        if not isinstance(size, int) or size < 1 or not isinstance(starts, list) or \
                not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            return None
        kept["prompt_chunks"] = extend_chunks(starts, size, n_prompts)
        kept["prompts_per_chunk"] = size
    return kept


def _worth_keeping(kept: Mapping[str, Any], fresh: Mapping[str, Any], costs: LayoutCosts,
                   tokens: Mapping[str, int], n_layers: int,
                   bounds: tuple[float, int, float]) -> bool:
    """Whether the kept layout meets the bounds and its longest shard job is within
    :data:`KEEP_TOLERANCE` of the fresh layout's."""
    def ranges(layout: Mapping[str, Any]) -> tuple[list[tuple[int, int]], list[int]]:
        blocks, chunks = layout["layer_blocks"], layout["prompt_chunks"]
        return (_fixed_blocks(blocks, n_layers) if isinstance(blocks, int)
                else [tuple(block) for block in blocks],
                (list(range(0, costs.n_prompts, chunks)) or [0]) if isinstance(chunks, int)
                else chunks)

    if kept == fresh:
        return True
    return costs.fits(*ranges(kept), tokens, *bounds) and \
        costs.longest_job(*ranges(kept)) <= KEEP_TOLERANCE * costs.longest_job(*ranges(fresh))
