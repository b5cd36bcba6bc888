"""Rules compute_effects and compute_candidate_effects: direct, indirect and total effects for
one shard (its neurons in the params, or the verified candidates' selection), computing only the
rows the row cache lacks (a killed shard resumes from its saved units)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

import pandas as pd
from neuron_effects.effects import EffectSettings
from neuron_effects.model import ModelSpec
from neuron_effects.jobs.setup import configure_job
from neuron_effects.jobs.shard import compute_shard
from neuron_effects.verified import neuron_table

candidates = snakemake.input.get("candidates")

configure_job(snakemake.threads)
compute_shard(
    spec=ModelSpec(**snakemake.params.model),
    clean_path=snakemake.input.clean,
    neuron_table=(
        neuron_table(pd.read_parquet(candidates)) if candidates else snakemake.params.neurons
    ),
    settings=EffectSettings(**snakemake.params.settings),
    output=snakemake.output.per_prompt,
    mediation_output=snakemake.output.mediation,
    mediators_output=snakemake.output.mediators,
    edge_targets=snakemake.params.edges,
    edges_output=snakemake.output.edges,
    cache_root=snakemake.params.cache,
    prompt_format=snakemake.params.prompt_format,
    neuron_stats=snakemake.input.stats or None,
    neurons_per_block=snakemake.params.neurons_per_block,
)
