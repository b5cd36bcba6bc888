"""Rule judge_profile_scores: the profile's own score fields against the exact effects."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.jobs.aggregation import judge_profile_scores
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
judge_profile_scores(
    neurons_path=snakemake.input.neurons,
    profile_path=snakemake.input.profiles,
    fields=snakemake.params.fields,
    output=snakemake.output.table,
)
