"""Rule validate_sample: compare sampled rows with the slow reference paths."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.effects import EffectSettings
from neuron_effects.model import ModelSpec
from neuron_effects.jobs.sample_validation import validate_sample
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
validation = snakemake.params.validation
validate_sample(
    spec=ModelSpec(**snakemake.params.model),
    clean_paths=list(snakemake.input.clean),
    per_prompt_path=snakemake.input.per_prompt,
    settings=EffectSettings(**snakemake.params.settings),
    n_pairs=validation["pairs"],
    seed=validation["seed"],
    tolerance=None if validation["tolerance"] == "auto" else validation["tolerance"],
    max_relative_error=validation["max_relative_error"],
    table_out=snakemake.output.table,
    summary_out=snakemake.output.summary,
    non_finite_path=snakemake.input.non_finite,
)
