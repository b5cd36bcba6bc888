"""Rules aggregate_block and aggregate_candidates: one layer block's part of the aggregation
(its rows, summaries, mediation and edge tables), or the verified candidates' (no edge table)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.aggregate import BLOCK_PARTS, Thresholds
from neuron_effects.jobs.aggregation import aggregate_block
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
aggregate_block(
    shard_paths=list(snakemake.input.shards),
    prompt_order=snakemake.params.prompt_order,
    profile_path=snakemake.input.profiles,
    thresholds=Thresholds(**snakemake.params.thresholds),
    parts={part: getattr(snakemake.output, part) for part in BLOCK_PARTS
           if part in snakemake.output.keys()},
    mediation_shards=list(snakemake.input.mediation_shards),
    mediator_shards=list(snakemake.input.mediator_shards),
    edge_shards=list(snakemake.input.edge_shards),
    mediator_top_k=snakemake.params.mediator_top_k,
    estimate_chunks=list(snakemake.input.estimates),
    edge_min_relative_delta=snakemake.params.edge_min_relative_delta,
    census=snakemake.params.census,
    outside_profile=snakemake.params.outside_profile,
)
