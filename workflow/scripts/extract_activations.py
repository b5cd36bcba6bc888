"""Rule extract_activations: all neurons' last-position activations and their statistics."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.jobs.clean_runs import extract_activations
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
extract_activations(
    clean_paths=list(snakemake.input),
    activations_out=snakemake.output.activations,
    stats_out=snakemake.output.stats,
    active_threshold=snakemake.params.active_threshold,
)
