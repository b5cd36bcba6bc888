"""Rule aggregate_effects: the layer blocks' parts joined into the long table, the neuron and
layer summaries, the mediation and edge tables, the prompt table and the enriched labels."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.jobs.aggregation import aggregate_effects
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
aggregate_effects(
    blocks=snakemake.params.blocks,
    prompts_table=snakemake.input.prompts,
    clean_paths=list(snakemake.input.clean),
    profile_path=snakemake.input.profiles,
    per_prompt_out=snakemake.output.per_prompt,
    neurons_out=snakemake.output.neurons,
    neurons_json_out=snakemake.output.neurons_json,
    layers_out=snakemake.output.layers,
    prompts_out=snakemake.output.prompts,
    labels_out=snakemake.output.labels,
    mediation_out=snakemake.output.mediation,
    mediators_out=snakemake.output.mediators,
    mediation_layers_out=snakemake.output.mediation_layers,
    edges_out=snakemake.output.edges,
    mediator_top_k=snakemake.params.mediator_top_k,
    max_rank=snakemake.params.max_rank,
    non_finite_out=snakemake.output.non_finite,
    candidates=snakemake.params.candidates,
)
