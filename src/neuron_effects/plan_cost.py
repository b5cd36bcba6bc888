"""The plan's cost from the cost model (:mod:`neuron_effects.cost`): each model rule's jobs and
estimated compute and fixed seconds, each shard's compute, and the aggregation's time per layer
block, computed when the workflow is parsed (no torch, no model).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .cost import (BACKWARD_FACTOR, DeviceRates, ModelShape, aggregation_seconds,
                   mediation_table_rows)
from .inputs import Neuron
from .plan import Shard, ShardPlan


@dataclass(frozen=True)
class Workload:
    """What the model jobs will compute: the settings that change their cost."""

    full_vocab: bool = True
    mediators: bool = True
    positions: str = "last"
    backward_passes: int = 2  # attribution patching: one per estimate method (0: off)
    validation_pairs: int = 32
    neurons_per_block: int = 2048
    mediator_top_k: int = 10
    verify_candidates: int = 0  # neurons outside the profile computed exactly after attribution


@dataclass(frozen=True)
class RuleEstimate:
    """One rule's model jobs: how many, and their estimated compute and fixed seconds in all."""

    rule: str
    jobs: int
    compute_s: float
    fixed_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.fixed_s


@dataclass(frozen=True)
class PlanEstimate:
    """The estimate of every model job of a plan on one device, and of the aggregation's CPU
    jobs, one per layer block (``aggregate_s`` in all, the longest ``aggregate_longest_s``:
    :func:`block_aggregate_seconds`)."""

    device: str
    rules: tuple[RuleEstimate, ...]
    aggregate_s: float = 0.0
    aggregate_jobs: int = 1
    aggregate_longest_s: float = 0.0
    candidate_rows: int = 0

    @property
    def jobs(self) -> int:
        return sum(rule.jobs for rule in self.rules)

    @property
    def total_s(self) -> float:
        return sum(rule.total_s for rule in self.rules)

    @property
    def fixed_share(self) -> float:
        return sum(rule.fixed_s for rule in self.rules) / max(self.total_s, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: the report's params."""
        return {"device": self.device, "fixed_share": self.fixed_share,
                "aggregate_s": self.aggregate_s, "aggregate_jobs": self.aggregate_jobs,
                "rules": [{"rule": r.rule, "jobs": r.jobs, "compute_s": r.compute_s,
                           "fixed_s": r.fixed_s} for r in self.rules]}

    def table(self) -> str:
        """The plan as a short text table (printed when the workflow is parsed)."""
        unit = "CPU" if self.device == "cpu" else "GPU"
        lines = [f"{'rule':<27}{'jobs':>5}{'compute':>11}{'fixed':>11}{'total':>11}"]
        for rule in self.rules:
            lines.append(f"{rule.rule:<27}{rule.jobs:>5}{_duration(rule.compute_s):>11}"
                         f"{_duration(rule.fixed_s):>11}{_duration(rule.total_s):>11}")
        lines.append(f"{'model jobs':<27}{self.jobs:>5}{'':>22}{_duration(self.total_s):>11}")
        lines.append(f"estimated {unit}-minutes on {self.device}: {self.total_s / 60:.1f}, of "
                     f"which fixed cost (start-up and model loading) {100 * self.fixed_share:.0f} %")
        lines.append(f"then aggregate_block, {self.aggregate_jobs} CPU job(s) of one core (in "
                     f"parallel on a cluster): {_duration(self.aggregate_s)} in all, the longest "
                     f"{_duration(self.aggregate_longest_s)}; then aggregate_effects joins them")
        if self.candidate_rows:
            lines.append(f"of which the verified candidates (atp.verify_candidates): "
                         f"{self.candidate_rows:,} rows in compute_candidate_effects and one "
                         "aggregate_candidates job (their layers are known only after "
                         "attribution: planned as spread evenly over the layers)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def row_seconds(shape: ModelShape, rates: DeviceRates, work: Workload, layer: int,
                 n_tokens: int) -> float:
    """One treated row: its FLOPs at the device's rate plus its share of the host work."""
    flops = shape.row_flops(layer, n_tokens, work.full_vocab, work.mediators, work.positions)
    return flops / rates.flops_per_s + rates.row_host_s


def shard_seconds(shape: ModelShape, rates: DeviceRates, work: Workload,
                  neurons: Sequence[Neuron], tokens: Sequence[int]) -> float:
    """The estimated compute of a shard: its rows, its units' host work (a unit is a block of
    ``neurons_per_block`` neurons x one prompt) and the neurons' unembedded directions (one
    ``[hidden] x [hidden, vocab]`` product per neuron and block)."""
    if not neurons:
        return 0.0
    per_layer = Counter(neuron.layer for neuron in neurons)
    rows = sum(count * row_seconds(shape, rates, work, layer, n_tokens)
               for layer, count in per_layer.items() for n_tokens in tokens)
    units = -(-len(neurons) // work.neurons_per_block) * len(tokens)
    directions = len(neurons) * shape.unembed_flops() / rates.flops_per_s if work.full_vocab else 0
    return rows + units * rates.unit_host_s + directions


def block_aggregate_seconds(plan: ShardPlan, n_layers: int, work: Workload) -> dict[str, float]:
    """The estimated time of each layer block's ``aggregate_block`` job (one CPU core), by block
    name in layer order (:func:`aggregate_seconds` of the block's shards)."""
    blocks: dict[str, list[Shard]] = {}
    for shard in plan.shards:
        blocks.setdefault(shard.block, []).append(shard)
    return {block: aggregate_seconds(ShardPlan(plan.chunks, tuple(shards)), n_layers, work)
            for block, shards in blocks.items()}


def aggregate_seconds(plan: ShardPlan, n_layers: int, work: Workload) -> float:
    """The estimated aggregation time (one CPU core) of the plan's rows
    (:func:`neuron_effects.cost.aggregation_seconds`)."""
    rows = table_rows = 0
    for shard in plan.shards:
        prompts = len(shard.chunk.records)
        rows += len(shard.neurons) * prompts
        if work.mediators:
            per_layer = Counter(neuron.layer for neuron in shard.neurons)
            table_rows += prompts * sum(count * mediation_table_rows(n_layers, layer,
                                                                     work.mediator_top_k)
                                        for layer, count in per_layer.items())
    return aggregation_seconds(rows, table_rows)


def aggregate_runtime_minutes(aggregate_s: float, floor: int = 15) -> int:
    """The aggregation job's time limit on a cluster (first attempt): three times the estimate,
    at least ``floor`` minutes (a cluster core may be slower than the one measured)."""
    return max(floor, -(-int(3 * aggregate_s) // 60))


def estimate(plan: ShardPlan, tokens: Mapping[str, int], shape: ModelShape, rates: DeviceRates,
             work: Workload, aggregate: bool = True) -> PlanEstimate:
    """Per model rule: jobs, estimated compute and fixed seconds (``tokens``: each prompt's
    token count by prompt id); with ``aggregate``, also the aggregation's time."""
    shards = [shard_seconds(shape, rates, work, shard.neurons,
                            [tokens[p] for p in shard.chunk.prompt_ids])
              for shard in plan.shards]
    rows = sum(len(shard.neurons) * len(shard.chunk.records) for shard in plan.shards)
    result = estimate_from_shards(shards, len(plan.chunks), rows, tokens, shape, rates, work)
    if not aggregate:
        return result
    blocks = block_aggregate_seconds(plan, shape.n_layers, work)
    if _verifies(work):
        blocks["candidates"] = aggregate_seconds(ShardPlan(plan.chunks, tuple(
            Shard("candidates", prompt_chunk, tuple(candidate_neurons(
                work.verify_candidates, shape.n_layers))) for prompt_chunk in plan.chunks)),
            shape.n_layers, work)
    return replace(result, aggregate_s=sum(blocks.values()), aggregate_jobs=len(blocks),
                   aggregate_longest_s=max(blocks.values(), default=0.0),
                   candidate_rows=work.verify_candidates * len(tokens) if _verifies(work)
                   else 0)


def _verifies(work: Workload) -> bool:
    """Whether the plan verifies candidates (they need the attribution jobs)."""
    return bool(work.verify_candidates and work.backward_passes)


def candidate_neurons(n: int, n_layers: int) -> list[Neuron]:
    """``n`` stand-ins for the verified candidates, spread evenly over the layers (the cost
    of a row depends on its layer; the candidates' layers are known only after attribution)."""
    return [Neuron(f"candidate {i}", i * n_layers // n, i) for i in range(n)]


def estimate_from_shards(shards: Sequence[float], n_chunks: int, rows: int,
                         tokens: Mapping[str, int], shape: ModelShape, rates: DeviceRates,
                         work: Workload) -> PlanEstimate:
    """:func:`estimate` from each shard's estimated compute, the number of prompt chunks and of
    (neuron, prompt) rows."""
    fixed = rates.fixed_s(shape.weight_bytes)
    forwards = sum(shape.forward_flops(n) for n in tokens.values()) / rates.flops_per_s
    mean_forward = forwards / max(len(tokens), 1)
    rules = [RuleEstimate("cache_clean_runs", n_chunks, forwards, n_chunks * fixed),
             RuleEstimate("compute_effects", len(shards), sum(shards), len(shards) * fixed)]
    if work.backward_passes:
        passes = 1 + BACKWARD_FACTOR * work.backward_passes
        rules.append(RuleEstimate("estimate_attribution", n_chunks, passes * forwards,
                                  n_chunks * fixed))
    if _verifies(work):  # a job per prompt chunk: the units of every prompt, directions per job
        spread = candidate_neurons(work.verify_candidates, shape.n_layers)
        directions = (len(spread) * shape.unembed_flops() / rates.flops_per_s
                      if work.full_vocab else 0.0)
        compute = shard_seconds(shape, rates, work, spread, list(tokens.values()))
        rules.append(RuleEstimate("compute_candidate_effects", n_chunks,
                                  compute + (n_chunks - 1) * directions, n_chunks * fixed))
    # the float64 reference: per sampled pair one hooked forward, per prompt one clean forward
    pairs = min(work.validation_pairs, rows)
    reference = (pairs + min(pairs, len(tokens))) * mean_forward * rates.float64_factor
    rules.append(RuleEstimate("validate_sample", 1, reference, fixed))
    return PlanEstimate(rates.name, tuple(rules))
