"""Rule render_report: the self-contained HTML report."""

import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.jobs.report_page import render_report
from neuron_effects.jobs.setup import configure_job

configure_job(snakemake.threads)
render_report(
    settings=snakemake.params.settings,
    per_prompt_path=snakemake.input.per_prompt,
    neurons_path=snakemake.input.neurons,
    layers_path=snakemake.input.layers,
    prompts_path=snakemake.input.prompts,
    activation_stats_path=snakemake.input.activation_stats,
    validation_table=snakemake.input.validation_table,
    validation_summary=snakemake.input.validation_summary,
    jobs=snakemake.params.jobs,
    top_n=snakemake.params.top_n,
    output=snakemake.output.page,
    figures_dir=str(Path(snakemake.output.class_bars).parent),
    mediation_layers_path=snakemake.input.mediation_layers,
    edges_path=snakemake.input.edges,
    atp_candidates=snakemake.input.atp_candidates[0]
    if snakemake.input.atp_candidates
    else None,
    plan_estimate=snakemake.params.estimate,
    profile_scores=snakemake.input.profile_scores or None,
    census_table_top=snakemake.params.census_table_top,
    census=snakemake.params.census,
)
