"""Rule prepare_inputs: validate neurons and prompts against the model, tokenize prompts."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.model import ModelSpec
from neuron_effects.jobs.preparation import prepare_inputs
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
prepare_inputs(
    neurons_path=snakemake.input.neurons,
    prompts_path=snakemake.input.prompts,
    spec=ModelSpec(**snakemake.params.model),
    **snakemake.params.prompt_format,  # chat_template, system_prompt, response_prefix
    prompts_out=snakemake.output.prompts,
    neurons_out=snakemake.output.neurons,
    cache_dir=snakemake.params.cache_dir,
)
