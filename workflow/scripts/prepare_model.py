"""Rule prepare_model: the model as a local folder that every model job loads in seconds."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.prepare import PreparedModel, prepare_model
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
prepare_model(
    PreparedModel(**snakemake.params.prepared),
    trust_remote_code=snakemake.params.trust_remote_code,
)
