rule cache_clean_runs:
    input:
        # ancient: the table changes whenever any prompt does; params say which chunk changed
        prompts=ancient(rules.prepare_inputs.output.prompts),
        model=ancient(model_files),
    output:
        "results/clean/{chunk}.safetensors",
    params:
        model=MODEL,
        prompt_ids=chunk_prompt_ids,
        fingerprint=chunk_fingerprint,
    log:
        "logs/cache_clean_runs/{chunk}.log",
    benchmark:
        "benchmarks/cache_clean_runs/{chunk}.tsv"
    threads: 2
    resources:
        gpu=GPUS,
    script:
        "../scripts/cache_clean_runs.py"


rule extract_activations:
    input:
        clean_chunks,
    output:
        activations="results/activations/activations.safetensors",
        stats="results/activations/neuron_stats.parquet",
    params:
        active_threshold=config["activation_stats"]["active_threshold"],
    log:
        "logs/extract_activations.log",
    benchmark:
        "benchmarks/extract_activations/all.tsv"
    script:
        "../scripts/extract_activations.py"
