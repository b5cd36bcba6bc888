"""Rule estimate_attribution: first-order estimates (AtP, RelP) of every neuron on a chunk's
prompts."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.model import ModelSpec
from neuron_effects.jobs.estimates import estimate_attribution
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
estimate_attribution(
    spec=ModelSpec(**snakemake.params.model),
    clean_path=snakemake.input.clean,
    treatment=snakemake.params.treatment,
    positions=snakemake.params.positions,
    output=snakemake.output[0],
    neuron_stats=snakemake.input.stats or None,
    methods=snakemake.params.methods,
    cache_root=snakemake.params.cache,
)
