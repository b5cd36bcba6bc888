# The inputs were checked when the workflow was parsed (common.smk); this rule writes them as
# tables for the aggregation and the report. No effect job depends on it (they take their
# prompts and neurons from their params), so its rerun after an edit reruns no untouched shard
# and a dry run lists the stale jobs right away.
rule prepare_inputs:
    input:
        neurons=config["neurons"],
        prompts=config["prompts"],
    output:
        prompts="results/inputs/prompts.parquet",
        neurons="results/inputs/neurons.parquet",
    log:
        "logs/prepare_inputs.log",
    localrule: True
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        model=MODEL_SOURCE,
        prompt_format=PROMPT_FORMAT,
        cache_dir=INPUT_CHECKS,
    script:
        "../scripts/prepare_inputs.py"
