"""Rule select_candidates: the neurons outside the profile to verify exactly."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.jobs.estimates import select_candidates
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
select_candidates(snakemake.input[0], snakemake.params.n, snakemake.output[0])
