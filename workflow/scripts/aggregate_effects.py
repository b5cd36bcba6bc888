"""Rule aggregate_effects: the long table, neuron and layer summaries, enriched labels."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.aggregate import Thresholds
from neuron_effects.steps import aggregate_effects, configure_job

configure_job(snakemake.threads)
aggregate_effects(
    shard_paths=list(snakemake.input.shards),
    prompts_table=snakemake.input.prompts,
    clean_paths=list(snakemake.input.clean),
    profile_path=snakemake.input.profiles,
    thresholds=Thresholds(**snakemake.params.thresholds),
    per_prompt_out=snakemake.output.per_prompt,
    neurons_out=snakemake.output.neurons,
    neurons_json_out=snakemake.output.neurons_json,
    layers_out=snakemake.output.layers,
    prompts_out=snakemake.output.prompts,
    labels_out=snakemake.output.labels,
    mediation_shards=list(snakemake.input.mediation_shards),
    mediator_shards=list(snakemake.input.mediator_shards),
    mediation_out=snakemake.output.mediation,
    mediators_out=snakemake.output.mediators,
    mediation_layers_out=snakemake.output.mediation_layers,
    mediator_top_k=snakemake.params.mediator_top_k,
    estimates_path=snakemake.input.estimates[0] if snakemake.input.estimates else None,
    max_rank=snakemake.params.max_rank,
    edge_shards=list(snakemake.input.edge_shards),
    edges_out=snakemake.output.edges,
    edge_min_relative_delta=snakemake.params.edge_min_relative_delta,
    census=snakemake.params.census,
)
