"""Rule cache_clean_runs: one clean forward per prompt of a chunk, cached for the effect shards."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.model import ModelSpec
from neuron_effects.jobs.clean_runs import cache_clean_runs
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
cache_clean_runs(
    spec=ModelSpec(**snakemake.params.model),
    prompts=snakemake.params.prompts,
    output=snakemake.output[0],
    cache_root=snakemake.params.cache,
    prompt_format=snakemake.params.prompt_format,
    # read from the config, not params: a check of the run, not an input of its results, so
    # changing it reruns no clean run (and no shard)
    **snakemake.config["targets"],
)
