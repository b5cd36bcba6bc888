rule aggregate_effects:
    input:
        shards=effect_shards(),
        prompts=rules.prepare_inputs.output.prompts,
        clean=clean_chunks(),
        profiles=config["neurons"],
    output:
        per_prompt=report(
            "results/effects/per_prompt.parquet",
            caption="../report/per_prompt.rst",
            category="Tables",
        ),
        neurons=report(
            "results/summary/neurons.parquet",
            caption="../report/neurons.rst",
            category="Tables",
        ),
        neurons_json=report(
            "results/summary/neurons.json",
            caption="../report/neurons.rst",
            category="Tables",
        ),
        layers=report(
            "results/summary/layers.parquet",
            caption="../report/layers.rst",
            category="Tables",
        ),
        prompts="results/summary/prompts.parquet",
        labels=report(LABELS, caption="../report/labels.rst", category="Labels"),
    log:
        "logs/aggregate_effects.log",
    benchmark:
        "benchmarks/aggregate_effects/all.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        thresholds=config["classification"],
    script:
        "../scripts/aggregate_effects.py"


rule validate_sample:
    input:
        per_prompt=rules.aggregate_effects.output.per_prompt,
        clean=clean_chunks(),
        model=ancient(model_files),
    output:
        table="results/validation/pairs.parquet",
        summary=report(
            "results/validation/summary.json",
            caption="../report/validation.rst",
            category="Validation",
        ),
    log:
        "logs/validate_sample.log",
    benchmark:
        "benchmarks/validate_sample/all.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    threads: 2
    resources:
        gpu=GPUS,
    params:
        model=MODEL,
        settings=EFFECT_SETTINGS,
        validation=config["validation"],
    script:
        "../scripts/validate_sample.py"
