"""Direct vs indirect effects of single MLP neurons on next-token logits.

model -> prepared model (once), read by every model job
prompts + neurons -> prepared inputs -> clean runs (per prompt chunk) -> activations
                                      -> effect shards (layer block x prompt chunk)
                                      -> attribution-patching estimates (per prompt chunk)
                                      -> summaries, enriched labels, validation -> HTML report
"""

from snakemake.utils import min_version

min_version("9.14.1")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/clean.smk"
include: "workflow/rules/effects.smk"
include: "workflow/rules/atp.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.render_report.output,
        rules.aggregate_effects.output,
    localrule: True
