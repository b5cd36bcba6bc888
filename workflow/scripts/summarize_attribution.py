"""Rule summarize_attribution: all estimates, the all-neuron table and the candidates."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.jobs.estimates import summarize_attribution
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
summarize_attribution(
    chunk_paths=list(snakemake.input.chunks),
    profile_path=snakemake.input.profiles,
    n_candidates=snakemake.params.candidates,
    estimates_out=snakemake.output.estimates,
    neurons_out=snakemake.output.neurons,
    candidates_out=snakemake.output.candidates,
)
