rule fetch_demo_model:
    output:
        str(DEMO_MODEL),
    log:
        "logs/fetch_demo_model.log",
    localrule: True
    script:
        "../scripts/fetch_demo_model.py"


rule prepare_inputs:
    input:
        neurons=config["neurons"],
        prompts=config["prompts"],
        model=model_files,
    output:
        prompts="results/inputs/prompts.parquet",
        neurons="results/inputs/neurons.parquet",
    params:
        model=MODEL,
        prompt_format=PROMPT_FORMAT,
    log:
        "logs/prepare_inputs.log",
    localrule: True
    script:
        "../scripts/prepare_inputs.py"
