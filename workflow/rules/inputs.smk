rule fetch_demo_model:
    output:
        str(DEMO_MODEL),
    log:
        "logs/fetch_demo_model.log",
    localrule: True
    conda:
        "../../envs/neuron-effects.yaml"
    script:
        "../scripts/fetch_demo_model.py"


# A checkpoint, not a rule: when an input file changes, this job reruns, and Snakemake decides
# whether the jobs below it (linked by ancient() inputs) rerun only once it has finished; a plain
# rule would mask them and leave shards whose params changed stale until a second invocation.
checkpoint prepare_inputs:
    input:
        neurons=config["neurons"],
        prompts=config["prompts"],
        model=model_files,
    output:
        prompts="results/inputs/prompts.parquet",
        neurons="results/inputs/neurons.parquet",
    log:
        "logs/prepare_inputs.log",
    localrule: True
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        model=MODEL,
        prompt_format=PROMPT_FORMAT,
    script:
        "../scripts/prepare_inputs.py"
